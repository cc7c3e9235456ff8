"""
The admin page's sessions, CSRF tokens and Origin check
(p2pnat.relay.admin.auth), on a fake clock.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.relay.admin.auth import COOKIE, AdminSessions, cookie_header, same_origin


class SessionTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sessions = AdminSessions(self.clock, lifetime=60, limit=3)

    def test_lifetime(self):
        token = self.sessions.open()
        self.assertTrue(self.sessions.valid(token))
        self.clock.advance(59.9)
        self.assertTrue(self.sessions.valid(token))
        self.clock.advance(0.2)
        self.assertFalse(self.sessions.valid(token))
        self.assertEqual(len(self.sessions), 0)

    def test_unknown_and_closed(self):
        self.assertFalse(self.sessions.valid(None))
        self.assertFalse(self.sessions.valid(""))
        self.assertFalse(self.sessions.valid("made-up"))
        token = self.sessions.open()
        self.sessions.close(token)
        self.assertFalse(self.sessions.valid(token))

    def test_bounded(self):
        tokens = [self.sessions.open() for _ in range(4)]
        self.assertEqual(len(self.sessions), 3)
        self.assertFalse(self.sessions.valid(tokens[0]), "the oldest is signed out")
        self.assertTrue(all(self.sessions.valid(t) for t in tokens[1:]))

    def test_tokens_are_random_and_long(self):
        a, b = self.sessions.open(), self.sessions.open()
        self.assertNotEqual(a, b)
        self.assertGreaterEqual(len(a), 43)

    def test_csrf_is_tied_to_the_session(self):
        a, b = self.sessions.open(), self.sessions.open()
        self.assertTrue(self.sessions.check_csrf(a, self.sessions.csrf(a)))
        self.assertFalse(self.sessions.check_csrf(a, self.sessions.csrf(b)))
        self.assertFalse(self.sessions.check_csrf(a, None))
        self.assertFalse(self.sessions.check_csrf(a, ""))
        self.assertFalse(self.sessions.check_csrf(None, self.sessions.csrf(a)))
        csrf = self.sessions.csrf(a)
        self.sessions.close(a)
        self.assertFalse(self.sessions.check_csrf(a, csrf), "a closed session's token is dead")

    def test_csrf_differs_between_starts(self):
        other = AdminSessions(self.clock)
        token = self.sessions.open()
        self.assertNotEqual(self.sessions.csrf(token), other.csrf(token))


class CookieTests(SynchronousTestCase):
    def test_attributes(self):
        header = cookie_header("tok", 3600)
        self.assertTrue(header.startswith(f"{COOKIE}=tok;"))
        self.assertTrue(COOKIE.startswith("__Host-"))
        for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=3600"):
            self.assertIn(attribute, header.split("; "))
        self.assertNotIn("Domain", header)
        self.assertIn("Max-Age=0", cookie_header(None, 0))


class OriginTests(SynchronousTestCase):
    def test_same_origin(self):
        self.assertTrue(same_origin("https://relay.test:9443", None, "relay.test:9443"))
        self.assertTrue(same_origin("https://RELAY.test:9443", None, "relay.test:9443"))
        self.assertTrue(same_origin("https://relay.test", None, "relay.test:443"))
        self.assertTrue(same_origin(None, "https://relay.test:9443/revoke?device=a",
                                    "relay.test:9443"))

    def test_other_origins(self):
        host = "relay.test:9443"
        for origin in ("https://evil.test:9443", "http://relay.test:9443",
                       "https://relay.test:9444", "https://relay.test", "null", ""):
            self.assertFalse(same_origin(origin, f"https://{host}/", host), origin)
        self.assertFalse(same_origin(None, None, host), "neither header: refused")
        self.assertFalse(same_origin(None, "https://evil.test/", host))
        self.assertFalse(same_origin("https://relay.test:9443", None, None))
        self.assertFalse(same_origin("https://relay.test:99999", None, "relay.test:99999"))
