"""
The relay's terminal and tunnel sides in memory: routing, refusals,
credentials, the hello checks and streams, on a L{Clock} with string
transports.
"""

import base64
from types import SimpleNamespace

from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.deployment import pki
from p2pnat.deployment.registry import Registry
from p2pnat.protocol import tunnel, wire
from p2pnat.relay.core import Relay, synchronous
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.http import BadRequest, Tokens, parse_head
from p2pnat.relay.terminal import Terminal
from p2pnat.relay.tunnel import RelayTunnel

KEY = bytes(range(32))
CA_CERT, CA_KEY = pki.create_ca("test CA")
OTHER_CA_CERT, OTHER_CA_KEY = pki.create_ca("other CA")


def x509(cert):
    return crypto.load_certificate(crypto.FILETYPE_PEM, pki.cert_pem(cert))


class FakeSocket:
    """Stands for the UDP ControlProtocol a device's notifies reached."""

    def __init__(self, clock):
        self.stamper = wire.Stamper(clock)
        self.sent = []

    def send(self, data, addr, kind):
        self.sent.append((data, addr, kind))


class Transport(StringTransport):
    """A StringTransport that knows it was closed, and a peer certificate."""

    def __init__(self, cert=None):
        super().__init__(peerAddress=IPv4Address("TCP", "198.51.100.9", 5555))
        self.cert = cert
        self.aborted = False

    def getPeerCertificate(self):
        return self.cert

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()

    def setTcpNoDelay(self, on):
        pass


class World:
    def __init__(self, testcase, period=300, hostname="relay.test", **relay_options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(":memory:")
        testcase.addCleanup(self.registry.close)
        self.table = DeviceTable(period)
        self.socket = FakeSocket(self.clock)
        self.relay = Relay(self.clock, Metrics("relay"), self.table, self.registry,
                           Tokens(b"s" * 32, self.clock), hostname=hostname, tunnel_port=7443,
                           https_port=8443, **{"run_blocking": synchronous, **relay_options})
        self.certs = {}

    def add(self, device_id, mode="device", credential=None, online=True, revoked=False):
        cert, key = pki.issue_device_cert(CA_CERT, CA_KEY, device_id)
        self.certs[device_id] = cert
        rec = self.registry.add_device(device_id, KEY, pki.fingerprint(cert), mode, credential)
        if revoked:
            self.registry.revoke_device(device_id)
            rec = self.registry.device(device_id)
        d = DeviceState(device_id, KEY, revoked, None, None, mode, rec)
        self.table.put(d)
        if online:
            self.table.notify_a(device_id, ("203.0.113.5", 40000), ("192.168.1.2", 1), self.socket,
                                self.clock.seconds())
        return d

    def terminal(self, head, secure=True):
        t = Terminal(self.relay, secure)
        t.makeConnection(Transport())
        t.dataReceived(head)
        return t

    def tunnel(self, device_id=None, cert=None, session=None, nonce=None):
        tun = RelayTunnel(self.relay)
        cert = cert if cert is not None else self.certs[device_id]
        tun.makeConnection(Transport(x509(cert)))
        if session is not None:
            tun.dataReceived(tunnel.hello(session.id, nonce or session.nonce))
        return tun

    def session(self):
        """The session the latest connect request names, as the device reads it."""
        frame, msg = wire.unseal(self.socket.sent[-1][0], lambda k, t: KEY)
        return SimpleNamespace(id=msg.session_id, nonce=msg.nonce)


def status(transport):
    line = transport.value().split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line else None


class ParseTests(SynchronousTestCase):
    def test_parse(self):
        r = parse_head(b"GET /a?b=1 HTTP/1.1\r\nHost: Dev.Relay.Test:8443\r\nCookie: x=1; y=2\r\n\r\n")
        self.assertEqual((r.method, r.target, r.host, r.cookie("y")), ("GET", "/a?b=1",
                                                                         "dev.relay.test", "2"))

    def test_bad(self):
        for head in (b"GET /\r\n\r\n", b"get / HTTP/1.1\r\n\r\n", b"GET / HTTP/2\r\n\r\n",
                     b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", b"GET / HTTP/1.1\r\nnocolon\r\n\r\n"):
            self.assertRaises(BadRequest, parse_head, head)
        many = b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: x\r\n" % i for i in range(101)) + b"\r\n"
        with self.assertRaises(BadRequest) as cm:
            parse_head(many)
        self.assertEqual(cm.exception.status, 431)


class TokenTests(SynchronousTestCase):
    def test_any_cookie_value_is_an_answer(self):
        """Tokens.check says no to what is not a token, and never raises."""
        clock = Clock()
        clock.advance(1_700_000_000)
        tokens = Tokens(b"s" * 32, clock)
        good = tokens.make("cam", "hash")
        self.assertIs(tokens.check(good, "cam", "hash"), True)
        for bad in ("9999999999.\xe9", "\xb2.x", "9" * 5000 + ".x", good + "\xe9", "", None,
                    good.partition(".")[0] + ".", "1." + good.partition(".")[2]):
            self.assertIs(tokens.check(bad, "cam", "hash"), False, bad)
        self.assertIs(tokens.check(good, "cam2", "hash"), False)
        clock.advance(tokens.lifetime + 1)
        self.assertIs(tokens.check(good, "cam", "hash"), False)


class RoutingTests(SynchronousTestCase):
    def setUp(self):
        self.w = World(self)

    def test_refusals_answered_at_once(self):
        w = self.w
        w.add("old")
        w.add("gone", revoked=True)
        w.add("never", online=False)
        w.clock.advance(301)
        w.add("cam")
        # An unknown ID looks like a device whose login the relay keeps (401):
        # see AnonymousTests.
        for host, code in [("nope.relay.test", 401), ("gone.relay.test", 403),
                           ("never.relay.test", 503), ("old.relay.test", 503),
                           ("bad_$.relay.test", 404), ("elsewhere.example", 421)]:
            t = w.terminal(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            self.assertEqual(status(t.transport), code, host)
            self.assertTrue(t.transport.disconnecting, host)
        self.assertEqual(w.socket.sent, [])

    def test_bad_service_names(self):
        """A CONNECT naming no possible service is a 400, not a broken stream."""
        w = self.w
        w.add("cam")
        for target in (b"cam:\xe9", b"cam:" + b"s" * 300, b"cam:a\x01b"):
            t = w.terminal(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual(status(t.transport), 400, target)
        self.assertEqual(w.socket.sent, [])
        t = w.terminal(b"CONNECT cam:" + b"s" * 255 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(t.state, "waiting")

    def test_relay_hostname_any_case(self):
        """A relay configured as Relay.Test serves cam.relay.test (it answered 421 to all)."""
        w = World(self, hostname="Relay.Test")
        w.add("cam")
        t = w.terminal(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        self.assertEqual(t.state, "waiting")
        t = w.terminal(b"GET / HTTP/1.1\r\nHost: RELAY.test\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 ", t.transport.value())

    def test_relay_pages(self):
        w = self.w
        w.add("cam")
        t = w.terminal(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 200)
        t = w.terminal(b"GET /connect?ID=cam HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 302)
        self.assertIn(b"Location: https://cam.relay.test:8443/\r\n", t.transport.value())
        # Any ID that can be one is redirected (AnonymousTests).
        t = w.terminal(b"GET /connect?ID=nope HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 302)
        t = w.terminal(b"GET /connect?ID=bad_$ HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 404)

    def test_head_limits(self):
        t = self.w.terminal(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        self.assertEqual(status(t.transport), 431)
        t = self.w.terminal(b"\x16\x03\x01garbage\r\n\r\n")
        self.assertEqual(status(t.transport), 400)

    def test_slow_head_times_out(self):
        t = self.w.terminal(b"GET / HTTP/1.1\r\n")
        self.w.clock.advance(31)
        self.assertTrue(t.transport.aborted)

    def test_connect_request_from_notify_socket(self):
        w = self.w
        w.add("cam")
        t = w.terminal(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        self.assertEqual(t.state, "waiting")
        self.assertEqual(len(w.socket.sent), 1)
        data, addr, kind = w.socket.sent[0]
        self.assertEqual((addr, kind), (("203.0.113.5", 40000), "ConnectRequest"))
        frame, msg = wire.unseal(data, lambda k, t: KEY)
        self.assertEqual(frame.key_id, "cam")
        self.assertEqual((msg.session_id, msg.nonce, msg.tunnel_port),
                         (w.session().id, w.session().nonce, 7443))
        w.clock.pump([0.05] * 210)
        self.assertGreater(len(w.socket.sent), 5)
        self.assertEqual(status(t.transport), 504)


class BusyTests(SynchronousTestCase):
    """A relay whose session table is full says so: 503, not "device did not answer"."""

    head = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"

    def assert_busy(self, t):
        out = t.transport.value()
        self.assertEqual(status(t.transport), 503, out[:200])
        self.assertIn(b"\r\nRetry-After: 5\r\n", out)
        self.assertIn(b"<h1>Relay busy</h1>", out)
        self.assertTrue(t.transport.disconnecting)

    def test_full_for_one_device(self):
        w = World(self)
        w.add("cam")
        w.add("cam2")
        waiting = [w.terminal(self.head) for _ in range(64)]
        self.assertEqual({t.state for t in waiting}, {"waiting"})
        self.assert_busy(w.terminal(self.head))
        self.assertEqual(w.relay.metrics.value("p2pnat_sessions_total", outcome="http-503"), 1)
        # Another device is not affected.
        other = w.terminal(b"GET / HTTP/1.1\r\nHost: cam2.relay.test\r\n\r\n")
        self.assertEqual(other.state, "waiting")

    def test_full_in_all(self):
        w = World(self, max_sessions=2)
        for device_id in ("a", "b", "c"):
            w.add(device_id)
        for device_id in (b"a", b"b"):
            w.terminal(b"GET / HTTP/1.1\r\nHost: " + device_id + b".relay.test\r\n\r\n")
        self.assert_busy(w.terminal(b"GET / HTTP/1.1\r\nHost: c.relay.test\r\n\r\n"))


class StreamTests(SynchronousTestCase):
    def setUp(self):
        self.w = World(self)
        self.w.add("cam")
        self.head = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"

    def test_stream_and_reuse(self):
        w = self.w
        post = b"POST / HTTP/1.1\r\nHost: cam.relay.test\r\nContent-Length: 4\r\n\r\n"
        t = w.terminal(post)
        t.dataReceived(b"more")
        tun = w.tunnel("cam", session=w.session())
        self.assertEqual(tun.transport.value()[:1], bytes([tunnel.HELLO_OK]))
        frames = []
        tunnel.FrameDecoder(lambda s: frames.append(("open", s)),
                            lambda d: frames.append(("data", d)),
                            lambda: frames.append("end")).feed(tun.transport.value()[1:])
        self.assertEqual(frames[0], ("open", ""))
        self.assertEqual(b"".join(d for kind, d in frames[1:]), post + b"more")
        # The device answers and closes its side.
        tun.dataReceived(tunnel.frame(tunnel.DATA, b"HTTP/1.1 200 OK\r\n\r\nhi")
                         + tunnel.frame(tunnel.END))
        self.assertEqual(t.transport.value(), b"HTTP/1.1 200 OK\r\n\r\nhi")
        self.assertTrue(t.transport.disconnecting)
        self.assertTrue(tun.transport.value().endswith(tunnel.frame(tunnel.END)))
        self.assertEqual(tun.state, "idle")
        # The next terminal gets the idle tunnel at once: no connect request.
        sent = len(w.socket.sent)
        t2 = w.terminal(self.head)
        self.assertEqual(t2.state, "stream")
        self.assertEqual(len(w.socket.sent), sent)

    def idle_tunnel(self):
        w = self.w
        w.terminal(self.head)
        tun = w.tunnel("cam", session=w.session())
        tun.dataReceived(tunnel.frame(tunnel.OPENED) + tunnel.frame(tunnel.END))
        self.assertEqual(tun.state, "idle")
        return tun

    def test_reused_tunnel_confirmed(self):
        w = self.w
        tun = self.idle_tunnel()
        sent = len(w.socket.sent)
        t = w.terminal(self.head)
        self.assertIs(tun.terminal, t)
        self.assertEqual(tun.state, "opening")
        tun.dataReceived(tunnel.frame(tunnel.OPENED))
        w.clock.advance(5)
        self.assertEqual((t.state, len(w.socket.sent)), ("stream", sent))

    def test_dead_idle_tunnel_retried(self):
        """
        A reused tunnel that never confirms the OPEN was dead: the terminal's
        bytes go to a new tunnel, got with a new connect request.
        """
        w = self.w
        tun = self.idle_tunnel()
        sent = len(w.socket.sent)
        t = w.terminal(self.head)
        t.dataReceived(self.head)  # pipelined, for the same device
        w.clock.advance(2.1)
        self.assertTrue(tun.transport.aborted)
        self.assertEqual(t.state, "waiting")
        self.assertEqual(len(w.socket.sent), sent + 1)
        new = w.tunnel("cam", session=w.session())
        frames = []
        tunnel.FrameDecoder(lambda s: frames.append(("open", s)),
                            lambda d: frames.append(("data", d)),
                            lambda: frames.append("end")).feed(new.transport.value()[1:])
        self.assertEqual(b"".join(d for kind, d in frames if kind == "data"), self.head * 2)

    def test_terminal_closes_first(self):
        w = self.w
        t = w.terminal(self.head)
        tun = w.tunnel("cam", session=w.session())
        t.connectionLost(None)
        self.assertTrue(tun.transport.value().endswith(tunnel.frame(tunnel.END)))
        self.assertEqual(tun.state, "draining")
        tun.dataReceived(tunnel.frame(tunnel.END))
        self.assertEqual(tun.state, "idle")
        w.clock.advance(61)
        self.assertTrue(tun.transport.disconnecting)

    def test_hello_refusals(self):
        w = self.w
        w.add("other")
        w.terminal(self.head)
        s = w.session()
        cases = [
            (dict(device_id="cam", session=s, nonce=b"x" * 16), 4),
            (dict(device_id="other", session=s), 3),  # the session is cam's
            (dict(cert=pki.issue_device_cert(OTHER_CA_CERT, OTHER_CA_KEY, "cam")[0],
                  session=s), 5),  # not the registered certificate
        ]
        for kwargs, code in cases:
            tun = w.tunnel(**kwargs)
            self.assertEqual(tun.transport.value(), bytes([code]), kwargs)
            self.assertTrue(tun.transport.disconnecting)
        # Still claimable by the genuine device after all that.
        tun = w.tunnel("cam", session=s)
        self.assertEqual(tun.transport.value()[:1], bytes([tunnel.HELLO_OK]))

    def test_hello_timeout_and_garbage(self):
        w = self.w
        tun = w.tunnel("cam")
        w.clock.advance(11)
        self.assertTrue(tun.transport.aborted)
        tun = w.tunnel("cam")
        tun.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(20))
        self.assertEqual(tun.transport.value(), bytes([1]))

    def test_revocation_closes_tunnels(self):
        w = self.w
        t = w.terminal(self.head)
        tun = w.tunnel("cam", session=w.session())
        pending = w.terminal(self.head)  # the tunnel is busy: a second session
        self.assertEqual(pending.state, "waiting")
        w.relay.device_revoked("cam")
        self.assertTrue(tun.transport.aborted)
        self.assertTrue(t.transport.aborted)  # the streaming terminal is cut too
        self.assertEqual(status(pending.transport), 403)
        self.assertFalse(pending.transport.aborted)  # the 403 page gets out

    def test_revocation_cuts_a_finished_stream_still_draining(self):
        w = self.w
        t = w.terminal(self.head)
        tun = w.tunnel("cam", session=w.session())
        # The device sent everything and closed: the terminal is detached
        # from the (now idle) tunnel but its last bytes may still be queued.
        tun.dataReceived(tunnel.frame(tunnel.OPENED) + tunnel.frame(tunnel.DATA, b"x" * 100)
                         + tunnel.frame(tunnel.END))
        self.assertIsNone(tun.terminal)
        w.relay.device_revoked("cam")
        self.assertTrue(t.transport.aborted)


class CredentialTests(SynchronousTestCase):
    def setUp(self):
        self.w = World(self)
        self.w.add("safe", mode="relay", credential="open sesame")

    def head(self, extra=b""):
        return b"GET /x?y=1 HTTP/1.1\r\nHost: safe.relay.test\r\n" + extra + b"\r\n"

    def basic(self, secret):
        return b"Authorization: Basic " + base64.b64encode(b":" + secret) + b"\r\n"

    def test_no_credential_login_form(self):
        t = self.w.terminal(self.head())
        self.assertEqual(status(t.transport), 401)
        self.assertIn(b"name='next' value='/x?y=1'", t.transport.value())
        self.assertEqual(self.w.socket.sent, [])

    def test_wrong_then_right(self):
        t = self.w.terminal(self.head(self.basic(b"nope")))
        self.assertEqual(status(t.transport), 401)
        t = self.w.terminal(self.head(self.basic(b"open sesame")))
        self.assertEqual(t.state, "waiting")
        self.assertEqual(len(self.w.socket.sent), 1)

    def test_login_form_sets_cookie(self):
        body = b"credential=open+sesame&next=%2Fx%3Fy%3D1"
        t = self.w.terminal(b"POST /.p2pnat/login HTTP/1.1\r\nHost: safe.relay.test\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
        out = t.transport.value()
        self.assertEqual(status(t.transport), 303)
        self.assertIn(b"Location: /x?y=1\r\n", out)
        cookie = out.split(b"Set-Cookie: ", 1)[1].split(b";", 1)[0]
        self.assertIn(b"Set-Cookie: __Host-p2pnat_auth=", out)
        self.assertIn(b"; Path=/; Secure; HttpOnly; SameSite=Lax\r\n", out)
        t = self.w.terminal(self.head(b"Cookie: " + cookie + b"\r\n"))
        self.assertEqual(t.state, "waiting")
        # A forged or other device's cookie does not pass.
        t = self.w.terminal(self.head(b"Cookie: __Host-p2pnat_auth=9999999999.AAAA\r\n"))
        self.assertEqual(status(t.transport), 401)

    def test_wrong_login(self):
        body = b"credential=bad&next=//evil.example/"
        t = self.w.terminal(b"POST /.p2pnat/login HTTP/1.1\r\nHost: safe.relay.test\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertEqual(status(t.transport), 403)
        self.assertNotIn(b"Set-Cookie", t.transport.value())

    def test_open_redirect_refused(self):
        body = b"credential=open+sesame&next=//evil.example/"
        t = self.w.terminal(b"POST /.p2pnat/login HTTP/1.1\r\nHost: safe.relay.test\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertIn(b"Location: /\r\n", t.transport.value())


# -- issue #9: the relay's login cookie, cross-site requests, enumeration ----------

def form_login(w, device_id, credential, extra=b"", secure=True):
    """POST the relay's login form for C{device_id}; the terminal."""
    body = b"credential=" + credential + b"&next=%2F"
    return w.terminal(b"POST /.p2pnat/login HTTP/1.1\r\nHost: " + device_id + b".relay.test\r\n"
                      + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body, secure)


def set_cookie(t):
    """The Set-Cookie header a terminal got, or None."""
    for line in t.transport.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.startswith(b"Set-Cookie: "):
            return line[len(b"Set-Cookie: "):]
    return None


class CookieTests(SynchronousTestCase):
    """The relay's login cookie: host-only, __Host- over HTTPS, every one of its name read."""

    def setUp(self):
        self.w = World(self)
        self.w.add("safe", mode="relay", credential="open sesame")
        self.w.add("other", mode="relay", credential="other secret")

    def get(self, cookies, secure=True):
        return self.w.terminal(b"GET / HTTP/1.1\r\nHost: safe.relay.test\r\nCookie: " + cookies
                               + b"\r\n\r\n", secure)

    def test_https_cookie_is_host_prefixed(self):
        """Over HTTPS: __Host-p2pnat_auth, Secure, Path=/, no Domain (untossable)."""
        cookie = set_cookie(form_login(self.w, b"safe", b"open+sesame"))
        name, _, rest = cookie.partition(b"=")
        self.assertEqual(name, b"__Host-p2pnat_auth")
        attributes = rest.split(b"; ")[1:]
        self.assertEqual(sorted(attributes), [b"HttpOnly", b"Path=/", b"SameSite=Lax", b"Secure"])

    def test_plain_http_cookie(self):
        """
        Over plain HTTP (no trusted proxy) a browser refuses __Host- and
        Secure: a host-only p2pnat_auth, accepted over plain HTTP only.
        """
        cookie = set_cookie(form_login(self.w, b"safe", b"open+sesame", secure=False))
        self.assertTrue(cookie.startswith(b"p2pnat_auth="), cookie)
        self.assertNotIn(b"Secure", cookie)
        self.assertNotIn(b"Domain", cookie)
        pair = cookie.split(b";")[0]
        self.assertEqual(self.get(pair, secure=False).state, "waiting")
        # The same token is no HTTPS cookie, under either name.
        token = pair.partition(b"=")[2]
        self.assertEqual(status(self.get(pair).transport), 401)
        self.assertEqual(status(self.get(b"__Host-p2pnat_auth=" + token).transport), 401)

    def test_every_cookie_of_the_name_is_tried(self):
        """
        A sibling device's page can set __Host-less cookies of any name for
        the relay domain, and a browser sends them before or after ours:
        one valid cookie among them is enough (no login loop).
        """
        pair = set_cookie(form_login(self.w, b"safe", b"open+sesame")).split(b";")[0]
        other = set_cookie(form_login(self.w, b"other", b"other+secret")).split(b";")[0]
        token = pair.partition(b"=")[2]
        tossed = b"__Host-p2pnat_auth=9999999999.AAAAAAAAAAAAAAAAAAAAAAAA"
        for cookies in (tossed + b"; " + pair, other + b"; " + pair, pair + b"; " + tossed,
                        b"p2pnat_auth=x; " + tossed + b"; a=b; " + pair):
            self.assertEqual(self.get(cookies).state, "waiting", cookies)
        # Over plain HTTP, the same with the plain cookie.
        plain = set_cookie(form_login(self.w, b"safe", b"open+sesame", secure=False))
        plain = plain.split(b";")[0]
        self.assertEqual(self.get(b"p2pnat_auth=1.x; " + plain, secure=False).state, "waiting")
        # Another device's cookie, or none valid, is no login.
        for cookies in (other, tossed, tossed + b"; " + other, b"p2pnat_auth=" + token):
            self.assertEqual(status(self.get(cookies).transport), 401, cookies)

    def test_browsers_get_the_form_without_a_challenge(self):
        """
        A browser opening the page gets the relay's login form with no
        Basic challenge: Chromium would show its own password dialog
        instead, and the cookie flow above would never start.
        """
        t = self.w.terminal(b"GET / HTTP/1.1\r\nHost: safe.relay.test\r\n"
                            b"Sec-Fetch-Mode: navigate\r\n\r\n")
        self.assertEqual(status(t.transport), 401)
        self.assertNotIn(b"WWW-Authenticate", t.transport.value())
        self.assertIn(b"name='credential'", t.transport.value())
        t = self.w.terminal(b"GET / HTTP/1.1\r\nHost: safe.relay.test\r\n\r\n")
        self.assertIn(b'\r\nWWW-Authenticate: Basic realm="p2pnat"\r\n', t.transport.value())

    def test_old_cookies_ignored(self):
        """A p2pnat_auth cookie of the relay before issue #9 (its MAC names no cookie)."""
        import base64 as b64
        import hashlib
        import hmac

        cred_hash = self.w.registry.device("safe").access_credential_hash
        expiry = int(self.w.clock.seconds()) + 3600
        mac = b64.urlsafe_b64encode(hmac.new(b"s" * 32, f"safe|{expiry}|{cred_hash}".encode(),
                                             hashlib.sha256).digest()[:18])
        old = b"%d.%s" % (expiry, mac)
        for name, secure in ((b"p2pnat_auth", True), (b"p2pnat_auth", False),
                             (b"__Host-p2pnat_auth", True)):
            t = self.get(name + b"=" + old, secure)
            self.assertEqual(status(t.transport), 401, (name, secure))


class CrossOriginTests(SynchronousTestCase):
    """
    A page of one device must not make state-changing requests to a
    device whose login the relay keeps, with that device's cookie: they
    are refused (403) and never forwarded.
    """

    def setUp(self):
        self.w = World(self)
        self.w.add("safe", mode="relay", credential="open sesame")
        self.w.add("cam")  # its own web UI keeps its login
        self.cookie = b"Cookie: " + set_cookie(form_login(self.w, b"safe", b"open+sesame")
                                               ).split(b";")[0] + b"\r\n"

    def request(self, method, extra, host=b"safe.relay.test:8443", secure=True):
        return self.w.terminal(method + b" /settings HTTP/1.1\r\nHost: " + host + b"\r\n"
                               + self.cookie + extra + b"Content-Length: 3\r\n\r\nx=1", secure)

    def assert_refused(self, t, what):
        self.assertEqual(status(t.transport), 403, what)
        self.assertIn(b"<h1>Cross-site request refused</h1>", t.transport.value(), what)
        self.assertEqual(self.w.socket.sent, [], what)  # no connect request: nothing forwarded

    def test_cross_origin_changes_refused(self):
        for method in (b"POST", b"PUT", b"DELETE", b"PATCH"):
            for extra in (b"Sec-Fetch-Site: same-site\r\n", b"Sec-Fetch-Site: cross-site\r\n",
                          b"Origin: https://cam.relay.test:8443\r\n",
                          b"Origin: https://evil.example\r\n", b"Origin: null\r\n",
                          b"Origin: http://safe.relay.test:8443\r\n",  # another scheme
                          b"Origin: https://safe.relay.test\r\n",  # another port
                          b"Origin: https://safe.relay.test:8443/x\r\n",  # not an origin
                          b"Sec-Fetch-Site: same-origin\r\nOrigin: https://cam.relay.test:8443\r\n",
                          b"Sec-Fetch-Site: same-site\r\nOrigin: https://safe.relay.test:8443\r\n"):
                self.assert_refused(self.request(method, extra), (method, extra))

    def test_login_form_cross_origin_refused(self):
        t = form_login(self.w, b"safe", b"open+sesame", b"Sec-Fetch-Site: same-site\r\n")
        self.assertEqual(status(t.transport), 403)
        self.assertIsNone(set_cookie(t))

    def test_own_origin_and_no_browser_pass(self):
        for method, extra in ((b"POST", b"Sec-Fetch-Site: same-origin\r\n"),
                              (b"POST", b"Sec-Fetch-Site: none\r\n"),
                              (b"POST", b"Origin: https://safe.relay.test:8443\r\n"),
                              (b"POST", b"Origin: HTTPS://SAFE.relay.test:8443\r\n"),
                              (b"POST", b""),  # curl, the CLI: neither header
                              (b"GET", b"Sec-Fetch-Site: cross-site\r\n"),  # a navigation
                              (b"HEAD", b"Origin: https://cam.relay.test:8443\r\n")):
            t = self.request(method, extra)
            self.assertEqual(t.state, "waiting", (method, extra))
        t = self.request(b"POST", b"Origin: https://safe.relay.test\r\n", b"safe.relay.test")
        self.assertEqual(t.state, "waiting")

    def test_own_login_devices_unaffected(self):
        """A device whose own web UI keeps its login answers for itself."""
        t = self.request(b"POST", b"Sec-Fetch-Site: same-site\r\n", b"cam.relay.test")
        self.assertEqual(t.state, "waiting")


class AnonymousTests(SynchronousTestCase):
    """
    An anonymous terminal cannot tell an unknown ID from a relay-authorized
    device that is revoked, offline or online: the same answers until it
    gives the credential.
    """

    def setUp(self):
        w = self.w = World(self)
        self.checked = []

        def run_blocking(f, stored, given):
            self.checked.append(stored)
            return synchronous(f, stored, given)

        w.relay.credentials.run_blocking = run_blocking
        # IDs of one length: the pages' lengths are alike too.
        w.add("stale01", mode="relay", credential="open sesame")
        w.clock.advance(301)
        w.add("online1", mode="relay", credential="open sesame")
        w.add("revoked", mode="relay", credential="open sesame", revoked=True)
        w.add("never01", mode="relay", credential="open sesame", online=False)
        self.ids = [b"unknown", b"online1", b"stale01", b"revoked", b"never01"]

    def answers(self, head):
        """What each ID gets for C{head} (with ID in place of the device ID)."""
        out = {}
        for device_id in self.ids:
            t = self.w.terminal(head.replace(b"ID", device_id))
            out[device_id] = (t.state, t.transport.value().replace(device_id, b"ID"))
        return out

    def assert_alike(self, head, expected_status):
        answers = self.answers(head)
        first = answers[b"unknown"]
        self.assertEqual(first[0], "done")
        self.assertEqual(int(first[1].split()[1]), expected_status, first[1][:200])
        for device_id, answer in answers.items():
            self.assertEqual(answer, first, device_id)

    def test_host_routing_alike(self):
        self.assert_alike(b"GET / HTTP/1.1\r\nHost: ID.relay.test\r\n\r\n", 401)
        self.assert_alike(b"GET /.p2pnat/login HTTP/1.1\r\nHost: ID.relay.test\r\n\r\n", 401)
        self.assert_alike(b"POST / HTTP/1.1\r\nHost: ID.relay.test\r\nOrigin: https://x\r\n"
                          b"Content-Length: 0\r\n\r\n", 403)
        self.assertEqual(self.w.socket.sent, [])

    def test_connect_alike(self):
        self.assert_alike(b"CONNECT ID:ssh HTTP/1.1\r\n\r\n", 401)

    def test_wrong_credential_alike_and_as_slow(self):
        """A wrong credential costs one scrypt check for every ID, unknown included."""
        wrong = b"Authorization: Basic " + base64.b64encode(b":wrong") + b"\r\n"
        self.assert_alike(b"GET / HTTP/1.1\r\nHost: ID.relay.test\r\n" + wrong + b"\r\n", 401)
        self.assertEqual(len(self.checked), len(self.ids))
        self.assertIn(None, self.checked)  # the unknown ID's: a dummy hash
        del self.checked[:]
        body = b"credential=wrong&next=%2F"
        self.assert_alike(b"POST /.p2pnat/login HTTP/1.1\r\nHost: ID.relay.test\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body, 403)
        self.assertEqual(len(self.checked), len(self.ids))

    def test_connect_redirect_for_any_id(self):
        for device_id in self.ids:
            t = self.w.terminal(b"GET /connect?ID=" + device_id + b" HTTP/1.1\r\n"
                                b"Host: relay.test\r\n\r\n")
            self.assertEqual(status(t.transport), 302, device_id)
            self.assertIn(b"Location: https://" + device_id + b".relay.test:8443/\r\n",
                          t.transport.value())

    def test_state_told_after_the_credential(self):
        good = b"Authorization: Basic " + base64.b64encode(b":open sesame") + b"\r\n"
        for device_id, code in ((b"revoked", 403), (b"stale01", 503), (b"never01", 503)):
            t = self.w.terminal(b"GET / HTTP/1.1\r\nHost: " + device_id + b".relay.test\r\n"
                                + good + b"\r\n")
            self.assertEqual(status(t.transport), code, device_id)
        t = self.w.terminal(b"GET / HTTP/1.1\r\nHost: online1.relay.test\r\n" + good + b"\r\n")
        self.assertEqual(t.state, "waiting")


class TrustedProxyTests(SynchronousTestCase):
    """
    terminal.trusted_proxies: only a listed proxy's X-Forwarded-Proto or
    Forwarded: proto= make a plain connection count as HTTPS (the
    terminal's peer here is 198.51.100.9).
    """

    def world(self, proxies):
        from p2pnat.relay.access import TrustedProxies

        w = World(self, http_port=8080)
        w.relay.trusted_proxies = TrustedProxies(proxies)
        w.add("safe", mode="relay", credential="open sesame")
        return w

    def test_trusted_proxy_says_https(self):
        w = self.world(["198.51.100.0/24"])
        for header in (b"X-Forwarded-Proto: https\r\n", b"Forwarded: for=192.0.2.1;proto=https\r\n",
                       b'Forwarded: proto=http, for="[2001:db8::1]";proto="https"\r\n'):
            cookie = set_cookie(form_login(w, b"safe", b"open+sesame", header, secure=False))
            self.assertTrue(cookie.startswith(b"__Host-p2pnat_auth="), (header, cookie))
            self.assertIn(b"; Secure", cookie)
            t = w.terminal(b"GET /connect?ID=safe HTTP/1.1\r\nHost: relay.test\r\n" + header
                           + b"\r\n", secure=False)
            self.assertIn(b"Location: https://safe.relay.test:8443/\r\n", t.transport.value())
        # The proxy may say http, too.
        t = w.terminal(b"GET /connect?ID=safe HTTP/1.1\r\nHost: relay.test\r\n"
                       b"X-Forwarded-Proto: http\r\n\r\n", secure=False)
        self.assertIn(b"Location: http://safe.relay.test:8080/\r\n", t.transport.value())

    def test_others_ignored(self):
        for proxies in ([], ["10.0.0.0/8", "::1"]):
            w = self.world(proxies)
            header = b"X-Forwarded-Proto: https\r\nForwarded: proto=https\r\n"
            cookie = set_cookie(form_login(w, b"safe", b"open+sesame", header, secure=False))
            self.assertTrue(cookie.startswith(b"p2pnat_auth="), (proxies, cookie))
            self.assertNotIn(b"Secure", cookie)
            t = w.terminal(b"GET /connect?ID=safe HTTP/1.1\r\nHost: relay.test\r\n" + header
                           + b"\r\n", secure=False)
            self.assertIn(b"Location: http://safe.relay.test:8080/\r\n", t.transport.value())


def device_frames(tun, since=1):
    """What the relay sent on a tunnel (after the hello status): OPEN, DATA joined, END."""
    frames = []
    tunnel.FrameDecoder(lambda s: frames.append(("open", s)),
                        lambda d: frames.append(("data", d)),
                        lambda: frames.append(("end", None)),
                        lambda: frames.append(("opened", None))).feed(tun.transport.value()[since:])
    joined = []
    for kind, value in frames:
        if kind == "data" and joined and joined[-1][0] == "data":
            joined[-1] = ("data", joined[-1][1] + value)
        else:
            joined.append((kind, value))
    return joined


class PerRequestTests(SynchronousTestCase):
    """
    Every request on a kept-alive or pipelined terminal connection is
    routed and authorized by its own head (issue #9, finding 1): a request
    for another device, or without the credential, never reaches the
    stream's device.
    """

    def setUp(self):
        self.w = World(self)
        self.w.add("a", mode="relay", credential="secret-a")
        self.w.add("b", mode="relay", credential="secret-b")
        self.w.add("open")

    def req(self, host, extra=b"", method=b"GET", body=b""):
        if body:
            extra += b"Content-Length: %d\r\n" % len(body)
        return (method + b" / HTTP/1.1\r\nHost: " + host + b".relay.test\r\n" + extra
                + b"\r\n" + body)

    def auth(self, secret):
        return b"Authorization: Basic " + base64.b64encode(b"u:" + secret) + b"\r\n"

    def stream(self, first):
        w = self.w
        t = w.terminal(first)
        self.assertEqual(t.state, "waiting")
        tun = w.tunnel(t.device_id, session=w.session())
        self.assertIn(t.state, ("stream", "check", "finishing"))
        return t, tun

    def test_kept_alive_request_without_credential(self):
        """A second request with no credential is not given to the device: it gets the login form."""
        first = self.req(b"a", self.auth(b"secret-a"))
        t, tun = self.stream(first)
        tun.dataReceived(tunnel.frame(tunnel.DATA, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        t.dataReceived(self.req(b"a"))
        self.assertEqual(device_frames(tun), [("open", ""), ("data", first), ("end", None)])
        self.assertEqual(t.state, "finishing")
        tun.dataReceived(tunnel.frame(tunnel.END))
        out = t.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                       b"HTTP/1.1 401 "), out[:120])
        self.assertTrue(t.transport.disconnecting)
        self.assertEqual(tun.state, "idle")

    def test_kept_alive_request_after_device_went_offline(self):
        """
        An authorized later request for a device that went offline (or was
        revoked) since the stream began is not forwarded on the stream: it
        is answered afresh once the device's answers are written.
        """
        w = self.w
        first = self.req(b"a", self.auth(b"secret-a"))
        t, tun = self.stream(first)
        w.clock.advance(301)  # no notify A for longer than the access-check period
        t.dataReceived(self.req(b"a", self.auth(b"secret-a")))
        self.assertEqual(device_frames(tun), [("open", ""), ("data", first), ("end", None)])
        self.assertEqual(t.state, "finishing")
        tun.dataReceived(tunnel.frame(tunnel.END))
        self.assertIn(b"HTTP/1.1 503 ", t.transport.value())

    def test_kept_alive_request_for_another_device(self):
        """A request naming device b on a's stream goes to b, on a new stream, after a's END."""
        w = self.w
        t, tun_a = self.stream(self.req(b"a", self.auth(b"secret-a")))
        second = self.req(b"b", self.auth(b"secret-b"))
        t.dataReceived(second)
        self.assertEqual(device_frames(tun_a)[-1], ("end", None))
        self.assertNotIn(b"Host: b.", tun_a.transport.value())
        tun_a.dataReceived(tunnel.frame(tunnel.END))
        self.assertEqual((t.state, t.device_id), ("waiting", "b"))
        tun_b = w.tunnel("b", session=w.session())
        self.assertEqual(device_frames(tun_b), [("open", ""), ("data", second)])
        self.assertFalse(t.transport.disconnecting)

    def test_pipelined_requests(self):
        """Pipelined: the same device's authorized requests follow; an unauthorized one does not."""
        ok = self.req(b"a", self.auth(b"secret-a"), b"POST", b"x=1")
        chunked = (b"POST / HTTP/1.1\r\nHost: a.relay.test\r\n" + self.auth(b"secret-a")
                   + b"Transfer-Encoding: chunked\r\n\r\n3\r\nGET\r\n0\r\nT: 1\r\n\r\n")
        # The body of the first holds what looks like a head: it is body.
        sneaky = self.req(b"a", self.auth(b"secret-a"), b"POST", self.req(b"b"))
        bad = self.req(b"a", b"Cookie: p2pnat_auth=1.x\r\n")
        t, tun = self.stream(ok + chunked + sneaky + bad + self.req(b"a", self.auth(b"secret-a")))
        self.assertEqual(device_frames(tun), [("open", ""), ("data", ok + chunked + sneaky),
                                              ("end", None)])
        tun.dataReceived(tunnel.frame(tunnel.END))
        self.assertEqual(status(t.transport), 401)
        self.assertTrue(t.transport.disconnecting)

    def test_open_device_requests_follow(self):
        """A device with no relay credential: its kept-alive requests stay on one stream."""
        t, tun = self.stream(self.req(b"open"))
        t.dataReceived(self.req(b"open", b"", b"PUT", b"abc"))
        t.dataReceived(self.req(b"open")[:10])
        t.dataReceived(self.req(b"open")[10:])
        self.assertEqual(t.state, "stream")
        self.assertEqual(device_frames(tun), [
            ("open", ""), ("data", self.req(b"open") + self.req(b"open", b"", b"PUT", b"abc")
                           + self.req(b"open"))])
        # Another device on the same connection: not to this one.
        t.dataReceived(self.req(b"a"))
        self.assertEqual(device_frames(tun)[-1], ("end", None))

    def test_malformed_later_heads(self):
        """A malformed head after the first: 400 once the device's answers are written, closed."""
        cases = [
            b"GET / HTTP/1.1\r\nHost: open.relay.test\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: open.relay.test\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: open.relay.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: open.relay.test\r\n X: folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: open.relay.test\nX: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: open.relay.test\r\nHost: a.relay.test\r\n\r\n",
            b"\x16\x03\x01garbage\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: " + b"a" * 20000,
            b"POST / HTTP/1.1\r\nHost: open.relay.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n",
        ]
        for later in cases:
            self.w = World(self)  # a new relay: no idle tunnel from the case before
            self.w.add("open")
            first = self.req(b"open")
            t, tun = self.stream(first)
            t.dataReceived(later)
            self.assertEqual(device_frames(tun)[-1], ("end", None), later)
            if b"zz" not in later:  # (that one's head is sound, only its body is not)
                self.assertNotIn(later[:40], tun.transport.value().replace(first, b""), later)
            tun.dataReceived(tunnel.frame(tunnel.DATA, b"answer") + tunnel.frame(tunnel.END))
            self.assertTrue(t.transport.value().startswith(b"answerHTTP/1.1 4"), later)
            self.assertIn(status(SimpleNamespace(value=lambda: t.transport.value()[6:])),
                          (400, 431), later)
            self.assertTrue(t.transport.disconnecting, later)

    def test_device_closes_while_next_head_checked(self):
        """The device ends its stream first: the kept request gets a new stream."""
        w = self.w
        t, tun = self.stream(self.req(b"open"))
        w.add("c", mode="relay", credential="secret-c")
        tun.dataReceived(tunnel.frame(tunnel.OPENED))
        t.dataReceived(self.req(b"c", self.auth(b"secret-c")))
        self.assertEqual(t.state, "finishing")
        tun.dataReceived(tunnel.frame(tunnel.END))
        self.assertEqual((t.state, t.device_id), ("waiting", "c"))

    def test_upgrade_makes_the_stream_opaque(self):
        """After a forwarded Upgrade request, the bytes are the other protocol's: not parsed."""
        t, tun = self.stream(self.req(b"open", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
        self.assertEqual(t._send, tun.send_data)
        t.dataReceived(b"\x81\x85GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(t.state, "stream")


class ResendTests(SynchronousTestCase):
    """Finding 13b: a request that is not safe to repeat is never sent twice."""

    def setUp(self):
        self.w = World(self)
        self.w.add("cam")
        self.get = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"
        self.post = (b"POST /order HTTP/1.1\r\nHost: cam.relay.test\r\nContent-Length: 3\r\n\r\n"
                     b"buy")

    def idle_tunnel(self):
        w = self.w
        w.terminal(self.get)
        tun = w.tunnel("cam", session=w.session())
        tun.dataReceived(tunnel.frame(tunnel.OPENED) + tunnel.frame(tunnel.END))
        self.assertEqual(tun.state, "idle")
        self.mark = len(tun.transport.value())
        return tun

    def test_post_on_unconfirmed_reused_tunnel_sent_once(self):
        """
        A reused idle tunnel whose OPENED is late: the POST was not sent on
        it, so the retry on a new tunnel is its only copy.
        """
        w = self.w
        old = self.idle_tunnel()
        t = w.terminal(self.post[:20])
        t.dataReceived(self.post[20:])
        self.assertNotIn(b"POST", old.transport.value()[self.mark:])
        w.clock.advance(2.1)  # the device got the OPEN, its OPENED is late
        self.assertTrue(old.transport.aborted)
        new = w.tunnel("cam", session=w.session())
        self.assertEqual(device_frames(new), [("open", ""), ("data", self.post)])

    def test_held_post_sent_once_confirmed(self):
        w = self.w
        old = self.idle_tunnel()
        t = w.terminal(self.get + self.post)
        # The GET may be sent twice; the POST waits for the device's OPENED.
        self.assertIn(self.get, old.transport.value()[self.mark:])
        self.assertNotIn(b"POST", old.transport.value()[self.mark:])
        old.dataReceived(tunnel.frame(tunnel.OPENED))
        self.assertEqual(device_frames(old, self.mark)[-1], ("data", self.get + self.post))
        self.assertEqual(t.state, "stream")

    def test_connect_on_reused_tunnel_held(self):
        w = self.w
        old = self.idle_tunnel()
        t = w.terminal(b"CONNECT cam HTTP/1.1\r\n\r\nSSH-2.0")
        self.assertEqual(device_frames(old, self.mark), [("open", "")])
        old.dataReceived(tunnel.frame(tunnel.OPENED))
        self.assertEqual(device_frames(old, self.mark), [("open", ""), ("data", b"SSH-2.0")])
        self.assertEqual(t.state, "stream")


class _CountedMachine:
    """A terminal's machine that counts the stream's next heads given to it."""

    def __init__(self, machine):
        self.machine = machine
        self.heads = 0

    def next_head(self, head, rest):
        self.heads += 1
        self.machine.next_head(head, rest)

    def __getattr__(self, name):
        return getattr(self.machine, name)


class FastPathTests(SynchronousTestCase):
    """
    A later request head on a stream, for the stream's own device and
    allowed at once, goes on with no machine input (TerminalCore.fast_next);
    every refusal still goes the check state's way and never reaches the
    device.
    """

    def setUp(self):
        self.w = World(self)
        self.w.add("open")
        self.w.add("safe", mode="relay", credential="open sesame")
        self.w.add("other", mode="relay", credential="other secret")
        self.checks = []
        check = self.w.relay.check_credential
        self.w.relay.check_credential = lambda *a: self.checks.append(a[1]) or check(*a)

    def req(self, host, extra=b"", method=b"GET", path=b"/"):
        return method + b" " + path + b" HTTP/1.1\r\nHost: " + host + b".relay.test\r\n" + extra \
            + b"\r\n"

    def cookie(self, device=b"safe", cred=b"open+sesame"):
        pair = set_cookie(form_login(self.w, device, cred)).split(b";")[0]
        return b"Cookie: " + pair + b"\r\n"

    def stream(self, first):
        """A terminal streaming C{first} to its device, its machine counted."""
        w = self.w
        t = w.terminal(first)
        tun = w.tunnel(t.device_id, session=w.session())
        tun.dataReceived(tunnel.frame(tunnel.OPENED))
        self.assertEqual(t.state, "stream")
        t.core.machine = counted = _CountedMachine(t.core.machine)
        return t, tun, counted

    def assertFast(self, first, later):
        t, tun, counted = self.stream(first)
        t.dataReceived(later + later[:7])
        t.dataReceived(later[7:])
        self.assertEqual((counted.heads, t.state), (0, "stream"))
        self.assertEqual(device_frames(tun), [("open", ""), ("data", first + later + later)])
        return t, tun

    def assertChecked(self, first, later, then):
        """C{later} goes to the machine, never to the stream's device; C{then} is the next state."""
        t, tun, counted = self.stream(first)
        t.dataReceived(later)
        self.assertEqual(counted.heads, 1)
        self.assertEqual(t.state, then)
        self.assertEqual(device_frames(tun)[:2], [("open", ""), ("data", first)])
        self.assertNotIn(later, tun.transport.value())
        return t, tun

    def test_taken_for_a_device_of_its_own_login(self):
        post = self.req(b"open", b"Content-Length: 3\r\nOrigin: https://elsewhere.example\r\n",
                        b"POST") + b"abc"
        self.assertFast(self.req(b"open"), post)

    def test_taken_with_a_cookie(self):
        cookie = self.cookie()
        self.assertFast(self.req(b"safe", cookie), self.req(b"safe", cookie, b"POST"))
        self.assertEqual(self.checks, ["open sesame"])  # the login only

    def test_taken_with_a_remembered_credential(self):
        auth = b"Authorization: Basic " + base64.b64encode(b"u:open sesame") + b"\r\n"
        self.assertFast(self.req(b"safe", auth), self.req(b"safe", auth))
        self.assertEqual(self.checks, ["open sesame"] * 3)  # hashed once, then remembered

    def test_pipelined_in_one_read(self):
        """Many requests in one read: a loop, not one stack frame each."""
        first = self.req(b"open")
        t = self.w.terminal(first + first * 3000)
        tun = self.w.tunnel("open", session=self.w.session())
        self.assertEqual(t.state, "stream")
        self.assertEqual(device_frames(tun), [("open", ""), ("data", first * 3001)])

    def test_a_credential_to_hash_is_checked_once_by_the_machine(self):
        """A credential the checker does not remember: the check state waits for its hash."""
        wrong = b"Authorization: Basic " + base64.b64encode(b"u:guess") + b"\r\n"
        t, tun, counted = self.stream(self.req(b"safe", self.cookie()))
        held = []
        self.w.relay.credentials.run_blocking = lambda f, *a: held.append((f, a)) or Deferred()
        t.dataReceived(self.req(b"safe", wrong))
        self.assertEqual((counted.heads, t.state, len(held)), (1, "check", 1))
        self.assertEqual(self.checks, ["open sesame", "guess"])
        self.assertNotIn(b"guess", tun.transport.value())

    def test_refusals_go_the_machine_s_way(self):
        cases = [
            (lambda c: self.req(b"safe"), "finishing"),  # no credential: the login form
            (lambda c: self.req(b"safe", b"Cookie: __Host-p2pnat_auth=1.x\r\n"), "finishing"),
            (lambda c: self.req(b"safe", self.cookie(b"other", b"other+secret")), "finishing"),
            (lambda c: self.req(b"safe", c + b"Sec-Fetch-Site: same-site\r\n", b"POST"),
             "finishing"),
            (lambda c: self.req(b"safe", c + b"Origin: https://open.relay.test:8443\r\n",
                                b"DELETE"), "finishing"),
            (lambda c: self.req(b"safe", c, b"POST", b"/.p2pnat/login"), "finishing"),
            (lambda c: self.req(b"other", c), "finishing"),
            (lambda c: self.req(b"open"), "finishing"),
            (lambda c: b"GET / HTTP/1.1\r\nHost: relay.test\r\n" + c + b"\r\n", "finishing"),
            (lambda c: b"CONNECT safe HTTP/1.1\r\n" + c + b"\r\n", "finishing"),
            # Allowed, and the machine makes the stream opaque.
            (lambda c: self.req(b"safe", c + b"Upgrade: websocket\r\nConnection: upgrade\r\n"),
             "stream"),
            (lambda c: self.req(b"safe", c + b"Content-Length: 1\r\nContent-Length: 2\r\n"),
             "finishing")]
        for make, then in cases:
            self.w = w = World(self)
            w.add("open")
            w.add("safe", mode="relay", credential="open sesame")
            w.add("other", mode="relay", credential="other secret")
            cookie = self.cookie()
            t, tun, counted = self.stream(self.req(b"safe", cookie))
            later = make(cookie)
            t.dataReceived(later)
            self.assertEqual((counted.heads, t.state), (1, then), later)
            if then == "finishing":
                self.assertNotIn(later, tun.transport.value(), later)
                self.assertEqual(device_frames(tun)[-1], ("end", None), later)

    def test_unreachable_device_goes_the_machine_s_way(self):
        """A device that went offline or was revoked under the stream: not the fast path."""
        for change in ("offline", "revoked"):
            self.w = w = World(self)
            w.add("open")
            t, tun, counted = self.stream(self.req(b"open"))
            if change == "offline":
                w.clock.advance(301)
            else:
                # (The relay cuts a revoked device's streams; the flag alone says
                # what a head that raced the cut meets.)
                w.table.get("open").revoked = True
            t.dataReceived(self.req(b"open"))
            self.assertEqual(counted.heads, 1, change)
            self.assertNotIn(self.req(b"open") * 2, tun.transport.value(), change)
