"""
Tests for L{p2pnat.quic} across address changes and against packets that
must do nothing, on a simulated network and a L{task.Clock}:

- the listening side's NAT rebinds (its packets come from a new public
  port): the connecting side, whose aioquic would drop them, follows it
  (L{p2pnat.quic.connection.PeerConnection.receive_datagram});
- each side's NAT rebinds in turn during one transfer;
- a genuine packet raced from another address costs a path validation
  and nothing else;
- forged packets (random bytes with bit 0x40, a well-formed packet under
  another connection's keys) and replayed ones: no state change, no
  answer bigger than what came in, no exception, a counted drop.
"""

import hashlib

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.quic import connection as quic_connection
from tests.support.quic import QuicPair, SinkFactory, Source, payload
from tests.support.udp import SimNat
from tests.unit.test_quic_sim import OPTIONS, SimTestCase

MALLORY = ("203.0.113.66", 4444)


def sha(data):
    return hashlib.sha256(data).hexdigest()


class RebindTestCase(SimTestCase):

    def pair(self, a_nat=None, b_nat=None):
        """
        Alice (connects) and bob (listens, echoes), each on a private
        address behind its own NAT if one is given: bob opens his NAT's
        mapping toward alice first, as a punch would.
        """
        pair = QuicPair(self, self.clock, net=self.net, deployment=self.deployment,
                        services={"echo": SinkFactory(echo=True)},
                        a_options=OPTIONS, b_options=OPTIONS)
        for nat, ip, attr, sock in ((a_nat, "10.0.0.2", "a_port", pair.a),
                                    (b_nat, "10.0.1.2", "b_port", pair.b)):
            if nat is not None:
                self.net.nats[ip] = nat
                getattr(pair, attr).stopListening()
                self.clock.advance(0)
                setattr(pair, attr, pair.listen(sock, ip=ip))
        a_host = pair.a_port.getHost()
        b_host = pair.b_port.getHost()
        alice_public = a_nat.outbound((a_host.host, a_host.port), (b_nat.ip, 0)) \
            if a_nat is not None and b_nat is not None else None
        b_addr = (b_host.host, b_host.port)
        if b_nat is not None:
            # Bob's mapping toward alice (endpoint-independent: the same port
            # for anyone), as his punch would open it.
            target = alice_public or (a_host.host, a_host.port)
            b_addr = (b_nat.ip, b_nat.outbound(b_addr, target)[1])
        d = pair.a.connect(b_addr, "client:bob")
        self.run_for(0.3)
        return pair, self.successResultOf(d), pair.b_endpoints[0]

    def transfer(self, alice, size, during):
        """Echo C{size} bytes through bob; call C{during()} a third of the way."""
        data = payload(size)
        source = Source(data)
        alice.open_stream("echo", source)
        while source.offset < size // 3:
            self.run_for(0.01)
        during()
        self.run_for(8)
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(data))


class ListenerRebindTests(RebindTestCase):

    def test_listener_nat_rebinds_mid_transfer(self):
        """
        Bob (who listened) is behind a NAT that forgets its mappings in the
        middle of a transfer: his packets then come from a new public port,
        which alice's aioquic, a QUIC client, would ignore (and her packets
        to the old port are dropped by his NAT).  Alice follows him, after
        authenticating his packet, and the echo completes intact.
        """
        nat = SimNat("198.51.100.7", filtering="endpoint-independent",
                     allocation="sequential", base=31000)
        _, alice, _ = self.pair(b_nat=nat)
        before = alice.peer_address
        self.assertEqual(before, ("198.51.100.7", 31000))
        self.transfer(alice, 2_000_000, nat.forget)
        self.assertEqual(alice.peer_address, ("198.51.100.7", 31001))
        self.assertEqual(alice.connection.peer_moves, 1)
        self.assertTrue(alice.connection._network_paths[0].is_validated)

    def test_each_side_rebinds_in_turn(self):
        """
        Both peers behind NATs (endpoint-independent, so each reaches the
        other's new port): alice's NAT rebinds, then bob's, during one
        transfer; both follow and the bytes arrive intact.
        """
        a_nat = SimNat("198.51.100.1", filtering="endpoint-independent",
                       allocation="sequential", base=30000)
        b_nat = SimNat("198.51.100.7", filtering="endpoint-independent",
                       allocation="sequential", base=31000)
        _, alice, bob = self.pair(a_nat=a_nat, b_nat=b_nat)

        def both():
            a_nat.forget()
            self.run_for(0.5)
            b_nat.forget()

        self.transfer(alice, 3_000_000, both)
        self.assertEqual(alice.peer_address, ("198.51.100.7", 31001))
        self.assertEqual(bob.peer_address[0], "198.51.100.1")
        self.assertNotEqual(bob.peer_address[1], 30000)

    def test_raced_packet_costs_a_validation(self):
        """
        Mallory, on the path, sends one of bob's genuine packets to alice
        from her own address before bob's copy arrives: alice moves there,
        sends a PATH_CHALLENGE that mallory cannot answer, and is back on
        bob's validated address with his next packet; the transfer is
        intact and alice sent mallory little (the anti-amplification bound:
        at most three times what came from her).
        """
        _, alice, _ = self.pair()
        bob_addr = alice.peer_address
        self.net.listen(MALLORY[0], _Recorder(), MALLORY[1])
        mallory = self.net.ports[MALLORY]
        raced = []

        def lose(src, dst, data):
            if raced == [None] and src == bob_addr and not data[0] & 0x80:
                raced[0] = data
                mallory.write(data, dst)
                return True
            return False

        self.net.lose = lose
        self.transfer(alice, 1_000_000, lambda: raced.append(None))
        self.assertIsNotNone(raced[0])
        self.assertEqual(alice.peer_address, bob_addr)
        self.assertEqual(alice.connection._network_paths[0].addr, bob_addr)
        to_mallory = sum(len(s.data) for s in self.net.sent if s.dst == MALLORY)
        self.assertGreaterEqual(alice.connection.peer_moves, 2)  # there and back
        self.assertLessEqual(to_mallory, 3 * len(raced[0]))


class _Recorder:
    """A bare datagram protocol that keeps what it receives."""

    def __init__(self):
        self.received = []

    def makeConnection(self, transport):
        self.transport = transport

    def datagramReceived(self, data, addr):
        self.received.append((data, addr))

    def doStop(self):
        pass


class ForgedPacketTests(RebindTestCase):
    """Packets that must do nothing, to either side, from anywhere."""

    def setUp(self):
        super().setUp()
        self.pair_, self.alice, self.bob = self.pair()
        self.captured = {"a": [], "b": []}
        for who, sock in (("a", self.pair_.a), ("b", self.pair_.b)):
            write = sock.write

            def capture(data, addr, write=write, who=who):
                if not data[0] & 0x80:  # 1-RTT packets
                    self.captured[who].append(data)
                write(data, addr)

            sock.write = capture
        source = Source(payload(50_000))
        self.alice.open_stream("echo", source)
        self.run_for(1)
        self.assertEqual(source.received.hexdigest(), sha(source.data))
        self.mallory = self.net.listen(MALLORY[0], _Recorder(), MALLORY[1])

    def state(self, endpoint):
        conn = endpoint.connection
        return ([p.addr for p in conn._network_paths], endpoint.peer_address,
                conn.peer_moves, sorted(conn._streams), conn.host_cid,
                conn._peer_cid.cid)

    def inject(self, packets, sources):
        """
        Deliver C{packets} to both peers from each of C{sources} (``"peer"``:
        the other peer's own address) and check that they did nothing.
        """
        for endpoint, sock in ((self.alice, self.pair_.a), (self.bob, self.pair_.b)):
            before = self.state(endpoint)
            dropped = sock.dropped.get("unauthenticated", 0)
            sent = len(self.net.sent)
            count = size = 0
            for packet in packets(endpoint):
                for source in sources:
                    sock.datagramReceived(
                        packet, endpoint.peer_address if source == "peer" else MALLORY)
                    count += 1
                    size += len(packet)
                    self.clock.advance(0)  # what it makes the endpoint send at once
            answers = self.net.sent[sent:]
            self.assertEqual(self.state(endpoint), before)
            self.assertEqual(sock.dropped.get("unauthenticated", 0) - dropped, count)
            self.assertNotIn("internal-error", sock.dropped)
            self.assertEqual([s for s in answers if s.dst == MALLORY], [])
            self.assertLessEqual(sum(len(s.data) for s in answers), size)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_random_bytes_with_the_fixed_bit(self):
        """
        Random bytes after a short-header first byte (bit 0x40) and the
        receiver's own connection ID, from mallory and from the peer's
        address: dropped, counted, nothing else.
        """
        rng = payload(20 * 1200, seed=3)

        def packets(endpoint):
            cid = endpoint.connection.host_cid
            return [bytes([0x40 | (rng[i] & 0x3F)]) + cid + rng[i * 1200:i * 1200 + 1000]
                    for i in range(20)]

        self.inject(packets, ["mallory", "peer"])

    def test_packet_under_another_key(self):
        """
        Well-formed 1-RTT packets of another connection (same deployment,
        same peers' names), readdressed to this connection's ID: the
        header parses and the keys are wrong; dropped, counted.
        """
        other = QuicPair(self, self.clock, net=self.net, deployment=self.deployment,
                         services={"echo": SinkFactory(echo=True)},
                         a_options=OPTIONS, b_options=OPTIONS)
        foreign = []
        write = other.a.write
        other.a.write = lambda data, addr: (foreign.append(data), write(data, addr))[1]
        d = other.connect()
        self.run_for(0.3)
        carol = self.successResultOf(d)
        carol.open_stream("echo", Source(payload(20_000)))
        self.run_for(0.5)
        short = [p for p in foreign if not p[0] & 0x80]
        self.assertGreater(len(short), 3)

        def packets(endpoint):
            cid = endpoint.connection.host_cid
            return [p[:1] + cid + p[1 + len(cid):] for p in short]

        self.inject(packets, ["mallory", "peer"])

    def test_replayed_packets(self):
        """
        Every 1-RTT packet the peer sent, sent again from its address and
        from mallory's: duplicates, dropped and counted; the connection
        still carries a transfer intact afterwards.
        """
        self.inject(lambda endpoint: list(
            self.captured["b" if endpoint is self.alice else "a"]), ["mallory", "peer"])
        source = Source(payload(200_000, seed=9))
        self.alice.open_stream("echo", source)
        self.run_for(2)
        self.assertEqual(source.received.hexdigest(), sha(source.data))


class InternalsTests(SynchronousTestCase):
    """What following the peer relies on in aioquic is there."""

    def test_internals_named(self):
        """
        check_internals looks for every aioquic internal the address
        following uses, and fails, naming it, when one is missing.
        """
        for name in ("_payload_received", "_network_paths", "_add_network_path",
                     "_use_reserved_peer_cid", "_spaces", "_is_client", "_send_probe"):
            self.assertIn(name, quic_connection._CONNECTION_INTERNALS)
        quic_connection.check_internals()  # the installed aioquic has them

        class Gone:
            def __init__(self, addr):
                self.addr = addr

        self.patch(quic_connection._connection, "QuicNetworkPath", Gone)
        quic_connection.check_internals.cache_clear()
        self.addCleanup(quic_connection.check_internals.cache_clear)
        e = self.assertRaises(quic_connection.QuicUnavailable,
                              quic_connection.check_internals)
        self.assertIn("QuicNetworkPath.validation_deadline", str(e))
