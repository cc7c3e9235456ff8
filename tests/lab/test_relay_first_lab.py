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
  behind a sequential symmetric NAT whose conntrack UDP timeout is 10 s,
  and the lobby asks for its default 20 s presence keepalive.  S learns
  a shorter one (its ``keepalive`` event) and is still reachable 72 s
  after login: a client keeping 20 s would then have sent its last
  keepalive at 60 s, its mapping dead since 70 s, and the lobby's
  invitation would be lost (the connect took about 9 s in the simulated
  equivalent, tests.unit.test_peer_relay_first).

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import events, first, wait_event

#: S's router's conntrack UDP timeout (seconds).
UDP_TIMEOUT = 10
#: Seconds after S's login when C connects to it: past 60 s idle, and 10 s
#: to 20 s after a 20 s keepalive (the mapping it refreshed is dead).
REACH_AT = 72.0
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
        lab = pl.lab
        cgn = lab.add_router("cgn", kind="symmetric-random")
        for side in ("a", "b"):
            home = lab.add_router(f"r{side}", kind="cone", behind=cgn)
            pl.add_client(side, lab.add_host(side, behind=home))
        pl.add_client("c", lab.add_host("c", behind=lab.add_router("rc", kind="cone")))
        rs = lab.add_router("rs", kind="symmetric-sequential", udp_timeout=UDP_TIMEOUT)
        pl.add_client("s", lab.add_host("s", behind=rs))
        pl.start_lobby()  # its default presence keepalive: 20 s
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
        learnt = wait_event(waiter, "keepalive", timeout=35)
        self.assertLessEqual(learnt["interval"], UDP_TIMEOUT, learnt)
        self.assertLess(learnt["path"], 15, learnt)
        time.sleep(max(0.0, self.s_login + REACH_AT - time.monotonic()))
        t = pl.connect("c", "s", "--send", "ping", "--wait", "4")
        seen = [e for e in events(waiter.stdout()) if e.get("event") == "keepalive"]
        line = (f"keepalive {seen[0]['was']:g}s -> " + " -> ".join(
            f"{e['interval']:g}s" for e in seen) + f" (NAT timeout {UDP_TIMEOUT}s); after"
            f" {REACH_AT:g}s: {t.mode} in {t.path['seconds'] if t.path else None}s")
        measured(line)
        self.assertEqual(t.returncode, 0, t.describe())
        self.assertTrue(t.echoes, t.describe())
        # The invitation reached S at once (lost, it would be sent again
        # only after S's next keepalive moved the lobby to its new mapping).
        self.assertLess(t.path["seconds"], 3.0, t.describe())
        path = first(events(waiter.stdout()), "path")
        self.assertLessEqual(path["keepalive"], seen[-1]["path"], path)
