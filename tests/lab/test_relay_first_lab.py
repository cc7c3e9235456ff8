"""
Relay first where the punch is uncertain, and the presence keepalive
learnt from the NAT, across the Linux kernel's real NATs.

- :meth:`RelayFirstTests.test_carrier_nat_first_echo_within_the_relay_time`:
  two homes (cone routers) behind one carrier-grade NAT (a random-port
  symmetric NAT), which does not hairpin: one public IP for both, local
  addresses in other homes.  A's first echo from B comes back within the
  time a relayed path takes (measured in the same test: C, behind a NAT
  of its own, connects to the same B with a plan that can only relay).
  Before, the punch to the local addresses ran its rounds until only the
  relay's reserve was left: about 10 s.
- :meth:`RelayFirstTests.test_symmetric_nat_keepalive_learnt`: S waits
  behind a sequential symmetric NAT whose conntrack UDP timeout is 8 s,
  and the lobby asks for its default 20 s presence keepalive.  S learns
  a keepalive below the NAT's timeout (its ``keepalive`` events: 10 s at
  its first keepalive, 5 s, the floor, at its second) and is still
  reachable 34 s after login: a client keeping 20 s would then have sent
  its last keepalive at 20 s, its mapping dead since 28 s, and the
  lobby's invitation would be lost until its next keepalive at 40 s (the
  connect took about 9 s in the simulated equivalent,
  tests.unit.test_peer_relay_first).  The NAT's timeout and the moment
  are chosen so that this proves what a 10 s timeout and 72 s did, in
  less than half the time: both of S's halvings are certain (10 s > 8 s),
  the 5 s floor stays 3 s inside the timeout, and the connect falls 6 s
  after a 20 s client's mapping died and 6 s before it would be renewed.

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import add_home
from tests.support.lab.running import events, first, wait_event

#: S's router's conntrack UDP timeout (seconds): above the keepalive
#: floor (5 s) with room for scheduling, below the 10 s S learns first.
UDP_TIMEOUT = 8
#: The lobby's presence keepalive (its default), seconds.
LOBBY_KEEPALIVE = 20
#: Seconds after S's login when C connects to it: after S's second
#: keepalive (30 s, when it learns the floor), 6 s after a 20 s
#: keepalive's mapping died (28 s) and 6 s before the next (40 s), so that
#: the connect's 3 s bound tells the two apart.  Later by whole lobby
#: keepalives if the test starts later than that.
REACH_AT = 34.0
#: What the first echo over a relay-first path may take beyond a relayed
#: path's: the answering side learns the relay is ready at its next bind
#: (every 0.25 s), in both cases; the rest is scheduling noise.
MARGIN = 0.5
RANDOM_NAT = "address-and-port-dependent/random"


def first_echo(trial):
    """Seconds from the connect call to the first echo, or None."""
    path, echo = trial.path, first(trial.events, "data")
    if path is None or echo is None:
        return None
    return echo["t"] - path["t"] + path["seconds"]


class RelayFirstTests(LabTestCase):
    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir)

    @classmethod
    def build(cls, pl):
        cgn = pl.lab.add_router("cgn", kind="symmetric-random")
        for side in ("a", "b"):
            add_home(pl, side, "cone", behind=cgn)
        add_home(pl, "c", "cone")
        add_home(pl, "s", "symmetric-sequential", udp_timeout=UDP_TIMEOUT)
        pl.start_lobby()  # its default presence keepalive: LOBBY_KEEPALIVE
        for cid in ("b", "s"):
            pl.start_wait(cid, "--echo")
        pl.wait_login("s")
        cls.s_login = time.monotonic()  # a moment after the lobby welcomed S
        pl.wait_login("b")

    def connect(self, cid, peer, *args):
        return self.env.connect(cid, peer, "--nat", RANDOM_NAT, "--send", "ping", "--wait",
                                "4", *args)

    def test_carrier_nat_first_echo_within_the_relay_time(self):
        relayed, first_hand = [], []
        for _ in range(2):
            relayed.append(self.connect("c", "b"))
            first_hand.append(self.connect("a", "b"))
        for t in relayed:
            self.assertEqual((t.returncode, t.mode, t.path["strategy"]), (0, "relayed", "relay"),
                             t.describe())
        for t in first_hand:
            self.assertEqual(t.returncode, 0, t.describe())
            self.assertEqual(t.path["strategy"], "relay first (direct)", t.describe())
        relay_time = max(first_echo(t) for t in relayed)
        took = [first_echo(t) for t in first_hand]
        line = (f"two homes behind one carrier NAT, no hairpinning: first echo in"
                f" {', '.join(f'{s:.3f}' for s in took)}s; a relayed path's first echo"
                f" {', '.join(f'{first_echo(t):.3f}' for t in relayed)}s")
        measured(line)
        self.assertLessEqual(max(took), relay_time + MARGIN, line)

    def test_symmetric_nat_keepalive_learnt(self):
        pl = self.env
        waiter = pl.clients["s"].waiter
        reach = self.s_login + REACH_AT
        learnt = wait_event(waiter, "keepalive", timeout=max(1.0, reach - time.monotonic()),
                            where=lambda e: e["interval"] <= UDP_TIMEOUT)
        self.assertLessEqual(learnt["interval"], UDP_TIMEOUT, learnt)
        self.assertLess(learnt["path"], 15, learnt)
        while reach < time.monotonic():  # the same moment of a later lobby keepalive
            reach += LOBBY_KEEPALIVE
        time.sleep(reach - time.monotonic())
        t = pl.connect("c", "s", "--send", "ping", "--wait", "4")
        seen = [e for e in events(waiter.stdout()) if e.get("event") == "keepalive"]
        line = (f"keepalive {seen[0]['was']:g}s -> " + " -> ".join(
            f"{e['interval']:g}s" for e in seen) + f" (NAT timeout {UDP_TIMEOUT}s); after"
            f" {reach - self.s_login:.0f}s: {t.mode} in {t.path['seconds'] if t.path else None}s")
        measured(line)
        self.assertEqual(t.returncode, 0, t.describe())
        self.assertTrue(t.echoes, t.describe())
        # The invitation reached S at once (lost, it would be sent again
        # only after S's next keepalive moved the lobby to its new mapping).
        self.assertLess(t.path["seconds"], 3.0, t.describe())
        path = first(events(waiter.stdout()), "path")
        self.assertLessEqual(path["keepalive"], seen[-1]["path"], path)
