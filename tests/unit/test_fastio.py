"""
The lean TCP/TLS data path (p2pnat.net.fastio), over real loopback sockets:
against itself and against Twisted's own TLS, with certificates checked
both ways, large transfers under back-pressure, and clean closes.
"""

import hashlib
import os

from OpenSSL import crypto
from twisted.internet import defer, endpoints, error, reactor, ssl, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pnat.deployment import pki
from p2pnat.net import fastio

HOST = "relay.test"


def _pair(ca_cert, ca_key, cert, key):
    return (crypto.load_privatekey(crypto.FILETYPE_PEM, pki.key_pem(key)),
            crypto.load_certificate(crypto.FILETYPE_PEM, pki.cert_pem(cert)))


class _PKI:
    """A CA, the relay's certificate, a device's, and a stranger CA's device."""

    def __init__(self):
        self.ca_cert, self.ca_key = pki.create_ca()
        self.server = _pair(self.ca_cert, self.ca_key,
                            *pki.issue_server_cert(self.ca_cert, self.ca_key, HOST))
        self.device = _pair(self.ca_cert, self.ca_key,
                            *pki.issue_device_cert(self.ca_cert, self.ca_key, "dev1"))
        other_ca, other_key = pki.create_ca("other CA")
        self.stranger = _pair(other_ca, other_key,
                              *pki.issue_device_cert(other_ca, other_key, "dev1"))
        self.ca = crypto.load_certificate(crypto.FILETYPE_PEM, pki.cert_pem(self.ca_cert))

    def server_options(self, mutual=True, tickets=False):
        key, cert = self.server
        if mutual:
            return ssl.CertificateOptions(privateKey=key, certificate=cert, verify=True,
                                          caCerts=[self.ca], requireCertificate=True,
                                          enableSessionTickets=tickets)
        return ssl.CertificateOptions(privateKey=key, certificate=cert,
                                      acceptableProtocols=[b"http/1.1"])

    def client_options(self, hostname=HOST, which="device"):
        key, cert = getattr(self, which)
        mine = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(cert), ssl.KeyPair(key))
        return ssl.optionsForClientTLS(hostname, trustRoot=ssl.Certificate(self.ca),
                                       clientCertificate=mine)


_CERTS = None


def certs():
    global _CERTS
    if _CERTS is None:
        _CERTS = _PKI()
    return _CERTS


class Echo(Protocol):
    """Server side: echoes, remembers the peer's certificate and ALPN."""

    def connectionMade(self):
        fastio.write_through(self.transport)
        self.factory.made.append(self)

    def dataReceived(self, data):
        self.factory.seen.append(data)
        self.transport.write(data)
        if self.factory.close_after and data.endswith(b"BYE"):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.lost.append(reason)


class EchoFactory(Factory):
    protocol = Echo
    noisy = False

    def __init__(self, close_after=False):
        self.made = []
        self.lost = []
        self.seen = []
        self.close_after = close_after


class Collector(Protocol):
    """Client side: sends C{payload} in pieces, collects what comes back."""

    def __init__(self, payload=b"", expect=None, chunk=64 * 1024):
        self.payload = payload
        self.expect = len(payload) if expect is None else expect
        self.chunk = chunk
        self.got = []
        self.count = 0
        self.done = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        # Written before the handshake is over: kept and sent after it.
        for i in range(0, len(self.payload), self.chunk):
            self.transport.write(self.payload[i:i + self.chunk])
        if not self.payload:
            self.done.callback(b"")

    def dataReceived(self, data):
        self.got.append(data)
        self.count += len(data)
        if self.count >= self.expect and not self.done.called:
            self.done.callback(b"".join(self.got))

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(None)  # lost before all came back
        self.lost.callback(_Reason(reason))


class _Reason:
    """A connection's end reason, as a Deferred result (a Failure would errback)."""

    def __init__(self, failure):
        self.failure = failure

    def check(self, *types):
        return self.failure.check(*types)

    def __repr__(self):
        return repr(self.failure)


class OneShot(Factory):
    noisy = False

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class TLSTests(TestCase):
    timeout = 60

    def listen(self, factory, server_fast=True, mutual=True, tickets=False):
        options = certs().server_options(mutual, tickets)
        cls = fastio.TLSFactory if server_fast else TLSMemoryBIOFactory
        port = reactor.listenTCP(0, cls(options, False, factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def connect(self, port, proto, client_fast=True, sessions=None, options=None, **kw):
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        options = options or certs().client_options(**kw)
        ep = fastio.wrap_client(options, ep, sessions) if client_fast else \
            endpoints.wrapClientTLS(options, ep)
        d = ep.connect(OneShot(proto))

        def close(_):
            if proto.transport is not None and proto.transport.connected:
                proto.transport.abortConnection()
                return proto.lost

        self.addCleanup(close, None)
        return d

    @defer.inlineCallbacks
    def roundtrip(self, server_fast, client_fast, size):
        server = EchoFactory()
        port = self.listen(server, server_fast)
        payload = os.urandom(size)
        proto = Collector(payload)
        connected = yield self.connect(port, proto, client_fast)
        self.assertIs(connected, proto)
        got = yield proto.done
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        # The server saw the device's certificate.
        peer = server.made[0].transport.getPeerCertificate()
        self.assertEqual(pki.device_id_of(peer), "dev1")
        transport = proto.transport
        if client_fast:
            self.assertIsInstance(transport, fastio._TLS)
        else:
            self.assertNotIsInstance(transport, fastio._TLS)
        transport.loseConnection()
        reason = yield proto.lost
        self.assertTrue(reason.check(error.ConnectionDone), reason)

    def test_fast_both_ends(self):
        return self.roundtrip(True, True, 100)

    def test_fast_server_stock_client(self):
        return self.roundtrip(True, False, 100)

    def test_stock_server_fast_client(self):
        return self.roundtrip(False, True, 100)

    def test_large_transfer_with_back_pressure(self):
        """8 MiB each way, written at once: buffered, paused, and all delivered intact."""
        return self.roundtrip(True, True, 8 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_session_resumed_and_peer_certificate_kept(self):
        """
        With a SessionCache the next connection resumes the last session (a
        TLS 1.3 ticket): no certificate is sent again, yet the server still
        reads the device's certificate from the session, which is what the
        relay checks against its registry after every handshake.
        """
        server = EchoFactory()
        port = self.listen(server, tickets=True)
        cache = fastio.SessionCache()
        options = certs().client_options()
        reused = []
        for i in range(3):
            proto = Collector(b"ping %d" % i)
            yield self.connect(port, proto, sessions=cache, options=options)
            got = yield proto.done
            self.assertEqual(got, b"ping %d" % i)
            reused.append(fastio._EarlyData.resumed(proto.transport._tls))
            peer = server.made[i].transport.getPeerCertificate()
            self.assertEqual(pki.device_id_of(peer), "dev1")
            self.assertIsNotNone(cache.session)
            proto.transport.loseConnection()
            yield proto.lost
        self.assertEqual(reused, [False, True, True])

    @defer.inlineCallbacks
    def test_half_rtt_only_after_a_resumed_client_hello(self):
        """
        A half_rtt server tells its protocol (tlsResumed, with the ALPN
        names offered) between a resumed ClientHello and the client's
        Finished, and what the protocol writes then reaches the client with
        the server's handshake flight.  After a full handshake the client is
        not yet authenticated, and the protocol is not told.
        """
        resumed = []

        class Early(Echo):
            def tlsResumed(self, offered):
                self.factory.window = self.transport._tls_handshaking  # before the Finished
                resumed.append((offered, self.transport.getPeerCertificate()))
                self.transport.write(b"early:")

        server = EchoFactory()
        server.protocol = Early
        options = certs().server_options(True, True)
        port = reactor.listenTCP(0, fastio.TLSFactory(options, False, server, half_rtt=True),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        cache = fastio.SessionCache()
        client_options = certs().client_options()
        got = []
        for i in range(3):
            proto = Collector(b"x%d" % i, expect=(2 if i == 0 else 8))
            ep = fastio.wrap_client(client_options, endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", port.getHost().port), cache, alpn=[b"p2pt1.test"])
            yield ep.connect(OneShot(proto))
            got.append((yield proto.done))
            proto.transport.loseConnection()
            yield proto.lost
        self.assertEqual(got, [b"x0", b"early:x1", b"early:x2"])
        self.assertEqual([offered for offered, cert in resumed], [(b"p2pt1.test",)] * 2)
        self.assertEqual([pki.device_id_of(cert) for offered, cert in resumed], ["dev1"] * 2)
        self.assertTrue(server.window)

    @defer.inlineCallbacks
    def test_no_resumption_without_tickets(self):
        """A server that issues no tickets gets full handshakes, and they work."""
        server = EchoFactory()
        port = self.listen(server, tickets=False)
        cache = fastio.SessionCache()
        options = certs().client_options()
        for i in range(2):
            proto = Collector(b"ping")
            yield self.connect(port, proto, sessions=cache, options=options)
            yield proto.done
            self.assertFalse(fastio._EarlyData.resumed(proto.transport._tls))
            proto.transport.loseConnection()
            yield proto.lost

    @defer.inlineCallbacks
    def test_alpn(self):
        server = EchoFactory()
        port = self.listen(server, mutual=False)
        proto = Collector(b"x")
        ep = fastio.wrap_client(ssl.optionsForClientTLS(
            HOST, trustRoot=ssl.Certificate(certs().ca), acceptableProtocols=[b"http/1.1"]),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        yield ep.connect(OneShot(proto))
        yield proto.done
        self.assertEqual(server.made[0].transport.negotiatedProtocol, b"http/1.1")
        self.assertEqual(proto.transport.negotiatedProtocol, b"http/1.1")
        proto.transport.loseConnection()
        yield proto.lost

    @defer.inlineCallbacks
    def refused(self, data, **kw):
        """
        Connect to an echo server as a client whose handshake must fail
        (C{kw}: its L{connect} settings), writing C{data} at once: check
        that no byte went either way, and return why the client's
        connection ended.
        """
        server = EchoFactory()
        proto = Collector(data)
        yield self.connect(self.listen(server), proto, **kw)
        reason = yield proto.lost
        # What the client wrote before the handshake failed was never sent
        # (given the time to arrive, were it sent).
        yield deferLater(reactor, 0.1)
        self.assertEqual(server.seen, [])
        self.assertEqual(proto.count, 0)
        return reason

    @defer.inlineCallbacks
    def test_wrong_hostname_refused(self):
        """service-identity's check, through Twisted's client options, stops the connection."""
        reason = yield self.refused(b"secret bytes", hostname="other.test")
        from service_identity import VerificationError

        self.assertTrue(reason.check(VerificationError), reason)

    @defer.inlineCallbacks
    def test_client_certificate_from_another_ca_refused(self):
        reason = yield self.refused(b"hello", which="stranger")
        self.assertFalse(reason.check(error.ConnectionDone), reason)

    @defer.inlineCallbacks
    def test_server_closes_cleanly(self):
        server = EchoFactory(close_after=True)
        port = self.listen(server)
        proto = Collector(b"hello BYE")
        yield self.connect(port, proto)
        got = yield proto.done
        self.assertEqual(got, b"hello BYE")
        reason = yield proto.lost
        self.assertTrue(reason.check(error.ConnectionDone), reason)

    def test_not_tcp_uses_twisted_tls(self):
        """A transport that is not a TCP connection gets TLSMemoryBIOProtocol."""
        factory = fastio.TLSFactory(certs().server_options(False), False, EchoFactory())
        starter = factory.buildProtocol(None)
        transport = StringTransport()
        starter.makeConnection(transport)
        self.assertIsInstance(starter.app, TLSMemoryBIOProtocol)
        self.assertNotIsInstance(transport, fastio._TLS)


class WriteThroughTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_large_writes_all_delivered(self):
        server = EchoFactory()
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        payload = os.urandom(4 * 1024 * 1024)
        proto = Collector(payload, chunk=1024 * 1024)
        yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            OneShot(proto))
        got = yield proto.done
        self.assertEqual(got, payload)
        self.assertIn("WriteThrough", type(server.made[0].transport).__name__)
        proto.transport.loseConnection()
        yield proto.lost

    def test_other_transports_left_alone(self):
        transport = StringTransport()
        self.assertFalse(fastio.write_through(transport))
        self.assertIs(type(transport), StringTransport)

    def test_rejects_text(self):
        import socket

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        from twisted.internet import tcp

        conn = tcp.Connection(a, Protocol(), reactor)
        conn.connected = 1
        self.assertTrue(fastio.write_through(conn))
        self.assertRaises(TypeError, conn.write, "text")
        conn.write(b"bytes")
        self.assertEqual(b.recv(10), b"bytes")
        conn.socket = None  # not registered with the reactor: nothing to clean


class FeatureCheckTests(TestCase):
    """fastio.supported() and the switch: what they check, and what they change."""

    def setUp(self):
        fastio._reset()
        self.addCleanup(fastio._reset)

    def probe(self):
        probe = fastio._probe_connection()
        self.addCleanup(probe.socket.close)
        return probe

    def test_available_with_these_libraries(self):
        """The libraries this suite runs on have all the fast path needs (scripts/test-newest)."""
        self.assertIsNone(fastio.supported())
        self.assertIsNone(fastio.early_data_supported())
        self.assertTrue(fastio.active())

    def test_missing_internal_named(self):
        probe = self.probe()
        del probe._tempDataLen
        self.assertEqual(fastio._check_tcp(probe),
                         "twisted.internet.tcp.Connection has no _tempDataLen")

    def test_internal_of_another_kind_named(self):
        probe = self.probe()
        probe.dataBuffer = []
        self.assertEqual(fastio._check_tcp(probe),
                         "twisted.internet.tcp.Connection.dataBuffer is a list, not bytes")

    def test_method_gone(self):
        probe = self.probe()
        self.patch(type(probe), "doRead", None)
        self.assertIn("doRead is not a method", fastio._check_tcp(probe))

    def test_probe_class_unchanged(self):
        probe = self.probe()
        self.assertIsNone(fastio._check_tcp(probe))
        self.assertIs(type(probe), tcp.Connection)

    def test_switched_off(self):
        """configure(False): stock TLS factories, endpoints and transports."""
        self.assertFalse(fastio.configure(False))
        factory = fastio.TLSFactory(certs().server_options(False), False, EchoFactory(),
                                    half_rtt=True)
        self.assertFalse(factory.half_rtt)
        self.assertIsInstance(factory.buildProtocol(None), TLSMemoryBIOProtocol)
        ep = fastio.wrap_client(certs().client_options(), endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", 1), fastio.SessionCache())
        self.assertNotIsInstance(ep, fastio._ClientEndpoint)
        import socket

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertFalse(fastio.write_through(tcp.Connection(a, Protocol(), reactor)))
        self.assertTrue(fastio.configure(True))


class SessionOfAnotherContextTests(TestCase):
    timeout = 60
    listen = TLSTests.listen
    connect = TLSTests.connect

    @defer.inlineCallbacks
    def test_session_of_other_options_dropped(self):
        """
        A cached session made with other TLS options (another context),
        which pyOpenSSL refuses to resume: the connection does a full
        handshake instead of failing, and caches its own session.
        """
        server = EchoFactory()
        port = self.listen(server, tickets=True)
        cache = fastio.SessionCache()
        for i in range(2):
            proto = Collector(b"ping %d" % i)
            yield self.connect(port, proto, sessions=cache, options=certs().client_options())
            self.assertEqual((yield proto.done), b"ping %d" % i)
            self.assertFalse(fastio._EarlyData.resumed(proto.transport._tls))
            proto.transport.loseConnection()
            yield proto.lost
        self.assertIsNotNone(cache.session)


class SessionCachesTests(SynchronousTestCase):
    """A client of several servers keeps each server's session apart, for the latest few."""

    def test_one_cache_per_server(self):
        caches = fastio.SessionCaches(limit=2)
        a = caches.for_server("n1.example", 443)
        a.session = "ticket of n1"
        b = caches.for_server("n2.example", 443)
        self.assertIsNot(a, b)
        self.assertIsNone(b.session)
        self.assertIs(caches.for_server("N1.example", 443), a)
        self.assertIsNot(caches.for_server("n1.example", 8443), a)

    def test_bounded_least_recently_used_first(self):
        caches = fastio.SessionCaches(limit=2)
        a = caches.for_server("a", 1)
        caches.for_server("b", 1)
        caches.for_server("a", 1)  # a used again: b is the oldest
        caches.for_server("c", 1)
        self.assertEqual(len(caches), 2)
        self.assertIs(caches.for_server("a", 1), a)
