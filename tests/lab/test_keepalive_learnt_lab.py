"""
The presence keepalive learnt from the NAT, across the Linux kernel's real
NATs (:meth:`KeepaliveLearntTests.test_symmetric_nat_keepalive_learnt`):
S waits behind a sequential symmetric NAT whose conntrack UDP timeout is 8 s,
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

The idle time is most of this module's: ``scripts/test`` runs it alongside
the rest of the suite.  The test needs root, ``ip``, ``nft`` and
``conntrack``; it skips otherwise, and fails instead when the environment
variable ``CI`` is set.
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


class KeepaliveLearntTests(LabTestCase):
    """The lobby (default keepalive), S behind the short-timeout NAT, C behind a cone."""

    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir)

    @classmethod
    def build(cls, pl):
        add_home(pl, "c", "cone")
        add_home(pl, "s", "symmetric-sequential", udp_timeout=UDP_TIMEOUT)
        pl.start_lobby()  # its default presence keepalive: LOBBY_KEEPALIVE
        pl.start_wait("s", "--echo")
        pl.wait_login("s")
        cls.s_login = time.monotonic()  # a moment after the lobby welcomed S

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
