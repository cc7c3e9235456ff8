"""
The admin page's resource (p2pnat.relay.admin.web) through a real HTTP
client in memory (treq's StubTreq): sign-in and its guess limits, the
session cookie, CSRF and Origin checks on revoke, headers on every answer;
and in the relay's service: off by default, its credential file required.
"""

import os
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from p2pnat.deployment import pki
from p2pnat.deployment.registry import hash_credential, verify_stored
from p2pnat.relay import tap
from p2pnat.relay.admin import view
from p2pnat.relay.admin.auth import COOKIE, AdminSessions
from p2pnat.relay.admin.web import AdminResource
from p2pnat.relay.core import synchronous
from p2pnat.relay.credentials import CredentialChecker, CredentialLimits
from tests.support.procs import provision

PASSWORD = "correct horse battery"
HASH = hash_credential(PASSWORD)
BASE = "https://relay.test:9443"
ORIGIN = {"Origin": [BASE]}


class FakeRelay:
    """What the page reads and does, recorded."""

    hostname = "relay.test"

    def __init__(self):
        self.devices = {"cam1": "active", "old": "revoked"}
        self.revoked = []

    def overview(self):
        rows = [view.DeviceRow(d, "revoked" if s == "revoked" else "online", "n1",
                               "198.51.100.7:4000", 0.0) for d, s in sorted(self.devices.items())]
        return succeed(view.Overview("relay.test", "n1", False, 100.0, [
            view.NodeRow("n1", ("192.0.2.1:7478",), None, None, 1, None, True)], rows))

    def device_state(self, device_id):
        return self.devices.get(device_id)

    def revoke(self, device_id):
        self.revoked.append(device_id)
        self.devices[device_id] = "revoked"


class PageTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = FakeRelay()
        self.sessions = AdminSessions(self.clock, lifetime=600)
        checker = CredentialChecker(self.clock, synchronous, verify_stored,
                                    CredentialLimits(per_source_device=3,
                                                     per_source_device_interval=30))
        self.stub = StubTreq(AdminResource(self.relay, self.sessions, checker, HASH))

    def request(self, method, path, form=None, headers=None, token=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Cookie"] = [f"{COOKIE}={token}"]
        if form is not None:
            headers["Content-Type"] = ["application/x-www-form-urlencoded"]
        headers["Host"] = ["relay.test:9443"]
        d = self.stub.request(method, BASE + path, headers=headers, allow_redirects=False,
                              data=urlencode(form).encode() if form is not None else None)
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.content(response))
        return response, body

    def sign_in(self):
        response, _ = self.request("POST", "/login", {"password": PASSWORD}, ORIGIN)
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        return cookie.split(";")[0].split("=", 1)[1]

    def test_headers_on_every_answer(self):
        for method, path in (("GET", "/"), ("GET", "/login"), ("GET", "/admin.css"),
                             ("POST", "/revoke"), ("GET", "/nowhere")):
            response, _ = self.request(method, path)
            h = response.headers
            self.assertEqual(h.getRawHeaders("content-security-policy"), [view.CSP], path)
            self.assertEqual(h.getRawHeaders("cache-control"), ["no-store"])
            self.assertEqual(h.getRawHeaders("x-content-type-options"), ["nosniff"])
            self.assertEqual(h.getRawHeaders("x-frame-options"), ["DENY"])

    def test_signed_out(self):
        response, _ = self.request("GET", "/")
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (303, ["/login"]))
        response, body = self.request("GET", "/login")
        self.assertEqual(response.code, 200)
        self.assertIn(b'name="password"', body)
        response, _ = self.request("POST", "/revoke", {"device": "cam1"}, ORIGIN)
        self.assertEqual(response.code, 403)
        response, _ = self.request("GET", "/", token="made-up")
        self.assertEqual(response.code, 303)
        self.assertEqual(self.relay.revoked, [])

    def test_sign_in(self):
        response, body = self.request("POST", "/login", {"password": "wrong password!"}, ORIGIN)
        self.assertEqual(response.code, 401)
        self.assertIn(b"Wrong password", body)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))
        token = self.sign_in()
        self.assertTrue(self.sessions.valid(token))
        response, body = self.request("GET", "/", token=token)
        self.assertEqual(response.code, 200)
        self.assertIn(b'data-device="cam1"', body)
        self.assertIn(self.sessions.csrf(token).encode(), body)

    def test_sign_in_needs_the_pages_origin(self):
        for headers in ({}, {"Origin": ["https://evil.test"]}, {"Origin": ["null"]}):
            response, _ = self.request("POST", "/login", {"password": PASSWORD}, headers)
            self.assertEqual(response.code, 403, headers)
            self.assertIsNone(response.headers.getRawHeaders("set-cookie"))

    def test_guess_limits(self):
        for _ in range(3):
            response, _ = self.request("POST", "/login", {"password": "wrong password!"},
                                       ORIGIN)
            self.assertEqual(response.code, 401)
        # Over the limit: refused before any hashing, the right password too.
        response, body = self.request("POST", "/login", {"password": PASSWORD}, ORIGIN)
        self.assertEqual(response.code, 429)
        self.assertIn(b"Too many attempts", body)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
        self.assertEqual(len(self.sessions), 0)
        self.clock.advance(30)
        self.sign_in()

    def test_revoke(self):
        token = self.sign_in()
        response, body = self.request("GET", "/revoke?device=cam1", token=token)
        self.assertEqual(response.code, 200)
        self.assertIn(b'id="confirm"', body)
        self.assertEqual(self.relay.revoked, [], "asking is not revoking")
        form = {"device": "cam1", "csrf": self.sessions.csrf(token)}
        response, _ = self.request("POST", "/revoke", form, ORIGIN, token=token)
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (303, ["/?revoked=cam1"]))
        self.assertEqual(self.relay.revoked, ["cam1"])
        response, body = self.request("GET", "/?revoked=cam1", token=token)
        self.assertIn(b"Device cam1 revoked.", body)

    def test_revoke_refused_without_csrf_or_origin(self):
        token = self.sign_in()
        other = self.sessions.open()
        good = {"device": "cam1", "csrf": self.sessions.csrf(token)}
        for form, headers in (({"device": "cam1"}, ORIGIN),
                              ({"device": "cam1", "csrf": "0" * 64}, ORIGIN),
                              ({"device": "cam1", "csrf": self.sessions.csrf(other)}, ORIGIN),
                              (good, {}),
                              (good, {"Origin": ["https://evil.test"]}),
                              (good, {"Referer": ["https://evil.test/x"]})):
            response, _ = self.request("POST", "/revoke", form, headers, token=token)
            self.assertEqual(response.code, 403, (form, headers))
        self.assertEqual(self.relay.revoked, [])

    def test_unknown_device(self):
        token = self.sign_in()
        response, _ = self.request("GET", "/revoke?device=nope", token=token)
        self.assertEqual(response.code, 404)
        response, _ = self.request("POST", "/revoke", {
            "device": "nope", "csrf": self.sessions.csrf(token)}, ORIGIN, token=token)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.relay.revoked, [])

    def test_sign_out(self):
        token = self.sign_in()
        response, _ = self.request("POST", "/logout", {"csrf": "bad"}, ORIGIN, token=token)
        self.assertEqual(response.code, 403)
        self.assertTrue(self.sessions.valid(token))
        response, _ = self.request("POST", "/logout", {"csrf": self.sessions.csrf(token)},
                                   ORIGIN, token=token)
        self.assertEqual(response.code, 303)
        self.assertIn("Max-Age=0", response.headers.getRawHeaders("set-cookie")[0])
        self.assertFalse(self.sessions.valid(token))

    def test_session_expires(self):
        token = self.sign_in()
        self.clock.advance(601)
        response, _ = self.request("GET", "/", token=token)
        self.assertEqual(response.code, 303)


class ServiceTests(SynchronousTestCase):
    """The admin listener in the relay's service tree."""

    def service(self, **settings):
        state = os.path.abspath(self.mktemp())
        config = C.load(None, tap.SCHEMA, {"relay.state_dir": state, "udp.listen": "127.0.0.1:0",
                                           "terminal.https": "", "tunnel.listen": "",
                                           **settings})
        svc = tap.RelayService(config, MemoryReactorClock(), run_blocking=synchronous,
                               run_store=synchronous)
        self.addCleanup(svc.registry.close)
        return svc

    def test_off_by_default(self):
        self.assertEqual(C.load(None, tap.SCHEMA, {})["admin.listen"], "")
        svc = self.service()
        self.assertIsNone(svc.admin)
        self.assertFalse(any(isinstance(s, tap.EndpointListener) and "9443" in s.description
                             for s in svc))

    def test_needs_its_credential_file(self):
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(pki.PKIError):
            self.service(**{"admin.listen": "tcp:9443:interface=127.0.0.1",
                            "admin.credential_file": path})
        with open(path, "w") as f:
            f.write(HASH)
        os.chmod(path, 0o644)
        with self.assertRaises(pki.PKIError, msg="readable by others"):
            self.service(**{"admin.listen": "tcp:9443:interface=127.0.0.1",
                            "admin.credential_file": path})
        os.chmod(path, 0o600)
        with open(path, "w") as f:
            f.write(PASSWORD)  # a password, not its hash
        with self.assertRaises(C.ConfigError):
            self.service(**{"admin.listen": "tcp:9443:interface=127.0.0.1",
                            "admin.credential_file": path})

    def test_listens_with_its_credential(self):
        path = os.path.abspath(self.mktemp())
        with open(os.path.abspath(self.mktemp()), "w") as f:
            f.write(PASSWORD)
            password_file = f.name
        provision("cluster", "admin-password", "--out", path, "--password-file", password_file)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        svc = self.service(**{"admin.listen": "tcp:9443:interface=127.0.0.1",
                              "admin.credential_file": path})
        self.assertIs(svc.admin.parent, svc)
        self.assertEqual(svc.admin.description, "tcp:9443:interface=127.0.0.1")


class BodyLimitTests(SynchronousTestCase):
    """A request body over MAX_BODY closes the connection before it is read whole."""

    def connect(self):
        from twisted.internet.testing import StringTransport

        from p2pnat.relay.admin.web import AdminSite

        relay = FakeRelay()
        clock = Clock()
        page = AdminResource(relay, AdminSessions(clock), CredentialChecker(
            clock, synchronous, verify_stored), HASH)
        channel = AdminSite(page).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def post(self, size, sent):
        channel, transport = self.connect()
        channel.dataReceived(b"POST /login HTTP/1.1\r\nHost: relay.test:9443\r\n"
                             b"Origin: https://relay.test:9443\r\n"
                             b"Content-Type: application/x-www-form-urlencoded\r\n"
                             + f"Content-Length: {size}\r\n\r\n".encode() + b"p" * sent)
        return transport

    def test_over_the_limit(self):
        from p2pnat.relay.admin.web import MAX_BODY

        transport = self.post(MAX_BODY * 4, MAX_BODY + 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"", "nothing answered")

    def test_within_the_limit(self):
        transport = self.post(10, 10)
        self.assertIn(b"HTTP/1.1 401", transport.value())
