"""
The relay's access rules for terminals (L{p2pnat.relay.access}) as pure
functions: the request's own origin, the cross-origin rule, the login
cookie, trusted proxies.  The same rules through a terminal connection are
in L{tests.unit.test_relay_terminal} (CookieTests, CrossOriginTests,
AnonymousTests, TrustedProxyTests).
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from p2pnat.relay import access
from p2pnat.relay import tap as relay_tap
from p2pnat.relay.core import synchronous
from p2pnat.relay.devices import DeviceState
from p2pnat.relay.http import Tokens, parse_head


def head(*lines, method="POST"):
    text = f"{method} / HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n"
    return parse_head(text.encode("latin-1"))


class OriginTests(SynchronousTestCase):
    def test_host_port(self):
        for host, https, expected in (("Cam.Relay.Test", True, ("cam.relay.test", 443)),
                                      ("cam.relay.test", False, ("cam.relay.test", 80)),
                                      ("cam.relay.test:8443", False, ("cam.relay.test", 8443)),
                                      ("[::1]:8080", True, ("::1", 8080)),
                                      ("[::1]", True, ("::1", 443)),
                                      ("cam.relay.test:", True, None),
                                      ("cam.relay.test:x1", True, None),
                                      ("cam.relay.test:\xb2", True, None)):
            self.assertEqual(access.host_port(head(f"Host: {host}"), https), expected, host)

    def test_parse_origin(self):
        for text, expected in (("https://cam.relay.test", ("https", "cam.relay.test", 443)),
                               ("http://CAM.relay.test:8080", ("http", "cam.relay.test", 8080)),
                               ("http://[::1]:8080", ("http", "::1", 8080)),
                               ("null", None), ("", None), ("https://", None),
                               ("ftp://cam.relay.test", None), ("https://a:99999", None),
                               ("https://cam.relay.test/x", None),
                               ("https://u@cam.relay.test", None),
                               ("https://cam.relay.test?x", None)):
            self.assertEqual(access.parse_origin(text), expected, text)

    def test_cross_origin(self):
        own = "Host: cam.relay.test:8443"
        cases = [
            ((own,), None),
            ((own, "Origin: https://cam.relay.test:8443"), None),
            ((own, "Sec-Fetch-Site: same-origin"), None),
            ((own, "Sec-Fetch-Site: None"), None),
            ((own, "Sec-Fetch-Site: same-site"), "Sec-Fetch-Site: same-site"),
            ((own, "Sec-Fetch-Site: cross-site"), "Sec-Fetch-Site: cross-site"),
            ((own, "Sec-Fetch-Site: "), "Sec-Fetch-Site: "),
            ((own, "Origin: https://other.relay.test:8443"),
             "Origin: https://other.relay.test:8443"),
            ((own, "Origin: null"), "Origin: null"),
            (("Host: cam.relay.test:x", "Origin: https://cam.relay.test"),
             "Origin: https://cam.relay.test"),
        ]
        for lines, expected in cases:
            self.assertEqual(access.cross_origin(head(*lines), True), expected, lines)
        # Safe methods are never refused: navigations and reads.
        for method in ("GET", "HEAD", "OPTIONS", "TRACE"):
            req = head(own, "Sec-Fetch-Site: cross-site", "Origin: null", method=method)
            self.assertIsNone(access.cross_origin(req, True))
        # The scheme is the request's: an https page is not the http origin.
        req = head(own, "Origin: https://cam.relay.test:8443")
        self.assertEqual(access.cross_origin(req, False), "Origin: https://cam.relay.test:8443")

    def test_hidden(self):
        self.assertTrue(access.hidden(None))
        self.assertTrue(access.hidden(DeviceState("a", b"k", access_mode="relay")))
        self.assertFalse(access.hidden(DeviceState("a", b"k", access_mode="device")))
        self.assertFalse(access.hidden(DeviceState("a", b"k", revoked=True)))


class CookieTests(SynchronousTestCase):
    def test_names_and_attributes(self):
        self.assertEqual(access.set_cookie("T", True),
                         "__Host-p2pnat_auth=T; Path=/; Secure; HttpOnly; SameSite=Lax")
        self.assertEqual(access.set_cookie("T", False),
                         "p2pnat_auth=T; Path=/; HttpOnly; SameSite=Lax")

    def test_request_cookies(self):
        req = head("Cookie: a=1; __Host-p2pnat_auth=x;b=2;  __Host-p2pnat_auth=y; "
                   "__host-p2pnat_auth=z; p2pnat_auth=w")
        self.assertEqual(req.cookies("__Host-p2pnat_auth"), ["x", "y"])
        self.assertEqual(req.cookie("__Host-p2pnat_auth"), "x")
        self.assertEqual(req.cookies("p2pnat_auth"), ["w"])
        self.assertEqual(req.cookies("c"), [])
        self.assertIsNone(req.cookie("c"))

    def test_tokens_name_the_cookie(self):
        clock = Clock()
        clock.advance(1_700_000_000)
        tokens = Tokens(b"s" * 32, clock)
        secure = tokens.make("cam", "hash")
        plain = tokens.make("cam", "hash", "p2pnat_auth")
        self.assertTrue(tokens.check(secure, "cam", "hash", "__Host-p2pnat_auth"))
        self.assertFalse(tokens.check(secure, "cam", "hash", "p2pnat_auth"))
        self.assertTrue(tokens.check(plain, "cam", "hash", "p2pnat_auth"))
        self.assertFalse(tokens.check(plain, "cam", "hash"))
        self.assertTrue(tokens.check_any(["", "1.x", secure], "cam", "hash"))
        self.assertFalse(tokens.check_any(["", plain], "cam", "hash"))
        self.assertFalse(tokens.check_any([], "cam", "hash"))



class TrustedProxyTests(SynchronousTestCase):
    def test_forwarded_proto(self):
        for lines, expected in (((), None),
                                (("X-Forwarded-Proto: https",), "https"),
                                (("X-Forwarded-Proto: HTTP",), "http"),
                                (("X-Forwarded-Proto: http, https",), "https"),
                                (("X-Forwarded-Proto: gopher",), None),
                                (("Forwarded: for=1.2.3.4;proto=https",), "https"),
                                (('Forwarded: proto="https";by=x',), "https"),
                                (("Forwarded: proto=https, for=5.6.7.8",), None),
                                (("Forwarded: proto=https, proto=http",), "http"),
                                (("Forwarded: for=x", "X-Forwarded-Proto: https"), None),
                                (("Forwarded: proto=", ), None)):
            self.assertEqual(access.forwarded_proto(head(*lines)), expected, lines)

    def test_trusts(self):
        proxies = access.TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
        for peer, expected in (("10.1.2.3:555", True), ("192.0.2.7:1", True),
                               ("192.0.2.8:1", False), ("2001:db8::1:443", True),
                               ("[2001:db8::1]:443", True), ("::ffff:10.0.0.1:5", True),
                               ("2001:db9::1:443", False), ("?:?", False), ("", False)):
            self.assertEqual(proxies.trusts(peer), expected, peer)
        self.assertFalse(access.NO_PROXIES.trusts("10.1.2.3:555"))
        self.assertFalse(access.NO_PROXIES)

    def test_https(self):
        proxies = access.TrustedProxies(["127.0.0.1"])
        says = head("X-Forwarded-Proto: https")
        self.assertTrue(proxies.https(says, False, "127.0.0.1:4000"))
        self.assertFalse(proxies.https(says, False, "127.0.0.2:4000"))
        self.assertFalse(proxies.https(head("X-Forwarded-Proto: http"), False, "127.0.0.1:4000"))
        self.assertFalse(proxies.https(head(), False, "127.0.0.1:4000"))
        # Over TLS to the relay itself, it is https whatever a header says.
        self.assertTrue(proxies.https(head("X-Forwarded-Proto: http"), True, "127.0.0.1:1"))

    def test_setting(self):
        config = C.load(None, relay_tap.SCHEMA)
        self.assertEqual(config["terminal.trusted_proxies"], [])
        config = C.load(None, relay_tap.SCHEMA,
                        {"terminal.trusted_proxies": "127.0.0.1,10.0.0.0/8,::1"})
        self.assertEqual(config["terminal.trusted_proxies"], ["127.0.0.1", "10.0.0.0/8", "::1"])
        with self.assertRaises(C.ConfigError) as cm:
            C.load(None, relay_tap.SCHEMA, {"terminal.trusted_proxies": "proxy.example"})
        self.assertIn("'proxy.example' is not an IP address or network", str(cm.exception))

    def test_relay_service_uses_it(self):
        """twistd relay hands the setting to its terminals' rules."""
        import os

        from tests.unit.test_taps import UDPMemoryReactor

        state = os.path.abspath(self.mktemp())
        config = C.load(None, relay_tap.SCHEMA, {
            "relay.state_dir": state, "udp.listen": "127.0.0.1:0",
            "terminal.trusted_proxies": "192.0.2.0/24"})
        svc = relay_tap.RelayService(config, UDPMemoryReactor(), run_blocking=synchronous,
                                     run_store=synchronous)
        self.addCleanup(svc.registry.close)
        self.assertTrue(svc.relay.trusted_proxies.trusts("192.0.2.9:1"))
        self.assertFalse(svc.relay.trusted_proxies.trusts("198.51.100.1:1"))
