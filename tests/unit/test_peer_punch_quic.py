"""
The QUIC handshake that rides with a punch (L{p2pnat.peer.punch}): the
companion's packets leave right behind the first probes, to the first
destinations of the plan, and stop once the path is found; the QUIC
datagrams that reach a punch socket before the path exists are kept,
within bounds, for the path's QUIC layer, and only the peer's.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import punch as punch_module
from p2pnat.peer.punch import companion_targets
from p2pnat.protocol.strategy import Actions
from tests.unit.test_peer_punch import World

#: A QUIC long-header packet as far as the first byte tells (an Initial).
INITIAL = bytes([0xC3]) + bytes(1199)


class Companion:
    def __init__(self):
        self.calls = []

    def __call__(self, send, targets):
        self.calls.append((send, list(targets)))


class CompanionTests(SynchronousTestCase):
    def test_rides_behind_the_first_probes_until_the_path(self):
        """
        The companion is called once, right after the first probes, with
        the probed destination; what it sends follows the probe on the
        wire, and nothing it sends after the punch succeeded leaves.
        """
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        b = w.side("bob", "b", "198.51.100.1")
        companion = Companion()
        a.start(Actions(from_fresh=[b.local]), companion=companion)
        [(send, targets)] = companion.calls
        self.assertEqual(targets, [(a.fresh, b.local)])
        self.assertEqual(len(w.probes(src=a.local)), 1)  # the probe went first
        send(INITIAL)
        self.assertEqual([(s.src, s.dst, s.data) for s in w.net.sent[-1:]],
                         [(a.local, b.local, INITIAL)])
        b.start(Actions(from_fresh=[a.local]))
        w.advance(0.05)
        self.assertEqual(a.result, [(a.fresh, b.local)])
        before = len(w.net.sent)
        send(INITIAL)
        self.assertEqual(len(w.net.sent), before)
        self.assertEqual(len(companion.calls), 1)

    def test_low_first_ttl_waits_for_the_second_probe(self):
        """With a low first TTL (probes that must not reach the peer's NAT) it waits a repetition."""
        w = World(self)
        a = w.side("alice", "a", "203.0.113.1")
        companion = Companion()
        a.start(Actions(from_fresh=[("198.51.100.1", 9)], first_ttl=3), companion=companion)
        self.assertEqual(companion.calls, [])
        w.advance(punch_module.REPEAT_FIRST[1] + 0.002)
        self.assertEqual(len(companion.calls), 1)
        self.assertEqual(len(w.probes()), 2)
        a.punch.cancel()

    def test_targets_first_destination_of_each_socket_first(self):
        s1, s2, s3 = object(), object(), object()
        sockets = [(s1, ["d1", "d2", "d3"]), (s2, ["d4"]), (s3, ["d5", "d6"]), (s1, ["c1"])]
        self.assertEqual(companion_targets(sockets, 4),
                         [(s1, "d1"), (s2, "d4"), (s3, "d5"), (s1, "c1")])
        self.assertEqual(companion_targets(sockets, 6),
                         [(s1, "d1"), (s2, "d4"), (s3, "d5"), (s1, "c1"), (s1, "d2"),
                          (s3, "d6")])
        self.assertEqual(companion_targets([(s1, [])], 4), [])


class CaughtTests(SynchronousTestCase):
    def setUp(self):
        self.w = World(self)
        self.a = self.w.side("alice", "a", "203.0.113.1")
        self.b = self.w.side("bob", "b", "198.51.100.1")
        self.stranger = self.w.side("carol", "a", "192.0.2.7")

    def test_peer_quic_before_the_path_is_kept_for_it(self):
        """
        QUIC datagrams from the peer's address that reach the answering
        side before its path (the Initial that rode with the peer's first
        probe, overtaking it) are the punch's C{caught} once the peer's
        probe makes the path; a stranger's are not, and each address gets
        at most CAUGHT_PER_ADDRESS.
        """
        w, a, b = self.w, self.a, self.b
        b.start(Actions(from_fresh=[a.local]))
        for i in range(punch_module.CAUGHT_PER_ADDRESS + 2):
            a.fresh.transport.write(INITIAL[:-1] + bytes([i]), b.local)
        self.stranger.fresh.transport.write(INITIAL, b.local)
        w.advance(0.02)
        self.assertEqual(b.result, [])
        a.start(Actions(from_fresh=[b.local]))
        w.advance(0.05)
        self.assertEqual(b.result, [(b.fresh, a.local)])
        self.assertEqual(b.punch.caught, [
            (b.fresh, INITIAL[:-1] + bytes([i]), a.local)
            for i in range(punch_module.CAUGHT_PER_ADDRESS)])
        # Once the path exists, the punch keeps nothing more.
        a.fresh.transport.write(INITIAL, b.local)
        w.advance(0.02)
        self.assertEqual(len(b.punch.caught), punch_module.CAUGHT_PER_ADDRESS)

    def test_bounded_addresses_and_sizes(self):
        """At most CAUGHT_ADDRESSES sources, and no datagram above CAUGHT_MAX_BYTES."""
        w, b = self.w, self.b
        b.start(Actions(from_fresh=[("203.0.113.1", 9)]))
        for port in range(punch_module.CAUGHT_ADDRESSES + 3):
            proto = self.stranger.client._listen(self.stranger.client)
            proto.transport.write(INITIAL, b.local)
        self.a.fresh.transport.write(INITIAL + bytes(punch_module.CAUGHT_MAX_BYTES), b.local)
        w.advance(0.02)
        self.assertEqual(len(b.punch._caught), punch_module.CAUGHT_ADDRESSES)
        self.assertNotIn((b.fresh, self.a.local), b.punch._caught._held)
        b.punch.cancel()
        self.assertEqual(len(b.punch._caught), 0)
