"""
Relay first where the punch is uncertain, and keepalives learnt from the
NAT:

- the rule (L{p2pnat.protocol.strategy.relay_first}) for each plan;
- two clients behind one carrier NAT that does not hairpin (a simulated
  internet, L{tests.support.udp.SimNet}): the path is relayed at once
  instead of after the punch's rounds (about 10 s), and two hosts on one
  LAN still get their direct path at once;
- a birthday punch: relayed first, upgraded in place when the punch hits;
- the presence keepalive learnt from the lobby's answers
  (L{p2pnat.peer.health.MappingWatch}): a NAT whose mappings time out
  after 10 s, a lobby that asks for keepalives every 20 s: the client
  halves its interval (and its paths'), tells so in an event, and stays
  reachable.
"""

from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.health import FLOOR, MappingWatch
from p2pnat.protocol.strategy import CERTAIN, actions_for, relay_first
from tests.support.udp import SimNat
from tests.unit.test_p2p_strategy import A_PUBLIC, B_LOCAL, B_PUBLIC, CONE, RANDOM, SEQ, both
from tests.unit import test_peer_client
from tests.unit.test_peer_client import HOSTS, SEQUENTIAL, SIM, World, exchange, kind
from tests.unit.test_peer_client import CONE as WIRE_CONE
from tests.unit.test_peer_client import RANDOM as WIRE_RANDOM
from tests.unit.test_peer_health import TimeoutWorld, until


class RuleTests(SynchronousTestCase):
    def test_same_public_ip_unless_it_hairpins(self):
        (_, plan, _), (_, mirrored, _) = both(CONE, CONE, same=True)
        self.assertIn("same public IP", relay_first(plan))
        self.assertIn("same public IP", relay_first(mirrored))  # both sides bind
        self.assertIn("does not hairpin", relay_first(plan, hairpin=False))
        self.assertIsNone(relay_first(plan, hairpin=True))
        # No NAT between the peers and the lobby (one host, one network):
        # their own addresses reach each other.
        self.assertIsNone(relay_first(plan, translated=False))

    def test_birthday_when_unlikely_or_in_its_last_round(self):
        (_, plan, _), (_, mirrored, _) = both(CONE, RANDOM)
        self.assertEqual((plan.strategy, mirrored.strategy), ("birthday", "birthday"))
        # As planned, a hit in the round is nearly certain: punch first.
        self.assertGreaterEqual(plan.params.hit_probability, CERTAIN)
        self.assertIsNone(relay_first(plan, rounds_left=2))
        self.assertIn("last round", relay_first(plan, rounds_left=0))
        self.assertIn("last round", relay_first(mirrored))  # the answerer binds: A decides
        unlikely = replace(plan, params=replace(plan.params, hit_probability=0.6))
        self.assertIn("60.0%", relay_first(unlikely, rounds_left=2))

    def test_window_in_its_last_round(self):
        (_, plan, _), (_, mirrored, _) = both(SEQ, SEQ)
        self.assertEqual(plan.strategy, "predict")
        self.assertIsNone(relay_first(plan, rounds_left=3))
        self.assertIsNone(relay_first(plan, rounds_left=1))
        self.assertIn("last round", relay_first(plan, rounds_left=0))
        # The answering side cannot count the asker's rounds: it binds, and
        # the relay is up once the asker binds too.
        self.assertIsNotNone(relay_first(mirrored))

    def test_certain_punches_go_first(self):
        (_, plan, _), _ = both(CONE, CONE)
        self.assertEqual(plan.strategy, "simultaneous-open")
        self.assertIsNone(relay_first(plan, rounds_left=0))
        _, plan, _ = actions_for("a", RANDOM, RANDOM, B_PUBLIC, B_LOCAL, A_PUBLIC)
        self.assertEqual(plan.strategy, "relay")
        self.assertIsNone(relay_first(plan, rounds_left=0))


class MappingWatchTests(SynchronousTestCase):
    def test_a_new_address_halves_down_to_the_floor(self):
        watch = MappingWatch(20)
        self.assertIsNone(watch.answer(("203.0.113.1", 20000)))
        self.assertIsNone(watch.answer(("203.0.113.1", 20000)))  # the same mapping
        self.assertEqual(watch.interval, 20)
        self.assertEqual(watch.answer(("203.0.113.1", 20001)), 10)
        self.assertEqual(watch.answer(("203.0.113.1", 20002)), FLOOR)
        self.assertIsNone(watch.answer(("203.0.113.1", 20003)))  # not below the floor
        self.assertEqual(watch.interval, FLOOR)

    def test_never_above_what_the_lobby_asks(self):
        watch = MappingWatch(20)
        watch.answer(("203.0.113.1", 1))
        watch.answer(("203.0.113.1", 2))
        self.assertEqual(watch.interval, 10)
        watch.ask(6)
        self.assertEqual(watch.interval, 6)
        watch.ask(3)  # a lobby asking below the floor is obeyed
        self.assertEqual(watch.interval, 3)
        watch.ask(60)
        self.assertEqual(watch.interval, 10)  # the learnt bound stays


class SharedNatWorld(World):
    """
    Alice and bob in two homes (10.0.1.0/24, 10.0.2.0/24) behind one
    carrier NAT: one public IP; the NAT does not hairpin (a datagram to
    its own public IP from inside is lost), and neither home reaches the
    other's addresses.  With C{same_lan} they are on one LAN instead:
    everything passes (L{SimNet} sends even LAN traffic through the NAT,
    so the answer to a local probe comes back hairpinned).
    """

    def __init__(self, testcase, nat, same_lan=False):
        World.__init__(self, testcase)
        self.public = HOSTS["alice"][1]
        self.nat = SimNat(self.public, base=20000, **SIM[nat])
        self.nat_info = nat

        def lose(src, dst, data):
            if same_lan:
                return False
            return src[0] == dst[0] == self.public or dst[0].startswith("10.")

        self.net.lose = lose

    def client(self, name, **options):
        c = World.client(self, name, self.nat_info, login=False, **options)
        self.net.nats[HOSTS[name][0]] = self.nat
        d = c.start()
        self.advance(0.05)
        self.testcase.successResultOf(d)
        return c


class SharedNatTests(SynchronousTestCase):
    def test_carrier_nat_without_hairpinning_relays_at_once(self):
        """
        The punch cannot work (the local addresses are in other homes, the
        NAT does not hairpin): the path is relayed as soon as the lobby
        relays, not after the punch's rounds (8 to 12 s before).
        """
        w = SharedNatWorld(self, WIRE_RANDOM)
        w.client("alice", connect_timeout=12.0)
        bob = w.client("bob")
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        took = w.clock.seconds() - start
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay first (direct)"))
        self.assertLess(took, 0.5)  # the relay ready, and its grace for the punch
        self.assertEqual(path.rounds, 1)
        w.advance(0.3)  # bob learns the relay is ready at its next bind
        [incoming] = w.incoming["bob"]
        self.assertEqual(incoming.mode, "relayed")
        self.assertIs(bob.paths["alice"], incoming)
        exchange(self, w, path, incoming, via_lobby=True)
        # The lobby's AnswerAck reached bob's answer through the socket that
        # both punches and relays: one Answer, not retransmitted.
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "Answer"]), 1)
        # The punch went on meanwhile, and missed; the path stays relayed.
        w.advance(3)
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        exchange(self, w, path, incoming, via_lobby=True)

    def test_one_lan_direct_at_once(self):
        """Two hosts on one LAN: the local probes win within the relay's grace."""
        w = SharedNatWorld(self, WIRE_CONE, same_lan=True)
        w.client("alice")
        w.client("bob")
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("direct", "direct"))
        w.advance(0.3)
        [incoming] = w.incoming["bob"]
        self.assertEqual(incoming.mode, "direct")
        exchange(self, w, path, incoming, via_lobby=False)
        # The relay binds were given up, and the fresh sockets not used closed.
        w.advance(12)
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "RelayBind"]) > 0, True)
        for name, p in (("alice", path), ("bob", incoming)):
            self.assertEqual(w.sockets(name), sorted([w.clients[name].proto.transport.addr,
                                                      p.direct[0].transport.addr]), name)


class BirthdayTests(SynchronousTestCase):
    def test_first_round_punches_first(self):
        """A birthday punch as planned (a 99.9 % hit) is direct from its first byte."""
        w = World(self)
        w.client("alice")
        w.client("bob", WIRE_RANDOM)
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("direct", "birthday"))
        w.advance(12)

    def test_last_round_relayed_first_then_direct(self):
        """
        With time for one round only (its 2.7 s and the relay's reserve),
        the round is the last: relayed first, direct when the punch hits
        (here not before the peers' probes pass, after half a second).
        """
        w = World(self)
        w.client("alice", connect_timeout=6.0)
        w.client("bob", WIRE_RANDOM)
        peers = {HOSTS["alice"][1], HOSTS["bob"][1]}
        opens = w.clock.seconds() + 0.5
        w.net.lose = lambda src, dst, data: (
            {src[0], dst[0]} == peers and w.clock.seconds() < opens)
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay first (birthday)"))
        modes = []
        path.on_mode = modes.append
        until(w, lambda: path.mode == "direct", 5)
        self.assertEqual((modes, path.strategy), (["direct"], "birthday"))
        w.advance(0.3)
        [incoming] = w.incoming["bob"]
        self.assertEqual(incoming.mode, "direct")
        exchange(self, w, path, incoming, via_lobby=False)
        w.advance(12)  # every punch socket but the path's closed


class KeepaliveLearningTests(SynchronousTestCase):
    def test_learnt_below_the_nat_timeout_with_the_default_lobby_keepalive(self):
        w = TimeoutWorld(self, nat_timeout=10.0)
        w.lobby.keepalive = 20  # the default, longer than the NAT's timeout
        events = []
        bob = w.client("bob")
        bob.on_event = lambda name, fields: events.append((name, fields))
        alice = w.client("alice")
        path = w.connect("alice", "bob")
        self.assertEqual(path.keepalive_interval, 15.0)
        w.advance(30)
        # The first keepalive after the NAT's timeout left from a new mapping:
        # the lobby saw a new address, so the mapping died within 20 s.
        self.assertTrue(events, "no keepalive event")
        name, fields = events[0]
        self.assertEqual((name, fields["interval"], fields["was"], fields["path"]),
                         ("keepalive", 10, 20, 7.5))
        self.assertIn("new address", fields["why"])
        # The next keepalives (10 s from the answer that came back, the NAT's
        # timeout from the last traffic) may lose the mapping again: halved
        # again, but never below the floor.
        w.advance(60)
        self.assertGreaterEqual(bob.keepalive, FLOOR)
        self.assertLessEqual(bob.keepalive, 10)
        self.assertEqual(bob.path_keepalive, FLOOR)
        # A path opened now starts from the interval learnt.
        alice.paths["bob"].close()
        w.advance(0.1)
        path = w.connect("alice", "bob")
        w.advance(0.1)
        self.assertEqual(bob.paths["alice"].keepalive_interval, FLOOR)

    def test_reachable_when_a_default_keepalive_would_not_be(self):
        """
        At 72 s the mapping of a client keeping the lobby's 20 s had been
        dead for 2 s (its keepalive at 60 s, the NAT's timeout 10 s): the
        lobby's invitation would be lost.  The learnt keepalive kept it.
        """
        w = TimeoutWorld(self, nat_timeout=10.0)
        w.lobby.keepalive = 20
        bob = w.client("bob")
        w.advance(72)
        w.client("alice")
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        self.assertLess(w.clock.seconds() - start, 1.0)
        self.assertEqual(path.mode, "direct")
        self.assertLessEqual(bob.keepalive, 10)


class WindowTests(SynchronousTestCase):
    def test_last_round_relayed_at_its_start(self):
        """
        Two sequential NATs, nothing passes between them: the window's
        rounds miss; the last one starts with the relay, which carries the
        path from then on (before, only once that round had missed too).
        """
        w = World(self)
        w.client("alice", SEQUENTIAL, connect_timeout=12.0)
        w.client("bob", SEQUENTIAL)
        blocked = {HOSTS["alice"][1], HOSTS["bob"][1]}
        w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        took = w.clock.seconds() - start
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay first (predict)"))
        self.assertGreater(path.rounds, 3)
        # The last round starts with at most a round and the reserve left.
        self.assertLess(took, 12.0 - 3.5 - 0.5)
        w.advance(0.3)
        exchange(self, w, path, w.incoming["bob"][-1], via_lobby=True)
        w.advance(12)


class ClusterTests(SynchronousTestCase):
    def test_carrier_nat_relayed_at_once_by_one_node(self):
        """
        A lobby cluster (L{tests.unit.test_lobby_cluster.ClientsTests}'s
        world: alice on node 1, bob on node 2, which relays nothing) with
        alice and bob behind one carrier NAT that does not hairpin: both
        bind the relay at once, at node 1, while the punch goes on.
        """
        from tests.unit import test_lobby_cluster as cluster

        public = HOSTS["alice"][1]
        nats = {}
        self.patch(test_peer_client, "HOSTS", {**HOSTS, "bob": (HOSTS["bob"][0], public)})
        self.patch(cluster, "SimNat", lambda ip, **kw: nats.setdefault(ip, SimNat(ip, **kw)))
        world = cluster.ClientsTests("test_relayed_by_one_node")
        world.setUp()
        self.addCleanup(world.stop)
        world.net.lose = lambda src, dst, data: (src[0] == dst[0] == public
                                                 or dst[0].startswith("10."))
        results = []
        world.clients["alice"].connect("bob").addBoth(results.append)
        world.advance(0.5)
        [path] = results
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay first (direct)"))
        [incoming] = world.incoming["bob"]
        self.assertEqual((path.relayed[1], incoming.relayed[1]), (cluster.NODE1, cluster.NODE1))
        got = []
        incoming.on_datagram = got.append
        path.send(b"ping")
        world.advance(0.05)
        self.assertEqual(got, [b"ping"])
        world.advance(5)  # the punch missed meanwhile: still relayed
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
