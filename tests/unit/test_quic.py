"""
Tests for L{p2pnat.quic} over real loopback UDP sockets in the reactor:
bulk streams, services, datagrams, refused certificates, forged and
replayed packets, and a peer whose address changes mid-transfer.
"""

import hashlib
import os
import socket
import sys
from unittest import SkipTest

from twisted.internet import defer, error, protocol, reactor, task
from twisted.trial.unittest import TestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol, SendTo, no_fragmentation
from p2pnat.protocol import wire
from p2pnat.quic import Credentials, HandshakeFailed, QuicSocket, StreamRefused
from p2pnat.quic.connection import MAX_DATAGRAM_PAYLOAD
from tests.support.quic import Deployment, QuicPair, SinkFactory, Source, payload

#: Bytes of the bulk test, both ways.  20 MB by default, as the mission
#: asks; P2PNAT_QUIC_BULK_MB lowers it on a machine too slow for that (the
#: benchmark bench/quic_bulk.py measures speed).
BULK = int(float(os.environ.get("P2PNAT_QUIC_BULK_MB", "20")) * 1_000_000)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class UDPForwarder(protocol.DatagramProtocol):
    """
    Sits between alice and bob: what alice sends to it goes to bob from one
    of its outgoing sockets, what bob answers there comes back to alice.
    L{switch} moves to a new outgoing socket: to bob, alice's address
    changed (a NAT rebinding).
    """

    def __init__(self, target):
        self.target = target
        self.client = None
        self.outs = []
        self.out = None

    def switch(self):
        out = _Return(self)
        port = reactor.listenUDP(0, out, interface="127.0.0.1")
        self.outs.append(port)
        self.out = out
        return port.getHost().port

    def datagramReceived(self, data, addr):
        self.client = addr
        self.out.transport.write(data, self.target)

    def stop(self):
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self.outs])


class _Return(protocol.DatagramProtocol):
    def __init__(self, forwarder):
        self.forwarder = forwarder

    def datagramReceived(self, data, addr):
        if self.forwarder.client is not None:
            self.forwarder.transport.write(data, self.forwarder.client)


class BulkTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_bulk_both_ways(self):
        """
        A stream carries BULK bytes to the peer, which sends each back;
        both ends see exactly the bytes sent (sha256), and the stream ends
        cleanly on both sides after the half-close.
        """
        echo = SinkFactory(echo=True)
        pair = QuicPair(self, reactor, services={"echo": echo})
        endpoint = yield pair.connect()
        data = payload(BULK)
        source = Source(data)
        endpoint.open_stream("echo", source)
        count, digest, reason = yield (yield echo.built).done
        self.assertEqual((count, digest), (len(data), sha(data)))
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertIsInstance((yield source.done), error.ConnectionDone)
        self.assertEqual((source.received_count, source.received.hexdigest()),
                         (len(data), sha(data)))

    @defer.inlineCallbacks
    def test_two_services(self):
        """
        Two streams on one connection reach the two factories their service
        names pick, each with its own bytes; the acceptor's protocol learns
        the service and the peer's identity from getPeer().
        """
        ssh, http = SinkFactory(), SinkFactory()
        pair = QuicPair(self, reactor, services={"ssh": ssh, "http": http})
        endpoint = yield pair.connect()
        one, two = payload(300_000, seed=1), payload(200_000, seed=2)
        endpoint.open_stream("ssh", Source(one))
        endpoint.open_stream("http", Source(two))
        got_ssh = yield (yield ssh.built).done
        got_http = yield (yield http.built).done
        self.assertEqual(got_ssh[:2], (len(one), sha(one)))
        self.assertEqual(got_http[:2], (len(two), sha(two)))
        self.assertEqual(len(ssh.sinks), 1)
        self.assertEqual(len(http.sinks), 1)
        peer = ssh.sinks[0].addr
        self.assertEqual((str(peer.peer), peer.service), ("client:alice", "ssh"))

    @defer.inlineCallbacks
    def test_unknown_service_refused(self):
        """
        A stream for a service the peer does not serve ends with
        StreamRefused; the connection stays up for other streams.
        """
        echo = SinkFactory(echo=True)
        pair = QuicPair(self, reactor, services={"echo": echo})
        endpoint = yield pair.connect()
        lost = Source(b"hello")
        endpoint.open_stream("nosuch", lost)
        self.assertIsInstance((yield lost.done), StreamRefused)
        source = Source(b"still here")
        endpoint.open_stream("echo", source)
        self.assertIsInstance((yield source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(b"still here"))


class DatagramTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_datagrams_both_ways(self):
        """
        RFC 9221 datagrams go both ways, at the largest size allowed too;
        a larger one is refused at once.
        """
        pair = QuicPair(self, reactor)
        alice = yield pair.connect()
        yield sleep(0)  # bob's side learns the connection is up
        bob = pair.b_endpoints[0]
        bob.on_datagram = bob.send_datagram  # an echo
        got = []
        alice.on_datagram = got.append
        wanted = [b"ping %d" % i for i in range(20)] + [b"x" * MAX_DATAGRAM_PAYLOAD]
        for _ in range(50):  # UDP may lose some: send again what is missing
            for d in wanted:
                if d not in got:
                    alice.send_datagram(d)
            yield sleep(0.05)
            if set(wanted) <= set(got):
                break
        self.assertTrue(set(wanted) <= set(got))
        self.assertRaises(ValueError, alice.send_datagram, b"x" * (MAX_DATAGRAM_PAYLOAD + 1))


class RefusalTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def assertRefused(self, pair, expected, peer="client:bob"):
        d = pair.connect(peer)
        failure = yield self.assertFailure(d, HandshakeFailed)
        self.assertIn(expected, str(failure))
        # Nothing ever reached the accepting side's application.
        self.assertEqual(pair.b_endpoints, [])
        return failure

    @defer.inlineCallbacks
    def test_client_from_another_ca(self):
        """
        A client whose certificate another CA issued is refused by the
        listener; the client hears why.
        """
        other = Deployment("another CA").client("alice")
        ours = Deployment()
        # Alice trusts our CA (for bob) but presents another CA's certificate.
        alice = Credentials(other.cert, other.key, (ours.ca_cert,))
        pair = QuicPair(self, reactor, deployment=ours, a_creds=alice)
        failure = yield self.assertRefused(pair, "not issued by this deployment's CA")
        self.assertIn("the peer refused the connection", str(failure))

    @defer.inlineCallbacks
    def test_server_from_another_ca(self):
        """A listener whose certificate another CA issued is refused."""
        other = Deployment("another CA")
        pair = QuicPair(self, reactor, b_creds=other.client("bob"))
        failure = yield self.assertRefused(pair, "we refused the peer")
        self.assertIn("not issued by this deployment's CA", str(failure))

    @defer.inlineCallbacks
    def test_wrong_name(self):
        """
        A peer with a good certificate that names someone else than the
        peer we meant to reach is refused, and the error names both.
        """
        pair = QuicPair(self, reactor)
        failure = yield self.assertRefused(pair, "names client:bob, expected client:carol",
                                           peer="client:carol")
        self.assertIn("we refused the peer", str(failure))

    @defer.inlineCallbacks
    def test_listener_expects_someone_else(self):
        """
        A listener that accepts only dave refuses alice, and alice is told
        that her certificate was refused.
        """
        pair = QuicPair(self, reactor, b_accepts=("client:dave",))
        failure = yield self.assertRefused(pair, "names client:alice, expected client:dave")
        self.assertIn("the peer refused the connection", str(failure))

    @defer.inlineCallbacks
    def test_device_identity(self):
        """A device certificate (as ``p2pnat device add`` issues) is a peer too."""
        deployment = Deployment()
        pair = QuicPair(self, reactor, deployment=deployment,
                        b_creds=deployment.device("cam1"))
        endpoint = yield pair.connect("device:cam1")
        self.assertEqual(str(endpoint.peer), "device:cam1")


class ForgeryTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_forged_and_replayed_packets_do_nothing(self):
        """
        Random bytes with a QUIC short header and bob's connection ID, and
        packets alice sent, replayed from another address and from hers,
        change nothing: no stream, no datagram, bob keeps sending to alice,
        and a transfer afterwards is intact.
        """
        echo = SinkFactory(echo=True)
        pair = QuicPair(self, reactor, services={"echo": echo})
        captured = []
        write = pair.a.write
        pair.a.write = lambda data, addr: (captured.append(data), write(data, addr))[1]
        alice = yield pair.connect()
        source = Source(b"first")
        alice.open_stream("echo", source)
        yield source.done
        alice.send_datagram(b"once")
        yield sleep(0.1)
        bob = pair.b_endpoints[0]
        got = []
        bob.on_datagram = got.append
        alice_addr = bob.peer_address
        cid = next(iter(bob._cids))

        mallory = protocol.DatagramProtocol()
        port = reactor.listenUDP(0, mallory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        rng = payload(200 * 1200, seed=7)
        for i in range(200):
            forged = bytes([0x40 | (rng[i] & 0x3F)]) + cid + rng[i * 1200:i * 1200 + 1100]
            mallory.transport.write(forged, pair.b_addr)
        for data in captured:
            mallory.transport.write(data, pair.b_addr)  # from another address
            pair.a.transport.write(data, pair.b_addr)  # from alice's own
        yield sleep(0.3)

        self.assertEqual(len(echo.sinks), 1)
        self.assertEqual(got, [])
        self.assertEqual(bob.peer_address, alice_addr)
        source = Source(payload(500_000))
        alice.open_stream("echo", source)
        self.assertIsInstance((yield source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(source.data))
        self.assertEqual(len(echo.sinks), 2)


class PathChangeTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_peer_port_changes_mid_transfer(self):
        """
        Alice reaches bob through a forwarder that switches to a new source
        port in the middle of a transfer (her NAT rebinding): bob follows
        her to the new address and the bytes arrive intact both ways.
        """
        echo = SinkFactory(echo=True)
        pair = QuicPair(self, reactor, services={"echo": echo})
        forwarder = UDPForwarder(pair.b_addr)
        first = forwarder.switch()
        fport = reactor.listenUDP(0, forwarder, interface="127.0.0.1")
        self.addCleanup(forwarder.stop)
        self.addCleanup(fport.stopListening)
        alice = yield pair.a.connect(("127.0.0.1", fport.getHost().port), "client:bob")
        data = payload(4_000_000)
        source = Source(data)
        alice.open_stream("echo", source)
        while source.offset < len(data) // 3:
            yield sleep(0.01)
        bob = pair.b_endpoints[0]
        self.assertEqual(bob.peer_address[1], first)
        second = forwarder.switch()
        self.assertIsInstance((yield source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(data))
        self.assertEqual(echo.sinks[0].hash.hexdigest(), sha(data))
        self.assertEqual(bob.peer_address[1], second)

    @defer.inlineCallbacks
    def test_client_moves_to_another_socket(self):
        """
        Alice moves her connection to a new local socket (a new port) in
        the middle of a transfer and closes the old one: the transfer
        completes intact and bob sends to her new address.
        """
        echo = SinkFactory(echo=True)
        pair = QuicPair(self, reactor, services={"echo": echo})
        alice = yield pair.connect()
        data = payload(4_000_000)
        source = Source(data)
        alice.open_stream("echo", source)
        while source.offset < len(data) // 3:
            yield sleep(0.01)
        new = type(pair.a)(reactor, pair.a.credentials)
        new_port = pair.listen(new)
        alice.move_to(new)
        yield pair.a_port.stopListening()
        self.assertIsInstance((yield source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(data))
        bob = pair.b_endpoints[0]
        self.assertEqual(bob.peer_address[1], new_port.getHost().port)
        self.assertIn(alice, new.endpoints)


class _Collect(protocol.DatagramProtocol):
    def __init__(self):
        self.received = []

    def datagramReceived(self, data, addr):
        self.received.append(data)


class SendToTests(TestCase):
    """L{p2pnat.net.udp.SendTo}, the send path of QUIC's sockets, on loopback."""

    def setUp(self):
        self.sink = _Collect()
        sink_port = reactor.listenUDP(0, self.sink, interface="127.0.0.1")
        self.port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sink_port.stopListening)
        self.addCleanup(self.port.stopListening)
        self.addr = ("127.0.0.1", sink_port.getHost().port)

    @defer.inlineCallbacks
    def test_sends_as_port_write(self):
        """
        Datagrams arrive in order, the first checked by Twisted and the
        next ones sent directly; what Twisted refuses is refused every time
        (a host name, an address of the other family), and an oversized
        datagram to a known address raises MessageLengthError as
        Port.write does.
        """
        sendto = SendTo()
        for i in range(5):
            sendto(self.port, b"%d" % i, self.addr)
        for bad in (("localhost", self.addr[1]), ("::1", self.addr[1])):
            for _ in range(2):
                self.assertRaises(error.InvalidAddressError, sendto, self.port, b"x", bad)
        self.assertRaises(error.MessageLengthError, sendto, self.port, b"x" * 70000, self.addr)
        for _ in range(50):
            if len(self.sink.received) == 5:
                break
            yield sleep(0.01)
        self.assertEqual(self.sink.received, [b"0", b"1", b"2", b"3", b"4"])

    def test_other_transports_write(self):
        """A transport that is not a Twisted UDP port gets write() for every datagram."""
        written = []

        class Transport:
            def write(self, data, addr):
                written.append((data, addr))

        sendto, transport = SendTo(), Transport()
        for i in range(3):
            sendto(transport, b"%d" % i, self.addr)
        self.assertEqual(written, [(b"%d" % i, self.addr) for i in range(3)])


class FragmentationTests(TestCase):
    """QUIC's sockets never let IP fragment their datagrams (RFC 9000 section 14)."""

    def test_quic_socket_sets_probe_mode(self):
        """
        A QuicSocket's UDP socket has the don't-fragment bit on and ignores
        learnt path MTUs (Linux IP_PMTUDISC_PROBE), so that a path MTU probe
        too large for the path is lost instead of sent in fragments.
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("Linux socket option")
        creds = Deployment().client("alice")
        quic = QuicSocket(reactor, creds)
        port = reactor.listenUDP(0, quic, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_IP, 10), 3)

    def test_control_socket_sets_probe_mode(self):
        """The same for a path's socket (a ControlProtocol), which carries direct QUIC."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("Linux socket option")
        proto = ControlProtocol(None, reactor, Metrics("test"), wire.ReplayGuard(reactor))
        port = reactor.listenUDP(0, proto, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_IP, 10), 3)

    def test_without_socket(self):
        """A transport without a socket (a path's, a test's) is left alone."""
        self.assertFalse(no_fragmentation(object()))
