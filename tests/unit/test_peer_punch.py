"""
The hole-punch executor (L{p2pnat.peer.punch.Punch}) on a L{Clock}, with
sockets on a simulated internet (L{tests.support.udp.SimNet}) behind
simulated NATs: each kind of action (probes from the fresh socket, new
sockets, the one predicted probe, the spray at a bounded rate), the
answer to a probe, the deadline, and frames that must not count.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import punch as punch_module
from p2pnat.peer.client import LobbyClient, Session
from p2pnat.peer.punch import ROUND_FLOOR, Punch, PunchFailed, round_deadline
from p2pnat.peer.rtt import RttEstimator
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from p2pnat.protocol.strategy import Actions
from tests.support.udp import SimNat, SimNet

LOBBY = ("198.18.1.1", 3478)
SID = bytes(range(16))
KEY = bytes([7]) * 32
APD = "address-and-port-dependent"


def decode(data, key=KEY):
    """What a datagram carries: (key ID, message), or (key ID, None) if its MAC fails."""
    frame = wire.parse(data)
    try:
        return frame.key_id, frame.open(key)
    except wire.WireError:
        return frame.key_id, None


class Side:
    """One peer: a client (not logged in), its session, its fresh socket."""

    def __init__(self, world, name, role, host):
        self.client = LobbyClient(name, bytes([ord(name[0])]) * 32, LOBBY, world.net,
                                  interface=host)
        peer = "bob" if name == "alice" else "alice"
        self.session = Session(self.client, SID, KEY, role, peer)
        self.fresh = self.client._listen(self.client)
        self.punch = None

    @property
    def local(self):
        return self.fresh.transport.addr

    def start(self, actions, deadline=2.0, rnd=None, companion=None):
        self.punch = Punch(self.session, actions, self.fresh, self.client._listen,
                           self.client.clock, deadline, rnd, companion=companion)
        self.result = []
        self.punch.start().addBoth(self.result.append)
        return self.punch


class World:
    def __init__(self, testcase, latency=0.005):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = SimNet(self.clock, latency)
        self.testcase = testcase
        testcase.addCleanup(self.check_clean)

    def side(self, name, role, host, nat=None):
        if nat is not None:
            self.net.nats[host] = nat
        return Side(self, name, role, host)

    def advance(self, seconds, step=0.001):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def probes(self, src=None, dst=None):
        """Probes on the wire (public source, destination, message)."""
        out = []
        for s in self.net.sent:
            kid, m = decode(s.data)
            if isinstance(m, M.Probe) and (src is None or s.src == src) and (
                    dst is None or s.dst == dst):
                out.append((s.src, s.dst, m))
        return out

    def check_clean(self):
        self.clock.advance(0)  # closing ports close
        self.testcase.assertEqual(self.net.errors, [])


class FreshSocketTests(SynchronousTestCase):
    def test_simultaneous_open_through_two_cone_nats(self):
        """
        Both sides probe the other's fresh mapping from their fresh socket:
        the first probe into a filtering NAT is lost, the other side's gets
        through the hole it opened, and both end on (fresh socket, the peer's
        public mapping).
        """
        w = World(self)
        a = w.side("alice", "a", "10.0.1.2", SimNat("203.0.113.1", filtering=APD))
        b = w.side("bob", "b", "10.0.2.2", SimNat("198.51.100.1", filtering=APD))
        a_pub, b_pub = ("203.0.113.1", a.local[1]), ("198.51.100.1", b.local[1])
        a.start(Actions(from_fresh=[b_pub]))
        w.advance(0.02)  # A's first probe reaches B's NAT before B punched: dropped
        self.assertEqual(w.net.delivered, 0)
        b.start(Actions(from_fresh=[a_pub]))
        w.advance(0.05)
        self.assertEqual(a.result, [(a.fresh, b_pub)])
        self.assertEqual(b.result, [(b.fresh, a_pub)])
        # Every probe is a MAC'd Probe under the sender's own key ID, from its fresh socket.
        for s in w.net.sent:
            kid, m = decode(s.data)
            self.assertIsNotNone(m)
            self.assertEqual(kid, M.session_key_id(SID, "a" if s.src == a_pub else "b"))
        self.assertEqual({(src, dst) for src, dst, _ in w.probes()},
                         {(a_pub, b_pub), (b_pub, a_pub)})
        # The probe that got through was answered from the socket it reached.
        acks = [(s.src, s.dst, decode(s.data)[1]) for s in w.net.sent
                if isinstance(decode(s.data)[1], M.ProbeAck)]
        self.assertIn((a_pub, b_pub, M.ProbeAck(1, 0, b_pub)), acks)
        # Success stops the repetitions; the fresh socket stays open for the path.
        self.assertEqual(w.clock.getDelayedCalls(), [])
        sent = len(w.net.sent)
        w.advance(1)
        self.assertEqual(len(w.net.sent), sent)
        self.assertIsNotNone(a.fresh.transport)
        # its probes and the ack (ACK_COPIES of it) of the probe that made its path
        self.assertEqual(a.punch.sent, len(w.probes(src=a_pub)) + punch_module.ACK_COPIES)

    def test_repetitions_quick_then_every_interval(self):
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        a.start(Actions(from_fresh=[("198.51.100.1", 9), ("198.51.100.1", 10)], interval=0.2),
                deadline=1.0)
        times = []
        for _ in range(1000):
            before = len(w.net.sent)
            w.clock.advance(0.001)
            if len(w.net.sent) > before:
                times.append(round(w.clock.seconds() - 1_700_000_000, 3))
        # After 0.05, 0.1, 0.2 s, then every 0.2 s; each time to both addresses.
        gaps = [b - a for a, b in zip([0.0] + times, times)]
        want = [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
        self.assertEqual(len(gaps), len(want), times)
        for got, expected in zip(gaps, want):
            self.assertLessEqual(abs(got - expected), 0.0015, times)  # the 1 ms steps
        self.assertEqual(len(w.probes()), 2 * (len(times) + 1))


class NewSocketTests(SynchronousTestCase):
    def test_window_of_new_sockets(self):
        """
        The seed's window: n new sockets each probe the predicted address;
        the one that meets the peer is kept, the others are closed, and the
        fresh socket is left to the caller.
        """
        w = World(self)
        a = w.side("alice", "a", "10.0.1.2",
                   SimNat("203.0.113.1", APD, APD, "sequential", base=30000))
        b = w.side("bob", "b", "198.51.100.1")  # public: answers what reaches it
        p = a.start(Actions(new_sockets=4, new_to=[b.local]))
        self.assertEqual(len(p.sockets), 4)
        locals_ = [proto.transport.addr for proto, _ in p.sockets]
        self.assertEqual(len(set(locals_)), 4)
        self.assertNotIn(a.local, locals_)
        # The four probes leave at once from four new mappings, 30000-30003.
        self.assertEqual(sorted(src for src, _, _ in w.probes()),
                         [("203.0.113.1", 30000 + i) for i in range(4)])
        self.assertEqual({m.index for _, _, m in w.probes()}, {0, 1, 2, 3})
        # Bob was not punching yet: those were lost.  Bob takes the third one.
        w.advance(0.02)
        b.start(Actions(from_fresh=[("203.0.113.1", 30002)]))
        w.advance(0.05)
        winner = p.sockets[2][0]
        self.assertEqual(a.result, [(winner, b.local)])
        self.assertEqual(b.result, [(b.fresh, ("203.0.113.1", 30002))])
        w.clock.advance(0)
        self.assertEqual([proto.transport is not None for proto, _ in p.sockets],
                         [False, False, True, False])
        self.assertIsNotNone(a.fresh.transport)

    def test_single_predicted_probe(self):
        """
        The seed's one packet: one new socket (the NAT's next port), one
        probe per repetition to the one predicted address, at the TTL asked
        for first and the system's after.
        """
        w = World(self)
        a = w.side("alice", "a", "10.0.1.2",
                   SimNat("203.0.113.1", APD, APD, "sequential", base=30000))
        a.fresh.transport.write(b"\0", LOBBY)  # the fresh mapping: 30000
        target = ("198.51.100.1", 40007)
        p = a.start(Actions(new_sockets=1, new_to=[target], first_ttl=3), deadline=0.5)
        w.advance(0.6)
        sent = [(s.src, s.dst, s.ttl) for s in w.net.sent[1:]]
        self.assertEqual(sent[0], (("203.0.113.1", 30001), target, 3))
        self.assertEqual(set(sent[1:]), {(("203.0.113.1", 30001), target, 64)})
        self.assertEqual(len(sent), p.sent)
        self.assertIsInstance(a.result[0].value, PunchFailed)

    def test_socket_that_cannot_open(self):
        """A new socket that cannot open is logged; the others probe on."""
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        opened = []

        def listen(handler):
            if len(opened) == 2:
                raise OSError(24, "too many open files")
            proto = a.client._listen(handler)
            opened.append(proto)
            return proto

        p = Punch(a.session, Actions(new_sockets=5, new_to=[("198.51.100.1", 9)]), a.fresh,
                  listen, w.clock, 1.0)
        d = p.start()
        self.assertEqual(len(p.sockets), 2)
        self.assertEqual(len(w.probes()), 2)
        w.advance(1.1)
        self.failureResultOf(d, PunchFailed)


class SprayTests(SynchronousTestCase):
    def test_spray_rate_is_bounded(self):
        """
        The easy side of a birthday punch sprays random ports of the peer's
        IP from its fresh socket at the rate asked for, never faster, in the
        range asked for; its probe to the peer's fresh mapping goes on.
        """
        for rate in (50, 1000, 5000):
            w = World(self)
            a = w.side("alice", "a", "203.0.113.1")
            peer = ("198.51.100.1", 5000)
            a.start(Actions(from_fresh=[peer], spray_ip=peer[0], spray_rate=rate,
                            spray_ports=(20000, 29999)), deadline=1.0, rnd=random.Random(5))
            per_tenth = []
            for _ in range(10):
                before = len([1 for _, dst, m in w.probes() if m.index == 0xFFFF])
                w.advance(0.1)
                after = len([1 for _, dst, m in w.probes() if m.index == 0xFFFF])
                per_tenth.append(after - before)
            w.advance(0.01)  # past the deadline
            burst = max(1, rate // 100)
            for n in per_tenth:
                self.assertLessEqual(n, rate * 0.1 + burst, (rate, per_tenth))
            total = sum(per_tenth)
            self.assertTrue(rate * 0.9 <= total <= rate * 1.05, (rate, total))
            spray = [dst for _, dst, m in w.probes() if m.index == 0xFFFF]
            self.assertTrue(all(d[0] == peer[0] and 20000 <= d[1] <= 29999 for d in spray))
            self.assertGreater(len(set(spray)), total * 0.8)  # random ports, few repeats
            self.assertGreaterEqual(len([1 for _, dst, _ in w.probes(dst=peer)]), 5)
            self.assertIsInstance(a.result[0].value, PunchFailed)
            self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_birthday_punch(self):
        """
        The random side's many sockets open holes towards the easy side;
        the easy side's spray finds one of them.
        """
        w = World(self)
        a = w.side("alice", "a", "198.51.100.1")  # easy (public) side, spraying
        nat = SimNat("203.0.113.1", APD, APD, "random", seed=3)
        b = w.side("bob", "b", "10.0.2.2", nat)
        b.start(Actions(new_sockets=64, new_to=[a.local], interval=0.5), deadline=4.0)
        a.start(Actions(from_fresh=[("203.0.113.1", 1)], spray_ip="203.0.113.1",
                        spray_rate=1000, spray_ports=(1024, 65535)),
                deadline=4.0, rnd=random.Random(11))
        w.advance(4.1)
        self.assertEqual(len(a.result), 1)
        proto, addr = a.result[0]
        self.assertIs(proto, a.fresh)
        self.assertEqual(addr[0], "203.0.113.1")
        self.assertEqual(nat.owner[addr[1]][0], "10.0.2.2")
        bproto, baddr = b.result[0]
        self.assertEqual(baddr, a.local)
        self.assertEqual(("203.0.113.1", nat.by_key[(bproto.transport.addr, a.local)]), addr)


class DeadlineTests(SynchronousTestCase):
    def test_punch_failed_at_the_deadline(self):
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        p = a.start(Actions(from_fresh=[("198.51.100.1", 9)], new_sockets=2,
                            new_to=[("198.51.100.1", 10)]), deadline=1.5)
        w.advance(1.499)
        self.assertEqual(a.result, [])
        w.advance(0.002)
        [failure] = a.result
        failure.trap(PunchFailed)
        self.assertEqual(failure.getErrorMessage(), f"no path after {p.sent} probes")
        # Every timer stopped, every new socket closed; the fresh one is the caller's.
        self.assertEqual(w.clock.getDelayedCalls(), [])
        sent = len(w.net.sent)
        w.advance(1)
        self.assertEqual(len(w.net.sent), sent)
        self.assertEqual([proto.transport for proto, _ in p.sockets[1:]], [None, None])
        self.assertIsNotNone(a.fresh.transport)

    def test_cancel(self):
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        p = a.start(Actions(new_sockets=2, new_to=[("198.51.100.1", 10)]))
        p.cancel()
        self.assertEqual(a.result[0].getErrorMessage(), "cancelled")
        p.cancel()  # twice: nothing more
        self.assertEqual(len(a.result), 1)
        w.advance(0.01)  # what was in flight arrives
        self.assertEqual(w.clock.getDelayedCalls(), [])


class RttTests(SynchronousTestCase):
    """Rounds and repetitions that follow the client's RTT to the lobby."""

    def test_round_deadline(self):
        """
        Plain rounds last ROUND_RTOS RTOs within [ROUND_FLOOR, the plan's];
        before a sample, and for a birthday punch, the plan's round.
        """
        plain = Actions(from_fresh=[("198.51.100.1", 9)])
        window = Actions(new_sockets=64, new_to=[("198.51.100.1", 9)])
        birthday = Actions(new_sockets=256, new_to=[("198.51.100.1", 9)], interval=0.5)
        spray = Actions(from_fresh=[("198.51.100.1", 9)], spray_ip="198.51.100.1",
                        spray_rate=1000)
        rtt = RttEstimator(Clock())
        self.assertEqual(round_deadline(plain, 2.0, rtt), 2.0)
        self.assertEqual(round_deadline(plain, 2.0, None), 2.0)
        rtt.sample(0.001)  # a LAN: the floor
        self.assertEqual(round_deadline(plain, 2.0, rtt), ROUND_FLOOR)
        self.assertEqual(round_deadline(window, 1.5, rtt), ROUND_FLOOR)
        self.assertEqual(round_deadline(plain, 0.5, rtt), 0.5)  # never longer than the plan's
        for actions in (birthday, spray):
            self.assertEqual(round_deadline(actions, 4.0, rtt), 4.0)
        rtt = RttEstimator(Clock())
        rtt.sample(0.05)  # rto 0.15: 10 of them
        self.assertAlmostEqual(round_deadline(plain, 2.0, rtt), 1.5)

    def test_round_ends_after_the_rtt(self):
        """
        A client that measured a LAN's RTT gives up a plain round after
        ROUND_FLOOR, and repeats its first probes after one RTO (at least
        20 ms), doubling, instead of after 50 ms.
        """
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        a.client.rtt.sample(0.001)
        sent = []
        w.net.lose = lambda src, dst, data: sent.append(round(w.clock.seconds() - 1_700_000_000,
                                                              3)) and False
        a.start(Actions(from_fresh=[("198.51.100.1", 9)]), deadline=2.0)
        w.advance(ROUND_FLOOR - 0.002)
        self.assertEqual(a.result, [])
        w.advance(0.004)
        a.result[0].trap(PunchFailed)
        gaps = [b - a for a, b in zip(sent, sent[1:4])]
        for got, expected in zip(gaps, [0.02, 0.04, 0.08]):
            self.assertLessEqual(abs(got - expected), 0.0015, sent)  # the 1 ms steps


class FrameTests(SynchronousTestCase):
    def setUp(self):
        self.w = World(self)
        self.a = self.w.side("alice", "a", "203.0.113.1")
        self.b_addr = ("198.51.100.1", 5000)
        self.p = self.a.start(Actions(from_fresh=[self.b_addr]))
        self.stamper = wire.Stamper(self.w.clock)

    def inject(self, message, key_id=M.session_key_id(SID, "b"), key=KEY, src=None):
        data = wire.seal(message, key_id, key, self.stamper())
        self.w.net.send(src or self.b_addr, self.a.local, data)
        self.w.advance(0.01)
        return data

    def test_forged_replayed_and_foreign_frames_ignored(self):
        self.inject(M.Probe(1, 0), key=bytes(32))  # wrong key
        self.inject(M.Probe(1, 0), key_id=M.session_key_id(SID, "a"))  # our own key ID
        self.inject(M.Probe(1, 0), key_id=M.session_key_id(bytes(16), "b"))  # another session
        self.inject(M.Welcome(), key_id="alice", key=bytes(32))  # a forged lobby answer
        self.inject(M.ProbeAck(1, 0), src=LOBBY, key_id="alice",
                    key=self.a.client.key)  # the lobby does not ack probes
        self.assertEqual(self.a.result, [])
        data = self.inject(M.Data(b"early"))
        self.assertEqual(self.a.result, [(self.a.fresh, self.b_addr)])
        self.assertEqual(self.a.session.early, [b"early"])
        # The same frame again is a replay: not kept twice.
        self.w.net.send(self.b_addr, self.a.local, data)
        self.w.advance(0.01)
        self.assertEqual(self.a.session.early, [b"early"])
        drops = self.a.client.metrics
        for reason, n in (("bad-mac", 2), ("unknown-key", 3), ("replay", 1)):
            self.assertEqual(drops.value("p2pnat_udp_dropped_total", reason=reason), n, reason)

    def test_probe_answered_from_the_socket_it_reached(self):
        self.inject(M.Probe(3, 2))
        acks = [(s.src, s.dst, decode(s.data)) for s in self.w.net.sent
                if isinstance(decode(s.data)[1], M.ProbeAck)]
        # The probe that makes the path is acknowledged twice (each copy
        # lost on its own: the peer may not probe again from that socket).
        self.assertEqual(acks, [(self.a.local, self.b_addr,
                                 (M.session_key_id(SID, "a"), M.ProbeAck(3, 2, self.b_addr)))]
                         * punch_module.ACK_COPIES)
        self.assertEqual(punch_module.ACK_COPIES, 2)
        self.assertEqual(len({s.data for s in self.w.net.sent
                              if isinstance(decode(s.data)[1], M.ProbeAck)}), 2)  # own stamps
        self.assertEqual(self.a.result, [(self.a.fresh, self.b_addr)])
        # A probe from another address after success is not answered (nor followed).
        self.inject(M.Probe(3, 3), src=("198.51.100.1", 5001))
        self.assertEqual(len([1 for s in self.w.net.sent
                              if isinstance(decode(s.data)[1], M.ProbeAck)]), 2)
