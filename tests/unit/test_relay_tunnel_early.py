"""
RelayTunnel's early binding (a resumed TLS handshake that names its session
in ALPN): who may be bound early, and the hello that must confirm it.
"""

from OpenSSL import crypto
from twisted.internet.task import Clock
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2pnat.daemon.metrics import Metrics
from p2pnat.deployment import pki
from p2pnat.protocol import tunnel
from p2pnat.relay.core import IRelay, Timeouts
from p2pnat.relay.sessions import SessionTable
from p2pnat.relay.tunnel import RelayTunnel


class _Record:
    def __init__(self, fingerprint, revoked=False):
        self.fingerprint = fingerprint
        self.revoked = revoked

    def accepts(self, fingerprint):
        return fingerprint == self.fingerprint


@implementer(IRelay)
class _Relay:
    """The part of L{IRelay} a tunnel uses before its first stream."""

    def __init__(self, clock):
        self.clock = clock
        self.timeouts = Timeouts()
        self.sessions = SessionTable(clock)
        self.metrics = Metrics("relay")
        self.records = {}

    def count(self, outcome):
        self.metrics.sessions.labels(outcome).inc()

    def registry_record(self, device_id):
        return self.records.get(device_id)

    def claim(self, session_id, device_id, nonce):
        return self.sessions.claim(session_id, device_id, nonce)

    def claim_early(self, session_id, device_id):
        return self.sessions.claim_early(session_id, device_id)

    def tunnel_opened(self, t, session):
        session.ready.callback(t)


class _TLSTransport(StringTransport):
    def __init__(self, cert):
        super().__init__()
        self.cert = cert

    def getPeerCertificate(self):
        return self.cert

    def setTcpNoDelay(self, enabled):
        pass

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class EarlyBindingTests(SynchronousTestCase):
    def setUp(self):
        ca_cert, ca_key = pki.create_ca()
        cert, _ = pki.issue_device_cert(ca_cert, ca_key, "cam")
        self.cert = crypto.load_certificate(crypto.FILETYPE_PEM, pki.cert_pem(cert))
        self.clock = Clock()
        self.relay = _Relay(self.clock)
        self.relay.records["cam"] = _Record(pki.fingerprint(self.cert))
        self.sent = []
        self.session = self.relay.sessions.create("cam", self.sent.append)
        self.bound = []
        self.session.ready.addCallback(self.bound.append)

    def tunnel(self):
        t = RelayTunnel(self.relay)
        t.makeConnection(_TLSTransport(self.cert))
        return t

    def test_bound_early_then_confirmed_by_its_hello(self):
        t = self.tunnel()
        t.tlsResumed([tunnel.alpn_for(self.session.id)])
        self.assertEqual(self.bound, [t])
        self.assertEqual(t.transport.value(), bytes([tunnel.HELLO_OK]))
        self.assertEqual(self.relay.metrics.value("p2pnat_sessions_total",
                                                  outcome="tunnel-half-rtt"), 1)
        t.dataReceived(tunnel.hello(self.session.id, self.session.nonce))
        self.assertFalse(getattr(t.transport, "aborted", False))
        self.assertEqual(t.state, "idle")

    def test_hello_naming_another_nonce_closes_the_tunnel(self):
        t = self.tunnel()
        t.tlsResumed([tunnel.alpn_for(self.session.id)])
        t.dataReceived(tunnel.hello(self.session.id, b"\0" * 16))
        self.assertTrue(t.transport.aborted)

    def test_revoked_device_not_bound_early(self):
        self.relay.records["cam"].revoked = True
        t = self.tunnel()
        t.tlsResumed([tunnel.alpn_for(self.session.id)])
        self.assertEqual(self.bound, [])
        self.assertEqual(t.transport.value(), b"")
        # Its hello is then refused the usual way.
        t.dataReceived(tunnel.hello(self.session.id, self.session.nonce))
        self.assertEqual(t.transport.value(), bytes([5]))

    def test_another_devices_session_not_bound(self):
        other = self.relay.sessions.create("other", self.sent.append)
        t = self.tunnel()
        t.tlsResumed([tunnel.alpn_for(other.id)])
        self.assertEqual(t.state, "hello")
        self.assertEqual(t.transport.value(), b"")

    def test_garbage_alpn_ignored(self):
        t = self.tunnel()
        for offered in ([], [b"http/1.1"], [b"p2pt1.zz"], [tunnel.ALPN_PREFIX + b"0" * 31]):
            t.tlsResumed(offered)
        self.assertEqual(t.state, "hello")
        self.assertEqual(self.bound, [])
