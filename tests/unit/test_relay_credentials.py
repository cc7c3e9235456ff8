"""
Access credentials at the relay: guess limits per source, device and both,
checked before any hashing; a bounded number of checks under way, on a
pool of their own; the 429 and 503 answers; device IDs looked up as host
names (case-insensitive); the start-up warning for IDs that are not.
"""

import base64
import os
import sqlite3

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from p2pnat.deployment.registry import Registry, hash_credential, verify_stored
from p2pnat.relay import tap
from p2pnat.relay.core import synchronous
from p2pnat.relay.credentials import (
    CheckerBusy,
    CredentialChecker,
    CredentialLimits,
    GuessLimiter,
    TooManyGuesses,
    source_of,
)
from p2pnat.relay.terminal import Terminal
from tests.unit.test_relay_terminal import KEY, Transport, World, status
from tests.unit.test_taps import UDPMemoryReactor

SECRET = "open sesame, please"


def terminal(w, head, host="198.51.100.9", port=5555):
    """A terminal of World C{w} connecting from C{host}, sending C{head}."""
    t = Terminal(w.relay, True)
    transport = Transport()
    address = IPv6Address if ":" in host else IPv4Address
    transport.peerAddr = address("TCP", host, port)
    t.makeConnection(transport)
    t.dataReceived(head)
    return t


def basic(device, secret):
    auth = base64.b64encode(b":" + secret.encode())
    return (f"GET / HTTP/1.1\r\nHost: {device}.relay.test\r\n".encode()
            + b"Authorization: Basic " + auth + b"\r\n\r\n")


def login(device, secret):
    body = b"credential=" + secret.encode() + b"&next=%2F"
    return (f"POST /.p2pnat/login HTTP/1.1\r\nHost: {device}.relay.test\r\n".encode()
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def header(transport, name):
    for line in transport.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b": ")
        if key.lower() == name.lower():
            return value.decode()
    return None


class SourceTests(SynchronousTestCase):
    def test_keys(self):
        """An IPv4 address is its own key; an IPv6 one counts as its /64."""
        self.assertEqual(source_of("198.51.100.9:5555"), "198.51.100.9")
        self.assertEqual(source_of("2001:db8:1:2:aaaa::1:443"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("2001:db8:1:2:ffff::9:80"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("::ffff:198.51.100.9:80"), "198.51.100.9")
        self.assertEqual(source_of("?:?"), "?")


class GuessLimiterTests(SynchronousTestCase):
    limits = CredentialLimits(per_source_device=3, per_source_device_interval=10,
                              per_source=5, per_source_interval=4,
                              per_device=8, per_device_interval=1, trusted_for=100)

    def setUp(self):
        self.g = GuessLimiter(self.limits)

    def guesses(self, source, device, now, n):
        """How many of C{n} guesses pass."""
        passed = 0
        for _ in range(n):
            try:
                self.g.admit(source, device, now)
                passed += 1
            except TooManyGuesses:
                pass
        return passed

    def test_per_source_and_device(self):
        self.assertEqual(self.guesses("a", "cam", 0, 5), 3)
        with self.assertRaises(TooManyGuesses) as cm:
            self.g.admit("a", "cam", 0)
        self.assertEqual((cm.exception.status, cm.exception.retry_after), (429, 10))
        self.assertIn("your address", str(cm.exception))
        # Another source, and the same source at another device, still pass.
        self.assertEqual(self.guesses("b", "cam", 0, 1), 1)
        self.assertEqual(self.guesses("a", "safe", 0, 1), 1)
        # One more every 10 s.
        self.assertEqual(self.guesses("a", "cam", 9.9, 1), 0)
        self.assertEqual(self.guesses("a", "cam", 10, 2), 1)

    def test_per_source(self):
        passed = sum(self.guesses("a", f"dev{i}", 0, 1) for i in range(10))
        self.assertEqual(passed, 5)
        self.assertEqual(self.guesses("b", "dev9", 0, 1), 1)
        self.assertEqual(self.guesses("a", "dev9", 4, 1), 1)

    def test_per_device(self):
        passed = sum(self.guesses(f"10.0.0.{i}", "cam", 0, 1) for i in range(20))
        self.assertEqual(passed, 8)
        with self.assertRaises(TooManyGuesses) as cm:
            self.g.admit("10.0.1.1", "cam", 0)
        self.assertIn("This device", str(cm.exception))

    def test_a_trusted_source_skips_the_device_limit(self):
        """Guesses from many addresses do not lock out one that logged in before."""
        self.g.trust("home", "cam", 0)
        self.assertEqual(sum(self.guesses(f"10.0.0.{i}", "cam", 50, 1) for i in range(20)), 8)
        self.assertEqual(self.guesses("home", "cam", 50, 1), 1)
        self.assertEqual(self.guesses("elsewhere", "cam", 50, 1), 0)
        # Trust lasts trusted_for seconds.
        self.assertEqual(sum(self.guesses(f"10.0.1.{i}", "cam", 101, 1) for i in range(20)), 8)
        self.assertEqual(self.guesses("home", "cam", 101, 1), 0)

    def test_give_back(self):
        taken = [self.g.admit("a", "cam", 0) for _ in range(3)]
        self.assertEqual(self.guesses("a", "cam", 0, 1), 0)
        self.g.give_back(taken[0], 0)
        self.assertEqual(self.guesses("a", "cam", 0, 1), 1)

    def test_tables_bounded(self):
        g = GuessLimiter(CredentialLimits(max_keys=100))
        for i in range(1000):
            g.admit(f"s{i}", f"d{i}", 0)
            g.trust(f"s{i}", f"d{i}", 0)
        for table in (g.pair, g.source, g.device):
            self.assertLessEqual(len(table._level), 100)
        self.assertLessEqual(len(g._trusted), 100)
        # A bucket that is full again is forgotten.
        g.give_back(g.admit("x", "y", 0), 0)
        self.assertNotIn(("x", "y"), g.pair._level)


class CheckerTests(SynchronousTestCase):
    """The checker: limits and the bound on checks under way come before any hash."""

    def setUp(self):
        self.clock = Clock()
        self.hashes = []

        def run_blocking(f, *args):
            d = Deferred()
            self.hashes.append((d, f, args))
            return d

        self.stored = hash_credential(SECRET)
        self.checker = CredentialChecker(
            self.clock, run_blocking, lambda stored, given: bool(stored) and given == SECRET,
            CredentialLimits(per_source_device=2, per_source_device_interval=1e6, running=1,
                             waiting=2))

    def finish(self, i=0):
        d, f, args = self.hashes.pop(i)
        d.callback(f(*args))

    def test_over_the_limit_no_hash(self):
        for _ in range(2):
            self.checker.check("cam", self.stored, "wrong", "a")
            self.finish()
        d = self.checker.check("cam", self.stored, SECRET, "a")
        self.failureResultOf(d, TooManyGuesses)
        self.assertEqual(self.hashes, [])

    def test_right_gives_back_and_is_remembered(self):
        for _ in range(5):
            self.clock.advance(61)  # no longer remembered
            d = self.checker.check("cam", self.stored, SECRET, "a")
            self.finish()
            self.assertIs(self.successResultOf(d), True)
        d = self.checker.check("cam", self.stored, SECRET, "a")
        self.assertEqual(self.hashes, [])
        self.assertIs(self.successResultOf(d), True)

    def test_bounded_under_way(self):
        """At most running + waiting checks under way; then 503, with no hash queued."""
        ds = [self.checker.check("cam", self.stored, "wrong", f"10.0.0.{i}") for i in range(3)]
        self.assertEqual(len(self.hashes), 3)
        busy = self.failureResultOf(self.checker.check("cam", self.stored, SECRET, "b"),
                                    CheckerBusy)
        self.assertEqual((busy.value.status, busy.value.retry_after), (503, 2))
        self.assertEqual(len(self.hashes), 3)
        for d in ds:
            self.finish()
            self.assertIs(self.successResultOf(d), False)
        # Refused for being busy, "b" lost no guess: it still has both.
        for _ in range(2):
            d = self.checker.check("cam", self.stored, "wrong", "b")
            self.finish()
            self.assertIs(self.successResultOf(d), False)
        self.failureResultOf(self.checker.check("cam", self.stored, SECRET, "b"),
                             TooManyGuesses)

    def test_runner_failure_frees_its_place(self):
        ds = [self.checker.check("cam", self.stored, "wrong", f"10.0.0.{i}") for i in range(3)]
        for d, _, _ in self.hashes:
            d.errback(RuntimeError("pool gone"))
        self.hashes.clear()
        for d in ds:
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.checker.under_way, 0)

    def test_log_rate_limited(self):
        def guess():
            self.checker.check("cam", self.stored, "wrong", "a").addErrback(
                lambda f: f.trap(TooManyGuesses))
            if self.hashes:
                self.finish()

        with capturedLogs() as events:
            for i in range(50):  # 2 hashed, 48 refused
                guess()
        refused = [e for e in events if "refused" in e["log_format"]]
        self.assertEqual(len(refused), 1)
        self.clock.advance(61)
        with capturedLogs() as events:
            guess()
            guess()
        self.assertEqual([e.get("n") for e in events], [47, None])


class TerminalTests(SynchronousTestCase):
    """What terminals see: 429 and 503 pages with Retry-After, and who still gets in."""

    def setUp(self):
        self.w = World(self)
        self.w.add("safe", mode="relay", credential=SECRET)
        self.w.add("cam", mode="relay", credential=SECRET)

    def test_guesses_limited_per_source(self):
        """
        80 wrong guesses from one source: 5 are hashed, the rest are 429
        with Retry-After; the right credential from another source still
        gets in at once.
        """
        hashed = []
        self.w.relay.credentials.verify = lambda *a: hashed.append(a) or verify_stored(*a)
        answers = [status(terminal(self.w, basic("safe", "guess %d" % i)).transport)
                   for i in range(80)]
        self.assertEqual(answers, [401] * 5 + [429] * 75)
        self.assertEqual(len(hashed), 5)
        t = terminal(self.w, basic("safe", "guess"))
        self.assertEqual(header(t.transport, b"Retry-After"), "30")
        self.assertIn(b"Too many attempts", t.transport.value())
        self.assertTrue(t.transport.disconnecting)
        t = terminal(self.w, basic("safe", SECRET), host="203.0.113.77")
        self.assertEqual(t.state, "waiting")

    def test_login_form_limited(self):
        answers = [status(terminal(self.w, login("safe", "bad")).transport) for _ in range(6)]
        self.assertEqual(answers, [403] * 5 + [429])

    def test_connect_limited(self):
        head = (b"CONNECT safe:ssh HTTP/1.1\r\nProxy-Authorization: Bearer nope\r\n\r\n")
        answers = [status(terminal(self.w, head).transport) for _ in range(6)]
        self.assertEqual(answers, [401] * 5 + [429])

    def test_spray_does_not_lock_out_a_returning_user(self):
        """
        Guesses at a device from many addresses exhaust its own limit, but
        not for an address its user logged in from before.
        """
        self.w.relay.credentials.verify = lambda stored, given: given == SECRET
        t = terminal(self.w, basic("safe", SECRET), host="192.0.2.10")
        self.assertEqual(t.state, "waiting")
        self.w.clock.advance(120)  # no longer remembered: the next login is hashed
        for i in range(60):
            terminal(self.w, basic("safe", "guess"), host=f"203.0.113.{i}")
        t = terminal(self.w, basic("safe", "guess"), host="203.0.113.200")
        self.assertEqual(status(t.transport), 429)
        self.assertIn(b"This device has had too many", t.transport.value())
        t = terminal(self.w, basic("safe", SECRET), host="192.0.2.10")
        self.assertEqual(t.state, "waiting")

    def test_busy_is_503(self):
        pending = []
        self.w.relay.credentials.run_blocking = lambda f, *a: pending.append(a) or Deferred()
        limits = self.w.relay.credentials.limits
        for i in range(limits.running + limits.waiting):
            t = terminal(self.w, basic("safe", "x"), host=f"203.0.113.{i}")
            self.assertEqual(t.state, "auth")
        t = terminal(self.w, basic("safe", "x"), host="203.0.113.250")
        self.assertEqual(status(t.transport), 503)
        self.assertEqual(header(t.transport, b"Retry-After"), "2")
        self.assertEqual(len(pending), limits.running + limits.waiting)

    def test_unknown_device_costs_a_hash(self):
        """No such device takes as long to refuse as a wrong credential."""
        hashed = []
        self.w.relay.credentials.verify = lambda *a: hashed.append(a) or False
        d = self.w.relay.check_credential("nope", "guess", "192.0.2.1:1")
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(hashed, [(None, "guess")])


class DeviceNameTests(SynchronousTestCase):
    """Device IDs are host names: terminals name them in any case."""

    def setUp(self):
        self.w = World(self)
        self.w.add("cam")

    def test_connect_any_case(self):
        t = terminal(self.w, b"CONNECT CAM:ssh HTTP/1.1\r\n\r\n")
        self.assertEqual((t.state, t.device_id), ("waiting", "cam"))

    def test_connect_redirect_any_case(self):
        t = terminal(self.w, b"GET /connect?ID=Cam HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 302)
        self.assertEqual(header(t.transport, b"Location"), "https://cam.relay.test:8443/")

    def test_host_any_case(self):
        t = terminal(self.w, b"GET / HTTP/1.1\r\nHost: CaM.Relay.Test\r\n\r\n")
        self.assertEqual(t.state, "waiting")


def legacy_registry(path, ids):
    """A registry file holding devices C{ids}, as an older p2pnat let them be added."""
    with Registry(path) as reg:
        reg.add_device("ok-1", KEY, "ab" * 32)
    db = sqlite3.connect(path, isolation_level=None)
    db.executemany("INSERT INTO devices (id, mac_key, cert_fingerprint, created)"
                   " VALUES (?, ?, ?, 0)", [(i, KEY, "ab" * 32) for i in ids])
    db.close()


class StartWarningTests(SynchronousTestCase):
    def test_one_warning_per_unreachable_id(self):
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        legacy_registry(os.path.join(state, "registry.sqlite3"),
                        ["Cam", "garage.door", "under_score", "gone.device"])
        with Registry.open_state_dir(state) as reg:
            reg.revoke_device("gone.device")
        config = C.load(None, tap.SCHEMA, {"relay.state_dir": state, "udp.listen": "127.0.0.1:0",
                                           "terminal.https": "", "tunnel.listen": "",
                                           "relay.hostname": "relay.example.org"})
        svc = tap.RelayService(config, UDPMemoryReactor(), run_blocking=synchronous,
                               run_store=synchronous)
        with capturedLogs() as events:
            svc.startService()
        self.addCleanup(lambda: self.successResultOf(svc.stopService()))
        warned = {e["device_id"]: e for e in events if "cannot be reached" in e["log_format"]}
        self.assertEqual(sorted(warned), ["Cam", "garage.door", "under_score"])
        self.assertIn("upper-case", warned["Cam"]["problem"])
        self.assertIn("wildcard certificate", warned["garage.door"]["problem"])
        self.assertIn("DNS label", warned["under_score"]["problem"])
        self.assertIn("p2pnat device add NEWID", warned["Cam"]["log_format"])
        self.assertIn("device remove", warned["Cam"]["log_format"])


class SettingsTests(SynchronousTestCase):
    def service(self, reactor, run_blocking=synchronous, **settings):
        state = os.path.abspath(self.mktemp())
        config = C.load(None, tap.SCHEMA, {"relay.state_dir": state, "udp.listen": "127.0.0.1:0",
                                           "terminal.https": "", "tunnel.listen": "",
                                           **settings})
        svc = tap.RelayService(config, reactor, run_blocking=run_blocking,
                               run_store=synchronous)
        self.addCleanup(svc.registry.close)
        return svc

    def test_defaults(self):
        config = C.load(None, tap.SCHEMA, {})
        self.assertEqual(tap.credential_limits(config), CredentialLimits())

    def test_settings_reach_the_checker(self):
        svc = self.service(UDPMemoryReactor(), **{
            "credentials.threads": "2", "credentials.waiting": "3",
            "credentials.per_source_device": "4", "credentials.per_source_device_interval": "5",
            "credentials.per_source": "6", "credentials.per_source_interval": "7",
            "credentials.per_device": "8", "credentials.per_device_interval": "9"})
        self.assertEqual(svc.relay.credentials.limits, CredentialLimits(
            running=2, waiting=3, per_source_device=4, per_source_device_interval=5,
            per_source=6, per_source_interval=7, per_device=8, per_device_interval=9))
        for name in ("credentials.threads", "credentials.per_device_interval"):
            with self.assertRaises(C.ConfigError):
                C.load(None, tap.SCHEMA, {name: "0"})

    def test_own_pool(self):
        """Hashes go to a pool of credentials.threads threads, not the reactor's."""
        svc = self.service(ThreadedReactor(), run_blocking=None, **{"credentials.threads": "2"})
        [pool] = svc.pools
        self.assertEqual((pool.name, pool.min, pool.max), ("p2pnat-relay-credentials", 0, 2))
        calls = []
        self.patch(pool, "callInThreadWithCallback",
                   lambda onResult, f, *args: calls.append(args))
        svc.relay.check_credential("nope", "guess", "192.0.2.1:1")
        self.assertEqual(calls, [(None, "guess")])


class ThreadedReactor(UDPMemoryReactor):
    """An in-memory reactor whose own thread pool must not be used."""

    def getThreadPool(self):
        raise AssertionError("credential checks must not use the reactor's thread pool")


class LegacyCredentialTests(SynchronousTestCase):
    def test_short_credential_of_an_older_provisioning_still_works(self):
        w = World(self)
        w.add("old", mode="relay", credential="pw")
        t = terminal(w, basic("old", "pw"))
        self.assertEqual(t.state, "waiting")
