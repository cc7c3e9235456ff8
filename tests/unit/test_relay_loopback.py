"""
The relay path in one process on loopback, with the real reactor: a relay,
a device agent and the device's local services, joined by real UDP, TLS
and TCP (the NAT lab tests run the same path across kernel NATs).

Every test runs four ways: with the fast data path (p2pnat.net.fastio), with
it switched off (``tls.fast_path = false``), with a Twisted that lacks one of
the internals it relies on (it must fall back to stock TLS by itself), and
with OpenSSL bindings that lack the 0.5-RTT functions.
"""

import hashlib
import os

from twisted.internet import abstract, defer, endpoints, protocol, reactor, task
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from p2pnat.cli import main as cli
from p2pnat.cli.forward import Forwarder
from p2pnat.net import fastio
from tests.support.relay import start_agent, start_relay


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    """Sends C{data}, collects everything until the peer closes."""

    def __init__(self, data=b"", close_after=None):
        self.data = data
        self.got = bytearray()
        self.done = defer.Deferred()
        self.close_after = close_after

    def connectionMade(self):
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data):
        self.got += data
        if self.close_after is not None and len(self.got) >= self.close_after:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(bytes(self.got))


class HTTPOnce(protocol.Protocol):
    """A minimal HTTP/1.0 server: answers one request with a body and closes."""

    def __init__(self, body):
        self.body = body
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body)
                                 + self.body)
            self.transport.loseConnection()


# Read before any test replaces the bindings (NoEarlyDataLoopbackTests).
_RESUMED = fastio._EarlyData.resumed


@defer.inlineCallbacks
def closed(forwarder):
    """Wait until the forwarder's connections to the relay are closed."""
    for _ in range(100):
        if not forwarder.active:
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("forwarder connections still open")


class LoopbackTests(TestCase):
    """The relay path with the fast data path on (the default)."""

    timeout = 60
    fast_path = True  # the daemons' tls.fast_path
    fast = True  # whether the tunnels are expected to take the fast path
    half_rtt = True  # whether resumed tunnels are expected to get 0.5-RTT data

    def simulate(self):
        """Change the libraries before the daemons start (see the subclasses)."""

    @defer.inlineCallbacks
    def setUp(self):
        fastio._reset()
        self.addCleanup(fastio._reset)
        self.fastio_events = []
        observer = (lambda e: self.fastio_events.append(e)
                    if e.get("log_namespace") == "p2pnat.net.fastio" else None)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.simulate()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.body = os.urandom(3_000_000)
        self.web = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(lambda: HTTPOnce(self.body)))
        self.addCleanup(self.web.stopListening)
        self.echo = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Echo))
        self.addCleanup(self.echo.stopListening)
        self.relay = start_relay(self, self.dir, **{
            "terminal.https": "tcp:0:interface=127.0.0.1",
            "terminal.http": "tcp:0:interface=127.0.0.1",
            "tls.fast_path": self.fast_path})
        self.bundles = {}
        self.agents = {}
        yield self.start_device("cam")

    @defer.inlineCallbacks
    def start_device(self, device_id, *extra):
        out = os.path.join(self.dir, device_id)
        self.agents[device_id] = yield defer.Deferred.fromCoroutine(start_agent(
            self, self.relay, device_id, out, self.web.getHost().port, extra, **{
                "agent.extra_services": f"echo=127.0.0.1:{self.echo.getHost().port}",
                "tls.fast_path": self.fast_path}))
        self.bundles[device_id] = out

    def terminal_tls(self):
        with open(os.path.join(self.relay.state_dir, "ca.crt")) as f:
            ca = Certificate.loadPEM(f.read())
        return optionsForClientTLS("cam.relay.test", trustRoot=ca)

    @defer.inlineCallbacks
    def fetch(self, host, secure=True, extra=b""):
        port = (self.relay.terminal_https if secure else self.relay.terminal_http).address[1]
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if secure:
            ep = endpoints.wrapClientTLS(self.terminal_tls(), ep)
        c = Collect(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n")
        yield endpoints.connectProtocol(ep, c)
        data = yield c.done
        return data

    @defer.inlineCallbacks
    def test_https_page_and_reuse(self):
        first = yield self.fetch(b"cam.relay.test")
        head, _, body = first.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(self.body).digest())
        sent = self.relay.metrics.value("p2pnat_sessions_total", outcome="connect-request")
        # Sequential requests reuse the idle tunnel: no new connect request.
        for _ in range(3):
            again = yield self.fetch(b"cam.relay.test", secure=False)
            self.assertTrue(again.endswith(self.body[-1000:]))
        self.assertEqual(self.relay.metrics.value("p2pnat_sessions_total",
                                                  outcome="connect-request"), sent)

    def tunnel_transports(self):
        return [t.transport for tunnels in self.relay.relay.idle.values() for t in tunnels]

    @defer.inlineCallbacks
    def test_tunnel_path_and_startup_line(self):
        """
        The tunnels take the expected path (fastio's TLS on the TCP
        connection, or Twisted's TLSMemoryBIOProtocol), and fastio logged at
        most one line about it however many connections were made.
        """
        for _ in range(2):
            page = yield self.fetch(b"cam.relay.test")
            self.assertTrue(page.endswith(self.body[-1000:]))
        transports = self.tunnel_transports()
        self.assertTrue(transports)
        for transport in transports:
            if self.fast:
                self.assertIsInstance(transport, fastio._TLS)
            else:
                self.assertIsInstance(transport, TLSMemoryBIOProtocol)
        self.assertEqual(len(self.fastio_events), self.expected_lines)
        for event in self.fastio_events:
            self.assertEqual(event["log_level"].name, self.expected_level)

    expected_lines = 0
    expected_level = None

    @defer.inlineCallbacks
    def test_resumed_tunnel_carries_the_request_in_its_handshake(self):
        """
        The agent's second tunnel resumes its TLS session and names its
        session in ALPN: the relay binds it before the device's Finished and
        sends the request with its handshake flight; the page is whole.
        Without 0.5-RTT data the session is still resumed and the relay
        binds after the hello; with the fast path off neither happens, and
        the page is whole all the same.
        """
        first = yield self.fetch(b"cam.relay.test")
        self.assertTrue(first.endswith(self.body[-1000:]))
        self.assertEqual(self.relay.metrics.value("p2pnat_sessions_total",
                                                  outcome="tunnel-half-rtt"), 0)
        [cache] = self.agents["cam"].tls_sessions._caches.values()  # one relay, one cache
        self.assertEqual(cache.session is not None, self.fast)
        for tunnels in list(self.relay.relay.idle.values()):
            for t in tunnels:
                t.transport.loseConnection()
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.relay.relay.idle, {})
        second = yield self.fetch(b"cam.relay.test")
        head, _, body = second.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(self.body).digest())
        self.assertEqual(self.relay.metrics.value("p2pnat_sessions_total",
                                                  outcome="tunnel-half-rtt"),
                         1 if self.half_rtt else 0)
        if self.fast:
            [transport] = self.tunnel_transports()
            self.assertTrue(_RESUMED(transport._tls))

    @defer.inlineCallbacks
    def test_parallel(self):
        results = yield defer.gatherResults([self.fetch(b"cam.relay.test") for _ in range(6)])
        for r in results:
            self.assertTrue(r.endswith(self.body[-1000:]))
        self.assertGreaterEqual(len(self.relay.relay.tunnels.get("cam", ())) +
                                len(self.relay.relay.idle.get("cam", [])), 1)

    @defer.inlineCallbacks
    def test_forward_tcp(self):
        fwd = Forwarder(reactor, "127.0.0.1", self.relay.terminal_https.address[1], "cam",
                        "echo", None, self.terminal_tls())
        port = reactor.listenTCP(0, fwd, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        payload = os.urandom(2_000_000)
        c = Collect(payload, close_after=len(payload))
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), c)
        got = yield c.done
        self.assertEqual(got, payload)
        yield closed(fwd)

    @defer.inlineCallbacks
    def test_revoke_closes_tunnels(self):
        yield self.fetch(b"cam.relay.test")
        self.assertTrue(self.relay.relay.idle.get("cam"))
        self.assertEqual(cli(["device", "remove", "cam", "--state-dir", self.relay.state_dir]), 0)
        self.relay.sync()
        self.assertEqual(self.relay.relay.idle.get("cam"), None)
        refused = yield self.fetch(b"cam.relay.test")
        self.assertTrue(refused.startswith(b"HTTP/1.1 403"), refused[:100])

    @defer.inlineCallbacks
    def test_credential_for_forward(self):
        cred = os.path.join(self.dir, "cred")
        with open(cred, "w") as f:
            f.write("s3cret-s3cret\n")
        yield self.start_device("safe", "--access", "relay", "--credential-file", cred)
        tls = self.terminal_tls()
        port = self.relay.terminal_https.address[1]
        results = []
        for secret in (None, "wrong", "s3cret-s3cret"):
            fwd = Forwarder(reactor, "127.0.0.1", port, "safe", "echo", secret, tls)
            lp = reactor.listenTCP(0, fwd, interface="127.0.0.1")
            self.addCleanup(lp.stopListening)
            c = Collect(b"ping", close_after=4)
            yield endpoints.connectProtocol(
                endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", lp.getHost().port), c)
            results.append((yield c.done))
            yield closed(fwd)
        self.assertEqual(results, [b"", b"", b"ping"])


class StockLoopbackTests(LoopbackTests):
    """The same with ``tls.fast_path = false``: Twisted's stock TLS and transports."""

    fast_path = False
    fast = half_rtt = False
    expected_lines = 1  # "TLS fast path off (tls.fast_path = false)..."
    expected_level = "info"


class UnsupportedLoopbackTests(LoopbackTests):
    """
    The same with a Twisted that lacks an internal the fast path reads: the
    daemons want the fast path, fastio sees it cannot work, says so in one
    warning and uses stock TLS, and every tunnel still carries its requests.
    """

    fast = half_rtt = False
    expected_lines = 1  # "TLS fast path unavailable (...)"
    expected_level = "warn"

    def simulate(self):
        # A Twisted that counts queued bytes on the fly instead of keeping
        # _tempDataLen: its own writes still work, there is no counter to read.
        self.assertNotIn("_tempDataLen", vars(abstract.FileDescriptor))
        abstract.FileDescriptor._tempDataLen = property(
            lambda fd: sum(map(len, fd._tempDataBuffer)), lambda fd, value: None)
        self.addCleanup(delattr, abstract.FileDescriptor, "_tempDataLen")

    def test_reason(self):
        self.assertIn("_tempDataLen is a property", fastio.supported())


class NoEarlyDataLoopbackTests(LoopbackTests):
    """
    The same with OpenSSL bindings that lack SSL_read_early_data and
    SSL_write_early_data: resumed tunnels still resume (no certificates),
    and the relay binds them after the device's hello.
    """

    half_rtt = False
    expected_lines = 1  # "TLS 0.5-RTT data unavailable (...)"
    expected_level = "warn"

    def simulate(self):
        ffi, lib = fastio._EarlyData._binding()
        lacking = type("Lib", (), {name: getattr(lib, name) for name in
                                   ("SSL_get_error", "SSL_session_reused",
                                    "SSL_ERROR_WANT_READ")})
        self.patch(fastio._EarlyData, "_binding", staticmethod(lambda: (ffi, lacking)))

    def test_reason(self):
        self.assertIsNone(fastio.supported())
        self.assertIn("SSL_read_early_data", fastio.early_data_supported())
