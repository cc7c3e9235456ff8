"""
Direct sessions in memory: the L{wire.DirectConnectRequest} codec, the
relay's P2P-Direct header and offers (on a L{Clock}, with the terminal
tests' L{World}), the agent's handling of the request (notify flags,
forged and repeated requests, offers, punches, who its QUIC server
answers), and the terminal's reading of the offer.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.agent import direct as A
from p2pnat.agent.notifier import Notifier
from p2pnat.peer import direct as D
from p2pnat.protocol import wire
from p2pnat.relay.core import DirectLimits
from p2pnat.relay.terminal_machine import parse_direct_address
from tests.unit.test_relay_terminal import KEY, World, status

DID = bytes(range(16))
SECRET = bytes(range(100, 116))


class CodecTests(SynchronousTestCase):
    def test_round_trip(self):
        for terminal in (("198.51.100.9", 40001), ("2001:db8::9", 1)):
            m = wire.DirectConnectRequest(DID, SECRET, "ssh", terminal)
            data = wire.seal(m, "cam", KEY, 5)
            frame, back = wire.unseal(data, lambda k, t: KEY)
            self.assertEqual((frame.type, back), (0x16, m))

    def test_malformed_bodies_refused(self):
        good = wire.DirectConnectRequest(DID, SECRET, "ssh", ("198.51.100.9", 4)).encode_body()
        bad = [good[:20], good[:33], good + b"\0", good[:32] + b"\x05ssh" + good[36:],
               good[:33] + b"s h" + good[36:],
               wire.DirectConnectRequest(DID, SECRET, "", ("198.51.100.9", 0)).encode_body()]
        for body in bad:
            with self.assertRaises(wire.WireError, msg=body):
                wire.DirectConnectRequest.decode_body(body)

    def test_forged_mac_dropped(self):
        data = bytearray(wire.seal(wire.DirectConnectRequest(DID, SECRET, "", ("1.2.3.4", 5)),
                                   "cam", KEY, 5))
        data[-20] ^= 1  # the body's last byte: the terminal's port
        with self.assertRaises(wire.WireError) as e:
            wire.unseal(bytes(data), lambda k, t: KEY)
        self.assertEqual(e.exception.reason, "bad-mac")

    def test_secret_masked(self):
        masked = wire.mask_secret(KEY, DID, SECRET)
        self.assertNotEqual(masked, SECRET)
        self.assertEqual(wire.mask_secret(KEY, DID, masked), SECRET)
        # Another offer (another ID) masks it otherwise.
        self.assertNotEqual(wire.mask_secret(KEY, bytes(16), SECRET), masked)


class HeaderTests(SynchronousTestCase):
    """The relay's reading of P2P-Direct and its answer."""

    def setUp(self):
        self.w = World(self, direct_limits=DirectLimits(per_source=1, per_device=100))
        self.w.add("cam")
        self.w.relay.notified("cam", wire.DIRECT_CAPABLE)

    def connect(self, header=None, device="cam"):
        extra = f"P2P-Direct: {header}\r\n".encode() if header is not None else b""
        return self.w.terminal(f"CONNECT {device}:ssh HTTP/1.1\r\nHost: {device}\r\n".encode()
                               + extra + b"\r\n")

    def sent(self, kind):
        return [(wire.unseal(data, lambda k, t: KEY)[1], addr) for data, addr, k
                in self.w.socket.sent if k == kind]

    def answer(self, t):
        w = self.w
        tun = w.tunnel("cam", session=w.session())
        tun.dataReceived(b"")
        return t.transport.value().split(b"\r\n\r\n")[0]

    def test_absent_header_is_today(self):
        t = self.connect()
        self.assertEqual(self.sent("DirectConnectRequest"), [])
        self.assertEqual(self.answer(t), b"HTTP/1.1 200 Connection established")

    def test_bad_address_refused(self):
        for bad in ("nonsense", "198.51.100.9", "198.51.100.9:0", "198.51.100.9:70000",
                    "0.0.0.0:5", "224.0.0.1:5", "2001:db8::1:5", "host.example:5"):
            t = self.connect(bad)
            self.assertEqual(status(t.transport), 400, bad)
        self.assertEqual(self.sent("DirectConnectRequest"), [])

    def test_offer_sent_and_answered(self):
        t = self.connect("198.51.100.9:40001")
        (m, addr), = self.sent("DirectConnectRequest")
        self.assertEqual((m.service, m.terminal, addr),
                         ("ssh", ("198.51.100.9", 40001), ("203.0.113.5", 40000)))
        secret = wire.mask_secret(KEY, m.direct_id, m.secret)
        hint = b"P2P-Direct: 203.0.113.5:40000; secret=" + secret.hex().encode()
        # At once, before the tunnel: an interim answer with the offer ...
        self.assertEqual(t.transport.value(), b"HTTP/1.1 103 Early Hints\r\n" + hint
                         + b"\r\n\r\n")
        self.assertEqual(D.parse_offer(t.transport.value()), (("203.0.113.5", 40000), secret))
        t.transport.clear()
        # ... which the 200 repeats once the tunnel is up.
        self.assertEqual(self.answer(t), b"HTTP/1.1 200 Connection established\r\n" + hint)
        # A second copy goes out a moment later, for a lost first one.
        self.w.clock.advance(0.3)
        self.assertEqual(len(self.sent("DirectConnectRequest")), 2)

    def test_not_the_terminals_address_ignored(self):
        t = self.connect("198.51.100.10:40001")
        self.assertEqual(self.sent("DirectConnectRequest"), [])
        self.assertEqual(self.answer(t), b"HTTP/1.1 200 Connection established")

    def test_only_to_devices_that_take_it(self):
        self.w.relay.notified("cam", wire.ACK_REQUESTED)  # a notify without the flag
        t = self.connect("198.51.100.9:40001")
        self.assertEqual(self.sent("DirectConnectRequest"), [])
        self.assertEqual(self.answer(t), b"HTTP/1.1 200 Connection established")

    def test_rate_limited_per_source(self):
        for _ in range(3):
            self.connect("198.51.100.9:40001")
        # Bursts of twice the rate (1/s): two offers, then none.
        self.assertEqual(len(self.sent("DirectConnectRequest")), 2)
        self.w.clock.advance(1.0)
        self.connect("198.51.100.9:40001")
        self.assertEqual(len(self.sent("DirectConnectRequest")), 2 * 2 + 1)

    def test_only_after_authorization(self):
        self.w.add("safe", mode="relay", credential="correct horse battery")
        self.w.relay.notified("safe", wire.DIRECT_CAPABLE)
        t = self.connect("198.51.100.9:40001", device="safe")
        self.assertEqual(status(t.transport), 401)
        self.assertEqual(self.sent("DirectConnectRequest"), [])

    def test_address_parsing(self):
        self.assertEqual(parse_direct_address(" [2001:db8::1]:5 "), ("2001:db8::1", 5))
        self.assertEqual(parse_direct_address("198.51.100.9:65535"), ("198.51.100.9", 65535))


class FakeProto:
    """The agent's notify socket, as the notifier and the direct server use it."""

    def __init__(self):
        self.sent = []
        self.transport = self

    def send(self, data, addr, kind):
        self.sent.append((data, addr, kind))

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", "0.0.0.0", 4000)


class NotifierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.directs = []
        self.n = Notifier("cam", KEY, ("192.0.2.1", 7478), self.clock,
                          on_direct=lambda m, addr, proto: self.directs.append(m))
        self.proto = FakeProto()
        self.n.proto = self.proto

    def request(self, stamp):
        m = wire.DirectConnectRequest(DID, SECRET, "", ("198.51.100.9", 4))
        return wire.seal(m, "cam", KEY, stamp)

    def deliver(self, data):
        frame = wire.parse(data)
        key = self.n.key_for(frame.key_id, frame.type)
        if key is None:
            return "unknown-key"
        message = frame.open(key)
        self.n.handle(frame, message, ("192.0.2.1", 7478), self.proto)
        return message

    def test_notifies_say_it_takes_direct_requests(self):
        self.n.notify_a()
        self.n.notify_b(wire.ACK_REQUESTED)
        flags = [wire.parse(data).flags for data, _, _ in self.proto.sent]
        self.assertEqual(flags, [wire.DIRECT_CAPABLE, wire.DIRECT_CAPABLE | wire.ACK_REQUESTED])

    def test_without_direct_nothing_changes(self):
        n = Notifier("cam", KEY, ("192.0.2.1", 7478), self.clock)
        n.proto = self.proto
        n.notify_a()
        self.assertEqual(wire.parse(self.proto.sent[0][0]).flags, 0)
        frame = wire.parse(self.request(1))
        self.assertIsNone(n.key_for(frame.key_id, frame.type))

    def test_each_offer_acted_on_once(self):
        now = int(self.clock.seconds() * 1e6)
        self.deliver(self.request(now))
        self.deliver(self.request(now + 1))  # the relay's second copy
        self.assertEqual(len(self.directs), 1)
        self.assertEqual(self.directs[0].terminal, ("198.51.100.9", 4))


class SessionsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.s = A.DirectSessions(self.clock, ttl=30, limit=2)

    def test_single_use(self):
        self.s.add(DID, SECRET, "", ("198.51.100.9", 4))
        self.assertIsNone(self.s.take(bytes(16)))
        offer = self.s.take(SECRET)
        self.assertEqual(offer.terminal, ("198.51.100.9", 4))
        self.assertIsNone(self.s.take(SECRET))
        self.assertTrue(self.s.allows("198.51.100.9"))  # its stream runs
        self.s.finish(offer)
        self.assertFalse(self.s.allows("198.51.100.9"))

    def test_limit_and_expiry(self):
        self.assertIsNotNone(self.s.add(b"a" * 16, SECRET, "", ("198.51.100.9", 4)))
        self.assertIsNone(self.s.add(b"a" * 16, SECRET, "", ("198.51.100.9", 4)))
        self.assertIsNotNone(self.s.add(b"b" * 16, SECRET, "", ("198.51.100.9", 4)))
        self.assertIsNone(self.s.add(b"c" * 16, SECRET, "", ("198.51.100.9", 4)))
        self.clock.advance(30)
        self.assertFalse(self.s.allows("198.51.100.9"))
        self.assertIsNone(self.s.take(SECRET))
        self.assertIsNotNone(self.s.add(b"c" * 16, SECRET, "", ("198.51.100.9", 4)))


class FakeAgent:
    def __init__(self, clock):
        self.clock = clock
        self.local_services = {"": ("127.0.0.1", 80), "ssh": ("127.0.0.1", 22)}
        self.notifier = Notifier("cam", KEY, ("192.0.2.1", 7478), clock)


class ServerTests(SynchronousTestCase):
    def setUp(self):
        from tests.support.quic import Deployment

        self.clock = Clock()
        self.server = A.DirectServer(FakeAgent(self.clock), Deployment().device("cam"))
        self.proto = FakeProto()
        self.addCleanup(self.server.stop)

    def request(self, service="ssh", did=DID):
        return wire.DirectConnectRequest(did, wire.mask_secret(KEY, did, SECRET), service,
                                         ("198.51.100.9", 40001))

    def test_punches_only_to_the_signed_address(self):
        self.server.requested(self.request(), ("192.0.2.1", 7478), self.proto)
        self.clock.pump([0.1] * 12)
        self.assertEqual([(d, a) for d, a, k in self.proto.sent],
                         [(A.PUNCH, ("198.51.100.9", 40001))] * len(A.PUNCH_SCHEDULE))
        self.assertEqual(self.server.sessions.take(SECRET).service, "ssh")

    def test_unknown_service_no_offer(self):
        self.server.requested(self.request("nope"), ("192.0.2.1", 7478), self.proto)
        self.clock.pump([0.1] * 12)
        self.assertEqual((self.proto.sent, len(self.server.sessions)), ([], 0))

    def test_quic_only_from_offered_terminals(self):
        self.server.requested(self.request(), ("192.0.2.1", 7478), self.proto)
        quic = self.server._sockets[self.proto]
        initial = bytes([0xC0]) + bytes(1199)
        self.server.quic_received(initial, ("203.0.113.66", 5), self.proto)
        self.assertEqual(quic.dropped, {"not-offered": 1})
        self.server.quic_received(initial, ("198.51.100.9", 5), self.proto)
        # Past the filter: QUIC itself reads it (and drops it: it is no real Initial).
        self.assertEqual(quic.dropped["not-offered"], 1)
        self.assertEqual(sum(quic.dropped.values()), 2)
        # What went out: the punches alone, never an answer to the stranger.
        self.assertTrue(all(a == ("198.51.100.9", 40001) for _, a, _ in self.proto.sent))

    def test_session_limit(self):
        for i in range(A.MAX_SESSIONS + 2):
            self.server.requested(self.request(did=bytes([i]) * 16), ("192.0.2.1", 7478),
                                  self.proto)
        self.assertEqual(len(self.server.sessions), A.MAX_SESSIONS)


class TerminalTests(SynchronousTestCase):
    def test_budget(self):
        self.assertEqual(D.budget(None), 0.5)
        self.assertEqual(D.budget(0.01), 0.5)
        self.assertAlmostEqual(D.budget(0.3), 1.2)

    def test_request_header(self):
        self.assertEqual(D.request_header(("198.51.100.9", 4)), "P2P-Direct: 198.51.100.9:4")
        self.assertEqual(D.request_header(("2001:db8::1", 4)), "P2P-Direct: [2001:db8::1]:4")

    def test_offer_parsing(self):
        ok = b"HTTP/1.1 200 OK\r\np2p-direct: [2001:db8::1]:9; secret=" + SECRET.hex().encode()
        self.assertEqual(D.parse_offer(ok), (("2001:db8::1", 9), SECRET))
        for bad in (b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\nP2P-Direct: 1.2.3.4:9",
                    b"HTTP/1.1 200 OK\r\nP2P-Direct: 1.2.3.4:9; secret=abcd",
                    b"HTTP/1.1 200 OK\r\nP2P-Direct: 1.2.3.4:0; secret=" + SECRET.hex().encode(),
                    b"HTTP/1.1 200 OK\r\nP2P-Direct: x:9; secret=" + SECRET.hex().encode()):
            self.assertIsNone(D.parse_offer(bad), bad)

    def test_history_backs_off(self):
        clock = Clock()
        h = D.History(clock, first=60, longest=200)
        self.assertFalse(h.skip("cam"))
        h.failed("cam")
        self.assertTrue(h.skip("cam"))
        self.assertFalse(h.skip("other"))
        clock.advance(60)
        self.assertFalse(h.skip("cam"))  # tried again: fails again, skipped twice as long
        h.failed("cam")
        clock.advance(119)
        self.assertTrue(h.skip("cam"))
        clock.advance(1)
        h.failed("cam")
        clock.advance(199)
        self.assertTrue(h.skip("cam"))  # at most 200 s
        clock.advance(1)
        self.assertFalse(h.skip("cam"))
        h.failed("cam")
        h.worked("cam")
        self.assertFalse(h.skip("cam"))


class _Endpoint:
    """A QUIC endpoint stand-in: C{closed}, C{silent}, and what L{close} was told."""

    def __init__(self):
        from twisted.internet import defer

        self.closed = defer.Deferred()
        self.silent = False
        self.closes = []

    def close(self, reason="closed"):
        self.closes.append(reason)
        if not self.closed.called:
            self.closed.callback(None)


class EarlyAndReuseTests(SynchronousTestCase):
    def test_early_bytes_bounded_and_passed_on(self):
        early = D.EarlyBytes(limit=4)
        seen = []
        self.assertTrue(early.write(b"ab"))
        early.listener = seen.append
        self.assertFalse(early.write(b"cd"))  # at the limit: the writer pauses
        self.assertEqual((early.data, seen), (b"abcd", [b"cd"]))

    def socket(self):
        clock = Clock()
        sock = D.DirectSocket(clock, ())
        sock.families[4].port = object()
        sock.users = 1
        return clock, sock

    def test_parked_connection_reused_once_then_closed(self):
        clock, sock = self.socket()
        ep = _Endpoint()
        sock.park(ep, "cam", ("198.51.100.9", 4))
        got = []
        sock.connect(("198.51.100.9", 4), "cam", 1.0).addCallback(got.append)
        self.assertEqual(got, [ep])  # no handshake: the parked one
        self.assertEqual(sock._parked, {})
        sock.park(ep, "cam", ("198.51.100.9", 4))
        clock.advance(D.REUSE_IDLE)
        self.assertEqual((ep.closes, sock._parked), (["idle"], {}))

    def test_one_parked_per_device_and_address(self):
        clock, sock = self.socket()
        first, second = _Endpoint(), _Endpoint()
        sock.park(first, "cam", ("198.51.100.9", 4))
        sock.park(second, "cam", ("198.51.100.9", 4))
        self.assertEqual((first.closes, second.closes), ([], ["stream done"]))
        first.close("by the device")  # closed meanwhile: forgotten
        self.assertEqual(sock._parked, {})
        self.assertEqual(clock.getDelayedCalls(), [])


class _Port:
    """A UDP port stand-in: what was written, and when."""

    def __init__(self, reactor, proto, interface):
        self.reactor = reactor
        self.interface = interface
        self.sent = []  # (seconds, data, addr)
        self.open = True
        proto.makeConnection(self)

    def write(self, data, addr):
        self.sent.append((self.reactor.seconds(), data, addr))

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", self.interface, 4000)

    def stopListening(self):
        self.open = False


class _UdpClock(Clock):
    """A L{Clock} with L{_Port}s for C{listenUDP}, and a name resolver that knows one name."""

    def __init__(self, names=None):
        super().__init__()
        self.ports = []
        self.names = names or {}
        self.nameResolver = self

    def listenUDP(self, port, proto, interface=""):
        self.ports.append(_Port(self, proto, interface))
        return self.ports[-1]

    def resolveHostName(self, receiver, host, port=0, addressTypes=None, transportSemantics="TCP"):
        from twisted.internet.address import IPv4Address, IPv6Address

        receiver.resolutionBegan(None)
        for ip in self.names.get(host, ()):
            receiver.addressResolved((IPv6Address if ":" in ip else IPv4Address)("UDP", ip, port))
        receiver.resolutionComplete()


def _stun_answer(request, mapped):
    """The relay's STUN answer to C{request}: we are at C{mapped}."""
    from p2pnat.protocol import stun

    return stun.answer_binding(request, mapped)


class FirstFlightTests(SynchronousTestCase):
    """
    A new QUIC connection to a device sends its first flight again, as it
    is, a few times within about one RTT to the relay, until the device
    answers; its initial RTT (hence its first probe timeout) comes from
    that RTT too.
    """

    def setUp(self):
        from tests.support.quic import Deployment

        self.clock = _UdpClock()
        self.sock = D.DirectSocket(self.clock, (Deployment().ca_cert,))
        self.addCleanup(self.sock.stop)

    def connect(self, addr=("198.51.100.9", 4), rtt=0.02):
        self.sock.acquire()
        self.sock.connect(addr, "cam", 5.0, rtt).addErrback(lambda f: None)
        self.clock.advance(0)
        return self.clock.ports[-1]

    def test_schedule(self):
        self.assertEqual(D.first_flight_schedule(0.02), (0.005, 0.01, 0.02))
        self.assertEqual(D.first_flight_schedule(0.001), (0.002, 0.004, 0.006))
        self.assertEqual(D.first_flight_schedule(None), (0.025, 0.05, 0.1))
        self.assertEqual([D.initial_rtt(r) for r in (None, 0.001, 0.05, 1.0)],
                         [0.1, 0.025, 0.05, 0.1])

    def test_copies_until_the_device_answers(self):
        port = self.connect()
        [(t, first, addr)] = port.sent
        self.assertEqual((t, addr, len(first)), (0, ("198.51.100.9", 4), 1200))
        self.clock.pump([0.005, 0.005, 0.01])
        self.assertEqual(port.sent[1:], [(0.005, first, addr), (0.01, first, addr),
                                         (0.02, first, addr)])
        # Then QUIC's own probe, at twice the initial RTT (the floor, 25 ms):
        # a new packet, not a copy.
        [conn] = [e.connection for e in self.sock.families[4].quic.endpoints]
        self.assertEqual(conn._configuration.initial_rtt, D.INITIAL_RTT[0])
        self.clock.advance(0.1)
        self.assertNotIn(first, [data for _, data, _ in port.sent[4:]])

    def test_an_answer_stops_the_copies(self):
        port = self.connect(rtt=0.04)
        self.clock.advance(0.01)
        self.assertEqual(len(port.sent), 2)
        # Anything QUIC from the device (this one is no packet it can read).
        self.sock.families[4].quic.datagramReceived(bytes([0xC0]) + bytes(1199), ("198.51.100.9", 4))
        self.clock.advance(0.03)
        self.assertEqual(len(port.sent), 2)

    def test_device_drops_exact_copies_quietly(self):
        copies = A.Copies(limit=2)
        initial, short = bytes([0xC0]) + bytes(1199), bytes([0x40]) + bytes(50)
        self.assertFalse(copies.repeated(initial, ("198.51.100.9", 4)))
        self.assertTrue(copies.repeated(initial, ("198.51.100.9", 4)))
        self.assertFalse(copies.repeated(initial, ("198.51.100.9", 5)))  # another sender
        self.assertFalse(copies.repeated(short, ("198.51.100.9", 4)))  # QUIC's own business
        self.assertFalse(copies.repeated(short, ("198.51.100.9", 4)))
        self.assertFalse(copies.repeated(bytes([0xC1]) + bytes(1199), ("198.51.100.9", 4)))
        self.assertFalse(copies.repeated(initial, ("198.51.100.9", 4)))  # forgotten: limit 2


class FamilyTests(SynchronousTestCase):
    """
    The terminal's direct sockets are one per address family: STUN and QUIC
    to an IPv6 address go from an IPv6 socket; the CONNECT asks for a
    direct session with the mapping of the relay connection's family.
    """

    def test_a_socket_per_family(self):
        clock = _UdpClock()
        sock = D.DirectSocket(clock, ())
        sock.acquire()
        sock.mapping(("2001:db8::1", 7478)).addErrback(lambda f: None)
        sock.mapping(("192.0.2.1", 7478)).addErrback(lambda f: None)
        six, four = clock.ports
        self.assertEqual((six.interface, four.interface), ("::", "0.0.0.0"))
        self.assertEqual([a for _, _, a in six.sent], [("2001:db8::1", 7478)])
        self.assertEqual([a for _, _, a in four.sent], [("192.0.2.1", 7478)])
        sock.release()  # unused: both closed
        self.assertEqual((six.open, four.open), (False, False))
        clock.advance(D.STUN_TIMEOUT)

    def test_relay_addresses_one_per_family(self):
        clock = _UdpClock({"relay.test": ["192.0.2.1", "2001:db8::1", "2001:db8::2",
                                          "192.0.2.2"]})
        found = []
        D.Direct(None, ("relay.test", 7478)).relay_addresses(clock).addCallback(found.append)
        D.Direct(None, ("192.0.2.7", 7478)).relay_addresses(clock).addCallback(found.append)
        D.Direct(None, ("nowhere.test", 7478)).relay_addresses(clock).addCallback(found.append)
        self.assertEqual(found, [[("2001:db8::1", 7478), ("192.0.2.1", 7478)],
                                 [("192.0.2.7", 7478)], []])

    def request_over(self, peer_ip, names):
        """
        One direct-first connect over a relay connection from C{peer_ip}, the
        relay's UDP name resolving to C{names}, every STUN Binding answered:
        the CONNECT request it sends.
        """
        from twisted.internet import protocol
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.internet.testing import StringTransport

        clock = _UdpClock({"relay.test": names})
        sock = D.DirectSocket(clock, ())
        peer = (IPv6Address if ":" in peer_ip else IPv4Address)("TCP", peer_ip, 443)
        transport = StringTransport(peerAddress=peer)

        class Relay:
            def connect(self, factory):
                proto = factory.buildProtocol(peer)
                proto.makeConnection(transport)
                return protocol.defer.succeed(proto)

        ep = D.DirectFirstEndpoint(clock, Relay(), "cam", direct=D.Direct(
            sock, ("relay.test", 7478)))
        ep.connect(protocol.Factory.forProtocol(protocol.Protocol)).addErrback(lambda f: None)
        for port in clock.ports:
            for _, data, addr in port.sent:
                mapped = ("2001:db8:9::9" if ":" in addr[0] else "203.0.113.9", 40000)
                quic = sock.families[6 if port.interface == "::" else 4].quic
                quic.datagramReceived(_stun_answer(data, mapped), addr)
        clock.advance(1.0)
        self.addCleanup(clock.advance, 60)
        return transport.value()

    def test_request_in_the_relay_connections_family(self):
        both = ["192.0.2.1", "2001:db8::1"]
        self.assertIn(b"P2P-Direct: [2001:db8:9::9]:40000\r\n",
                      self.request_over("2001:db8::77", both))
        self.assertIn(b"P2P-Direct: 203.0.113.9:40000\r\n",
                      self.request_over("192.0.2.77", both))
        self.assertIn(b"P2P-Direct: 203.0.113.9:40000\r\n",
                      self.request_over("::ffff:192.0.2.77", both))

    def test_no_address_of_that_family_relayed_as_before(self):
        request = self.request_over("2001:db8::77", ["192.0.2.1"])
        self.assertIn(b"CONNECT cam HTTP/1.1", request)
        self.assertNotIn(b"P2P-Direct", request)


class RelayUdpDefaultTests(SynchronousTestCase):
    """
    Without a relay UDP address given, the direct path asks the relay's
    host on port 7478, an IPv6 one included (whose ``host:7478`` text
    would be ambiguous).
    """

    def setUp(self):
        from p2pnat.deployment import pki
        from tests.support.quic import Deployment

        self.ca = self.mktemp()
        with open(self.ca, "wb") as f:
            f.write(pki.cert_pem(Deployment().ca_cert))

    def test_forward(self):
        import argparse

        from p2pnat.cli.forward import direct_of

        for host in ("2001:db8::1", "192.0.2.1", "relay.test"):
            args = argparse.Namespace(device_ca=None, ca=self.ca, no_direct=False,
                                      relay_udp=None)
            self.assertEqual(direct_of(MemoryReactorClock(), args, host).relay_udp, (host, 7478))
        args.relay_udp = "[2001:db8::2]:9"
        self.assertEqual(direct_of(MemoryReactorClock(), args, "relay.test").relay_udp, ("2001:db8::2", 9))

    def test_endpoint(self):
        from twisted.internet.endpoints import clientFromString

        ep = clientFromString(MemoryReactorClock(), f"p2pnat:device=cam:relay=[2001\\:db8\\:\\:1]\\:8443"
                                       f":ca={self.ca}")
        self.assertEqual(ep.direct.relay_udp, ("2001:db8::1", 7478))
