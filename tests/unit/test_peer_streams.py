"""
QUIC streams over the P2P path (L{p2pnat.peer.streams}), on a simulated
internet and a test clock (the lobby's real logic, clients behind
simulated NATs, from L{tests.unit.test_peer_client}): streams on a direct
path and on the lobby's relay (which must never see the plaintext), the
identity the accepting side requires, the fragments that carry QUIC
through the relay, and a path that changes or closes under a connection.
"""

import hashlib

from twisted.internet import error, protocol
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.net.udp import ControlProtocol
from p2pnat.peer import streams as S
from p2pnat.protocol import p2p as M
from p2pnat.protocol import stun
from p2pnat.quic import HandshakeFailed
from tests.support.quic import Deployment, SinkFactory, Source, payload
from tests.unit.test_peer_client import CONE, HOSTS, LOBBY, RANDOM, World, kind

#: A known plaintext the lobby must never see.
MARKER = b"PLAINTEXT-MARKER-7f3a9c"


class Peers:
    """A World with alice and bob logged in, and certificates for both (and more)."""

    def __init__(self, testcase, nat_a=CONE, nat_b=CONE, **client_options):
        self.testcase = testcase
        self.w = World(testcase)
        self.deployment = Deployment(now=self.w.clock.seconds())
        self.alice = self.w.client("alice", nat_a, **client_options)
        self.bob = self.w.client("bob", nat_b)
        self.sinks = SinkFactory(echo=True)
        self.accepted = []
        self.streams = []
        testcase.addCleanup(self.close)

    def creds(self, name):
        return self.deployment.client(name)

    def connect(self):
        """alice's path to bob, and bob's side of it."""
        path = self.w.connect("alice", "bob")
        self.testcase.assertNotIsInstance(path, Exception)
        self.w.advance(0.5)
        return path, self.w.incoming["bob"][-1]

    def quic(self, path, incoming, a_creds=None, b_creds=None):
        """Open QUIC over the path pair; the result of connect_streams (or its failure)."""
        b = S.accept_streams(incoming, b_creds or self.creds("bob"), {"echo": self.sinks},
                             on_connection=self.accepted.append)
        self.streams.append(b)
        results = []
        S.connect_streams(path, a_creds or self.creds("alice")).addBoth(results.append)
        self.w.advance(2)
        self.testcase.assertTrue(results, "the QUIC handshake did not end")
        if isinstance(results[0], S.PathStreams):
            self.streams.append(results[0])
        return results[0], b

    def transfer(self, a, data):
        """Send C{data} on a stream to bob's echo; return what came back (hash, count)."""
        source = Source(data)
        a.open_stream("echo", source)
        done = []
        source.done.addBoth(done.append)
        for _ in range(200):
            if done:
                break
            self.w.advance(0.5, step=0.002)
        self.testcase.assertTrue(done, "the transfer did not finish")
        self.testcase.assertIsInstance(done[0], error.ConnectionDone)
        return source.received.hexdigest(), source.received_count

    def close(self):
        for s in self.streams:
            s.close("test over")
        self.w.advance(1)


def quic_packets(sent):
    return [s for s in sent if stun.demux(s.data) is stun.Kind.QUIC]


class DirectTests(SynchronousTestCase):
    def test_stream_both_ways_direct(self):
        """
        On a direct path, QUIC runs on the punched sockets themselves: a
        stream's bytes go to bob's service and back intact, and not one
        QUIC packet passes the lobby.
        """
        p = Peers(self)
        path, incoming = p.connect()
        self.assertEqual((path.mode, incoming.mode), ("direct", "direct"))
        before = len(p.w.net.sent)
        a, b = p.quic(path, incoming)
        self.assertIsInstance(a, S.PathStreams)
        self.assertEqual(str(a.endpoint.peer), "client:bob")
        [endpoint] = p.accepted
        self.assertEqual(str(endpoint.peer), "client:alice")
        self.assertIs(b.endpoint, endpoint)
        data = payload(300_000, seed=3)
        digest, count = p.transfer(a, data)
        self.assertEqual((digest, count), (hashlib.sha256(data).hexdigest(), len(data)))
        sink = p.sinks.sinks[0]
        self.assertEqual(sink.hash.hexdigest(), hashlib.sha256(data).hexdigest())
        sent = p.w.net.sent[before:]
        self.assertEqual([s for s in quic_packets(sent) if LOBBY in (s.src, s.dst)], [])
        between = [s for s in quic_packets(sent)
                   if {s.src[0], s.dst[0]} == {HOSTS["alice"][1], HOSTS["bob"][1]}]
        self.assertGreater(len(between), 300)
        self.assertEqual(a.packets_sent["relayed"], 0)
        # The path's own datagrams still pass beside QUIC.
        got = []
        b.on_datagram = got.append
        path.send(b"hello")
        p.w.advance(0.1)
        self.assertEqual(got, [b"hello"])

    def test_other_certificate_refused(self):
        """
        bob accepts only the peer the lobby introduced: alice presenting
        mallory's certificate (same CA) is refused in the handshake, and
        her connect says why; no connection comes up on bob's side.
        """
        p = Peers(self)
        path, incoming = p.connect()
        result, b = p.quic(path, incoming, a_creds=p.creds("mallory"))
        self.assertIsInstance(result.value, HandshakeFailed)
        self.assertIn("names client:mallory, expected client:alice", str(result.value))
        self.assertEqual(p.accepted, [])
        self.assertIsNone(b.endpoint)

    def test_connector_refuses_another_peer(self):
        """alice wants client:bob: a peer presenting carol's certificate is refused."""
        p = Peers(self)
        path, incoming = p.connect()
        result, _ = p.quic(path, incoming, b_creds=p.creds("carol"))
        self.assertIsInstance(result.value, HandshakeFailed)
        self.assertIn("names client:carol, expected client:bob", str(result.value))

    def test_other_deployment_refused(self):
        """A certificate from another CA is refused, whatever it names."""
        p = Peers(self)
        path, incoming = p.connect()
        other = Deployment("other CA", now=p.w.clock.seconds())
        result, _ = p.quic(path, incoming, a_creds=other.client("alice"))
        self.assertIsInstance(result.value, HandshakeFailed)
        self.assertIn("not issued by this deployment's CA", str(result.value))

    def test_path_close_closes_quic_and_untaps(self):
        """
        When the path closes, its QUIC connections end and its sockets'
        ControlProtocols are as they were (no tap left behind).
        """
        p = Peers(self)
        path, incoming = p.connect()
        a, _b = p.quic(path, incoming)
        proto = path.direct[0]
        self.assertIn("datagramReceived", vars(proto))
        closed = []
        a.endpoint.closed.addCallback(closed.append)
        path.close()
        p.w.advance(5)
        self.assertEqual(len(closed), 1)
        self.assertNotIn("datagramReceived", vars(proto))
        self.assertIsNone(a.endpoint)
        self.assertRaises(ConnectionError, a.open_stream, "echo", Source(b""))

    def test_malformed_fragment_dropped(self):
        """A fragment that cannot be one is dropped, counted, and reaches no one."""
        p = Peers(self)
        path, incoming = p.connect()
        _, b = p.quic(path, incoming)
        got = []
        b.on_datagram = got.append
        # In the path's own frames, where fragments travel (path.send would
        # put them in QUIC datagrams now).
        path.send_clear(b"\xff\x00")
        path.send_clear(b"\xff\x00\x01\x21" + bytes(10))  # fragment 2 of 1
        p.w.advance(0.1)
        self.assertEqual((got, b.reassembly.malformed), ([], 2))
        self.assertIsNotNone(b.endpoint)  # the connection is unharmed

    def test_closed_path_refused(self):
        p = Peers(self)
        path, _ = p.connect()
        path.close()
        self.assertRaises(S.StreamsUnavailable, S.PathStreams, path, p.creds("alice"))
        self.failureResultOf(S.connect_streams(path, p.creds("alice")), S.StreamsUnavailable)


class RelayedTests(SynchronousTestCase):
    def test_relayed_stream_unreadable_by_the_lobby(self):
        """
        Two random-port NATs: the lobby relays.  QUIC rides in the path's
        datagrams through it; the stream's bytes arrive intact both ways,
        and nothing the lobby received or sent contains the plaintext.
        """
        p = Peers(self, RANDOM, RANDOM)
        seen = []
        lobby_in = p.w.lobby_proto.datagramReceived
        # The sniffing fake: every datagram the lobby's socket receives.
        p.w.lobby_proto.datagramReceived = lambda data, addr: (seen.append(data),
                                                               lobby_in(data, addr))
        path, incoming = p.connect()
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        a, _b = p.quic(path, incoming)
        self.assertIsInstance(a, S.PathStreams)
        data = MARKER * 8000  # 184 kB, well under the lobby's relay rate in 2 s
        before = len(seen)
        digest, count = p.transfer(a, data)
        self.assertEqual((digest, count), (hashlib.sha256(data).hexdigest(), len(data)))
        relayed = seen[before:]
        self.assertGreater(len(relayed), 2 * len(data) // 1200)
        self.assertFalse([d for d in seen if MARKER in d])
        self.assertFalse([s for s in p.w.net.sent if MARKER in s.data])
        self.assertGreater(a.packets_sent["relayed"], 0)
        self.assertEqual(a.packets_sent["direct"], 0)
        # What the lobby relayed is the path's Data frames, each carrying a fragment.
        out = [s for s in p.w.net.sent if s.src == LOBBY and kind(s.data) == "Data"]
        self.assertGreater(len(out), 2 * len(data) // 1200)

    def test_stream_survives_upgrade_to_direct(self):
        """
        A stream opened while the path is relayed keeps going when a later
        punch makes the path direct: QUIC packets then go direct.
        """
        p = Peers(self, upgrade_interval=20.0)
        blocked = {HOSTS["alice"][1], HOSTS["bob"][1]}
        p.w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        path, incoming = p.connect()
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        a, _b = p.quic(path, incoming)
        collect = Collect()
        a.open_stream("echo", collect)
        first, second = payload(100_000, seed=5), payload(100_000, seed=6)
        collect.transport.write(first)
        p.w.advance(2, step=0.002)
        self.assertEqual(collect.received, first)
        self.assertEqual(a.packets_sent["direct"], 0)
        p.w.net.lose = lambda src, dst, data: False  # the way is open now
        p.w.advance(25)
        self.assertEqual((path.mode, incoming.mode), ("direct", "direct"))
        relayed = a.packets_sent["relayed"]
        collect.transport.write(second)
        collect.transport.loseWriteConnection()
        p.w.advance(3, step=0.002)
        self.assertIsInstance(collect.reason, error.ConnectionDone)
        self.assertEqual(collect.received, first + second)
        self.assertGreater(a.packets_sent["direct"], 50)
        self.assertLess(a.packets_sent["relayed"] - relayed, 5)
        self.assertEqual(len(p.accepted), 1)  # one connection throughout


class Collect(protocol.Protocol):
    """Keeps what it receives and why it was closed."""

    def __init__(self):
        self.received = b""
        self.reason = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason.value


class FragmentTests(SynchronousTestCase):
    def test_round_trip(self):
        packet = payload(1200, seed=7)
        parts = S.fragments(packet, 9)
        self.assertEqual(len(parts), 2)
        self.assertTrue(all(len(x) <= M.MAX_PAYLOAD and x[0] == S.FRAGMENT for x in parts))
        r = S.Reassembly()
        self.assertIsNone(r.add(parts[1]))
        self.assertEqual(r.add(parts[0]), packet)
        self.assertEqual(r.pending, {})
        [small] = S.fragments(b"\x40abc", 10)
        self.assertEqual(r.add(small), b"\x40abc")

    def test_numbers_wrap(self):
        packet = payload(1100)
        r = S.Reassembly()
        parts = S.fragments(packet, 0x10000 + 5)
        self.assertEqual([r.add(x) for x in parts][-1], packet)

    def test_lost_fragments_bounded(self):
        """Packets missing a fragment are forgotten, oldest first, beyond the limit."""
        r = S.Reassembly(limit=4)
        for n in range(10):
            self.assertIsNone(r.add(S.fragments(payload(1200, n), n)[0]))
        self.assertEqual(list(r.pending), [6, 7, 8, 9])
        self.assertEqual(r.add(S.fragments(payload(1200, 9), 9)[1]), payload(1200, 9))

    def test_malformed_dropped(self):
        r = S.Reassembly()
        for bad in (b"", b"\xff\x00", b"\xff\x00\x01\x21data", b"\xff\x00\x01\x00data"):
            self.assertIsNone(r.add(bad))
        self.assertEqual(r.malformed, 4)

    def test_bounds(self):
        self.assertRaises(ValueError, S.fragments, b"", 1)
        self.assertRaises(ValueError, S.fragments, bytes(S.MAX_PACKET + 1), 1)


class TapTests(SynchronousTestCase):
    def test_other_traffic_passes(self):
        """What is not QUIC reaches the ControlProtocol as before the tap."""
        got = []

        class Handler:
            def key_for(self, key_id, mtype):
                return None

        proto = ControlProtocol(Handler(), None, None, None, stun_rate=0)
        proto.datagramReceived = lambda data, addr: got.append(("control", data))
        original = proto.datagramReceived

        class Streams:
            def peer_address(self):
                return ("192.0.2.1", 4000)

            def packet_received(self, data):
                got.append(("quic", data))

        tap = S._Tap.on(proto)
        streams = Streams()
        tap.add(streams)
        proto.datagramReceived(b"\x0cframe", ("192.0.2.1", 4000))
        proto.datagramReceived(b"\x40quic", ("192.0.2.1", 4000, 0, 0))
        proto.datagramReceived(b"\x01stun", ("192.0.2.1", 4000))
        self.assertEqual(got, [("control", b"\x0cframe"), ("quic", b"\x40quic"),
                               ("control", b"\x01stun")])
        tap.remove(streams)
        self.assertIs(proto.datagramReceived, original)
