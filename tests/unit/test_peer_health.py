"""
Paths that stay up: the liveness state machine (L{p2pnat.peer.health}) on
a L{Clock}, then two clients behind symmetric NATs whose UDP mappings time
out after 10 s (L{tests.support.udp.SimNat} with C{timeout}) while the
path's keepalive starts at 15 s: the direct path dies in silence, the
silence is seen within the bound, traffic moves to the lobby's relay, a
punch makes the path direct again, the keepalive is learnt below the
NAT's timeout, and after that a 60 s idle leaves the path working.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.health import GRACE, PathHealth
from tests.support.udp import SimNat
from tests.unit.test_peer_client import HOSTS, SEQUENTIAL, SIM, World, exchange, kind


class HealthTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.health = PathHealth(self.clock, keepalive=15.0)

    def test_dead_after_two_keepalives_and_a_grace(self):
        self.assertEqual(self.health.dead_after, 30 + GRACE)
        self.clock.advance(self.health.dead_after - 0.01)
        self.assertFalse(self.health.check())
        self.assertAlmostEqual(self.health.next_check(), 0.01)
        self.clock.advance(0.01)
        self.assertTrue(self.health.check())
        self.assertEqual((self.health.state, self.health.deaths), ("silent", 1))
        # Once per death, not at every look.
        self.clock.advance(10)
        self.assertFalse(self.health.check())

    def test_heard_keeps_it_alive_and_revives(self):
        for _ in range(10):
            self.clock.advance(14)
            self.assertFalse(self.health.heard())
            self.assertFalse(self.health.check())
        self.clock.advance(40)
        self.assertTrue(self.health.check())
        self.assertTrue(self.health.heard())  # back
        self.assertEqual(self.health.state, "alive")
        self.assertEqual(self.health.silence(), 0)

    def test_interval_halved_after_each_death_down_to_the_floor(self):
        seen = []
        for _ in range(4):
            self.clock.advance(self.health.dead_after)
            self.assertTrue(self.health.check())
            seen.append(self.health.interval)
            self.health.reset()
        self.assertEqual(seen, [7.5, 5.0, 5.0, 5.0])
        # dead_after stays: the peer learns on its own and may still send every 15 s.
        self.assertEqual(self.health.dead_after, 33.0)

    def test_measured_lifetime_sets_the_interval_below_it(self):
        self.health.mapping_lifetime(10.0)
        self.assertLess(self.health.interval, 10.0)
        self.assertGreaterEqual(self.health.interval, 5.0)
        self.health.mapping_lifetime(120.0)  # never longer than it was
        self.assertLess(self.health.interval, 10.0)
        self.health.mapping_lifetime(None)
        self.health.mapping_lifetime(2.0)
        self.assertEqual(self.health.interval, 5.0)  # the floor

    def test_suspect_after_a_missed_keepalive(self):
        self.clock.advance(15)
        self.assertFalse(self.health.suspect())
        self.clock.advance(2)
        self.assertTrue(self.health.suspect())

    def test_bounds_checked(self):
        self.assertRaises(ValueError, PathHealth, self.clock, 0)
        self.assertRaises(ValueError, PathHealth, self.clock, 15.0, 10.0)


class NatTimeoutTests(SynchronousTestCase):
    """The simulated NAT's mapping timeout itself."""

    def test_idle_mapping_gets_a_new_port(self):
        clock = Clock()
        nat = SimNat("203.0.113.1", mapping="address-and-port-dependent",
                     allocation="sequential", timeout=10.0, clock=clock)
        dst = ("198.51.100.1", 5000)
        first = nat.outbound(("10.0.0.2", 4000), dst)
        clock.advance(9)
        self.assertEqual(nat.inbound(first[1], dst), ("10.0.0.2", 4000))  # refreshes
        clock.advance(9)
        self.assertEqual(nat.outbound(("10.0.0.2", 4000), dst), first)
        clock.advance(10.5)
        self.assertIsNone(nat.inbound(first[1], dst))
        self.assertNotEqual(nat.outbound(("10.0.0.2", 4000), dst), first)
        self.assertEqual(nat.expired, 1)
        self.assertRaises(ValueError, SimNat, "203.0.113.1", timeout=10.0)


class TimeoutWorld(World):
    """L{World} with NATs whose UDP mappings time out after C{nat_timeout}."""

    def __init__(self, testcase, nat_timeout):
        World.__init__(self, testcase)
        self.nat_timeout = nat_timeout
        # Presence must outlive the NAT's timeout too: the lobby reaches
        # clients through the mapping their keepalives refresh.
        self.lobby.keepalive = 5

    def client(self, name, nat=SEQUENTIAL, **options):
        c = World.client(self, name, nat, login=False, **options)
        host, public = HOSTS[name]
        self.net.nats[host] = SimNat(public, base=20000 + 1000 * len(self.clients),
                                     seed=len(self.clients), timeout=self.nat_timeout,
                                     clock=self.clock, **SIM[nat])
        d = c.start()
        self.advance(0.05)
        self.testcase.successResultOf(d)
        return c


def until(w, predicate, limit, step=0.005):
    """Advance the world's clock until C{predicate()}, at most C{limit} seconds."""
    end = w.clock.seconds() + limit
    while not predicate():
        if w.clock.seconds() >= end:
            raise AssertionError(f"not within {limit} s")
        w.clock.advance(step)


class SilentDeathTests(SynchronousTestCase):
    def test_symmetric_nats_with_a_short_timeout(self):
        w = TimeoutWorld(self, nat_timeout=10.0)
        alice, bob = w.client("alice"), w.client("bob")
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("direct", "predict"))
        w.advance(0.05)
        [incoming] = w.incoming["bob"]
        events = {"alice": [], "bob": []}
        for name, p in (("alice", path), ("bob", incoming)):
            p.on_event = lambda n, f, name=name: events[name].append(
                (round(w.clock.seconds() - start, 2), n, f))
            p.on_mode = lambda mode, name=name: events[name].append(
                (round(w.clock.seconds() - start, 2), mode, {}))
        exchange(self, w, path, incoming, via_lobby=False)
        start = w.clock.seconds()
        bound = path.health.dead_after
        self.assertEqual(bound, 33.0)

        # Idle past the NAT's timeout: the 15 s keepalives leave from new
        # mappings, which the peer's NAT filters; the path is dead.
        until(w, lambda: path.mode == incoming.mode == "relayed", bound + 2)
        nats = [w.net.nats[HOSTS[n][0]] for n in ("alice", "bob")]
        self.assertTrue(all(n.expired for n in nats))
        silent = [e for e in events["alice"] if e[1] == "path-silent"]
        self.assertEqual(len(silent), 1, events)
        when, _, fields = silent[0]
        self.assertLessEqual(when, bound + 0.1)  # detected within the bound
        self.assertEqual(fields["keepalive"], 7.5)  # learnt: below the NAT's 10 s
        self.assertGreaterEqual(fields["silence"], bound)

        # Meanwhile traffic flows over the relay (both sides bound at once).
        self.assertLess(w.clock.seconds() - when - start, 0.5)
        self.assertIs(alice.paths["bob"], path)
        self.assertIs(bob.paths["alice"], incoming)
        self.assertEqual(len(w.incoming["bob"]), 1)  # the same Path, not announced again
        exchange(self, w, path, incoming, via_lobby=True)

        # The re-punch (started now, not at the upgrade interval) restores direct.
        until(w, lambda: path.mode == incoming.mode == "direct", 3)
        self.assertLess(w.clock.seconds() - start, bound + 4)
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertEqual([e[1] for e in events["alice"]], ["path-silent", "relayed", "direct"])
        self.assertEqual(path.keepalive_interval, 7.5)
        self.assertEqual(incoming.keepalive_interval, 7.5)

        # Now 60 s idle: the learnt keepalive holds the mappings; no silence.
        # (Each side still sees the other's mapping at the same public address.)
        ends = (path.direct[1], incoming.direct[1])
        w.advance(60, step=0.01)
        self.assertEqual((path.direct[1], incoming.direct[1]), ends)
        self.assertEqual((path.mode, incoming.mode), ("direct", "direct"))
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertEqual([e[1] for e in events["alice"]], ["path-silent", "relayed", "direct"])
        # Bob saw the silence at most once (alice's recovery reached it first, or soon after).
        self.assertLessEqual(len([e for e in events["bob"] if e[1] == "path-silent"]), 1)
        self.assertEqual(w.net.errors, [])

    def test_relayed_path_silent_connects_afresh(self):
        """
        A relayed path whose relay went quiet (the lobby forgot the
        session) is noticed too, and relayed again through a new session.
        """
        w = World(self)
        w.client("alice", upgrade_interval=1000.0)
        w.client("bob", upgrade_interval=1000.0)
        blocked = {HOSTS["alice"][1], HOSTS["bob"][1]}
        w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        path = w.connect("alice", "bob")
        w.advance(0.5)
        incoming = w.incoming["bob"][-1]
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        old = path.relayed[2].id
        w.lobby.sessions.clear()
        events = []
        path.on_event = lambda n, f: events.append(n)
        w.advance(path.health.dead_after + 1, step=0.01)
        self.assertEqual(events, ["path-silent"])
        self.assertEqual(path.mode, "relayed")
        self.assertNotEqual(path.relayed[2].id, old)
        exchange(self, w, path, incoming, via_lobby=True)
        binds = [s for s in w.net.sent if kind(s.data) == "RelayBind"]
        self.assertTrue(binds)

