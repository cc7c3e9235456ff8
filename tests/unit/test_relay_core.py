"""
The relay's core and service plumbing: timeouts from the settings down to
the protocols, blocking work through the runner it is given, and the
store's rounds (off the reactor thread, in order, nothing lost).
"""

import base64
import os

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from p2pnat.deployment.registry import Registry
from p2pnat.protocol import tunnel
from p2pnat.relay import tap
from p2pnat.relay.core import Timeouts, synchronous
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.store import StoreSync
from p2pnat.relay.terminal import TerminalFactory
from p2pnat.relay.tunnel import RelayTunnelFactory
from tests.unit.test_relay_terminal import Transport, World
from tests.unit.test_taps import UDPMemoryReactor

PEER = "198.51.100.9:5555"


class TimeoutSettingsTests(SynchronousTestCase):
    def service(self, **settings):
        state = os.path.abspath(self.mktemp())
        config = C.load(None, tap.SCHEMA, {"relay.state_dir": state, "udp.listen": "127.0.0.1:0",
                                           "terminal.https": "", "tunnel.listen": "",
                                           **settings})
        reactor = MemoryReactorClock()
        svc = tap.RelayService(config, reactor, run_blocking=synchronous, run_store=synchronous)
        self.addCleanup(svc.registry.close)
        return svc, reactor

    def test_defaults(self):
        config = C.load(None, tap.SCHEMA, {})
        self.assertEqual(tap.timeouts(config), Timeouts())
        self.assertEqual(Timeouts(), Timeouts(head=30.0, hello=10.0, open=2.0, session=10.0,
                                              idle=60.0))

    def test_settings_reach_the_protocols(self):
        svc, reactor = self.service(**{
            "terminal.head_timeout": "5", "tunnel.hello_timeout": "3",
            "tunnel.open_timeout": "0.5", "session.timeout": "7", "tunnel.idle_timeout": "9"})
        self.assertEqual(svc.relay.timeouts, Timeouts(head=5, hello=3, open=0.5, session=7,
                                                      idle=9))
        self.assertEqual(svc.relay.sessions.timeout, 7)
        terminal = TerminalFactory(svc.relay, False).buildProtocol(None)
        terminal.makeConnection(Transport())
        tunnel = RelayTunnelFactory(svc.relay).buildProtocol(None)
        tunnel.makeConnection(Transport())
        reactor.advance(2.9)
        self.assertFalse(tunnel.transport.aborted)
        reactor.advance(0.2)
        self.assertTrue(tunnel.transport.aborted, "no hello after tunnel.hello_timeout")
        reactor.advance(1.8)
        self.assertFalse(terminal.transport.aborted)
        reactor.advance(0.2)
        self.assertTrue(terminal.transport.aborted, "no head after terminal.head_timeout")

    def test_bad_settings(self):
        for name in ("terminal.head_timeout", "tunnel.hello_timeout", "tunnel.open_timeout"):
            with self.assertRaises(C.ConfigError):
                C.load(None, tap.SCHEMA, {name: "0"})
            with self.assertRaises(C.ConfigError):
                C.load(None, tap.SCHEMA, {name: "soon"})

    def test_open_timeout_reaches_the_tunnel(self):
        """A reused tunnel is taken for dead after tunnel.open_timeout, not 2 s."""
        w = World(self, timeouts=Timeouts(open=0.5))
        w.add("cam")
        head = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"
        w.terminal(head)
        tun = w.tunnel("cam", session=w.session())
        tun.dataReceived(tunnel.frame(tunnel.OPENED) + tunnel.frame(tunnel.END))
        t = w.terminal(head)
        self.assertEqual(tun.state, "opening")
        w.clock.advance(0.6)
        self.assertTrue(tun.transport.aborted)
        self.assertEqual(t.state, "waiting")


class CredentialRunnerTests(SynchronousTestCase):
    """check_credential runs the hash through run_blocking, never inline by itself."""

    def setUp(self):
        self.calls = []
        self.results = []

        def run_blocking(f, *args):
            self.calls.append((f.__name__, args[1]))
            d = Deferred()
            self.results.append((d, f, args))
            return d

        self.w = World(self, run_blocking=run_blocking)
        self.w.add("safe", mode="relay", credential="open sesame")

    def finish(self):
        d, f, args = self.results.pop(0)
        d.callback(f(*args))

    def test_through_the_runner_then_remembered(self):
        d = self.w.relay.check_credential("safe", "open sesame", PEER)
        self.assertEqual(self.calls, [("verify_stored", "open sesame")])
        self.assertNoResult(d)
        self.finish()
        self.assertIs(self.successResultOf(d), True)
        # Remembered for a minute: no second hash.
        again = self.w.relay.check_credential("safe", "open sesame", PEER)
        self.assertIs(self.successResultOf(again), True)
        self.assertEqual(len(self.calls), 1)
        self.w.clock.advance(61)
        self.w.relay.check_credential("safe", "open sesame", PEER)
        self.assertEqual(len(self.calls), 2)

    def test_wrong_not_remembered(self):
        d = self.w.relay.check_credential("safe", "nope", PEER)
        self.finish()
        self.assertIs(self.successResultOf(d), False)
        self.w.relay.check_credential("safe", "nope", PEER)
        self.assertEqual(len(self.calls), 2)

    def test_terminal_waits_for_the_runner(self):
        t = self.w.terminal(b"GET / HTTP/1.1\r\nHost: safe.relay.test\r\nAuthorization: Basic "
                            + base64.b64encode(b":open sesame") + b"\r\n\r\n")
        self.assertEqual(t.state, "auth")
        self.assertEqual(self.w.socket.sent, [])
        self.finish()
        self.assertEqual(t.state, "waiting")
        self.assertEqual(len(self.w.socket.sent), 1)

    def test_runner_error_is_502(self):
        t = self.w.terminal(b"POST /.p2pnat/login HTTP/1.1\r\nHost: safe.relay.test\r\n"
                            b"Content-Length: 14\r\n\r\ncredential=abc")
        d, _, _ = self.results.pop(0)
        d.errback(RuntimeError("pool gone"))
        self.assertEqual(t.transport.value().split(b"\r\n")[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FakeRegistry:
    """A registry connection: records writes; data_version moves on demand."""

    def __init__(self, records=None):
        self.writes = []
        self.version = 1
        self.records = records or {}
        self.loads = 0
        self.closed = False
        self.fail_writes = 0

    def record_accesses(self, accesses):
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError("disk I/O error")
        self.writes.append(sorted(accesses))

    def data_version(self):
        return self.version

    def load_all(self):
        self.loads += 1
        return dict(self.records)

    def close(self):
        self.closed = True


class FakeRunner:
    """Runs work when told to, as a worker thread would, one call at a time."""

    def __init__(self):
        self.queue = []

    def __call__(self, f, *args):
        d = Deferred()
        self.queue.append((d, f, args))
        return d

    def finish(self):
        d, f, args = self.queue.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


class StoreSyncTests(SynchronousTestCase):
    def setUp(self):
        self.table = DeviceTable(300)
        for device_id in ("a", "b"):
            self.table.put(DeviceState(device_id, b"k" * 32))
        self.db = FakeRegistry({"a": "record-a"})
        self.opened = []
        self.runner = FakeRunner()
        self.applied = []
        self.store = StoreSync(self.table, self.open, self.runner, self.applied.append)

    def open(self):
        self.opened.append(self.db)
        return self.db

    def notify(self, device_id, when):
        self.table.notify_a(device_id, ("198.51.100.1", 1000), None, None, when)

    def test_round_on_the_worker(self):
        self.notify("a", 10.0)
        d = self.store.round()
        self.assertEqual((self.db.writes, self.applied), ([], []))  # nothing inline
        self.runner.finish()
        self.successResultOf(d)
        self.assertEqual(self.db.writes, [[("a", 10.0, "198.51.100.1", 1000)]])
        # The first round reads the registry once; later ones only when it changed.
        self.assertEqual(self.applied, [{"a": "record-a"}])
        self.store.round()
        self.runner.finish()
        self.assertEqual(self.applied, [{"a": "record-a"}, None])
        self.db.version = 2
        self.store.round()
        self.runner.finish()
        self.assertEqual(self.db.loads, 2)
        self.assertEqual(self.opened, [self.db])

    def test_rounds_do_not_overlap(self):
        """In a TimerService, a round still on the worker holds the next one back."""
        clock = Clock()
        timer = TimerService(1.0, self.store.round)
        timer.clock = clock
        timer.startService()
        self.assertEqual(len(self.runner.queue), 1)
        self.notify("a", 1.0)
        clock.advance(5)
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.finish()
        clock.advance(1)
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.finish()
        self.assertEqual(self.db.writes, [[("a", 1.0, "198.51.100.1", 1000)]])
        d = timer.stopService()
        self.successResultOf(d)

    def test_failure_logged_and_retried_newest_wins(self):
        self.db.fail_writes = 1
        self.notify("a", 1.0)
        self.notify("b", 2.0)
        d = self.store.round()
        self.runner.finish()
        self.successResultOf(d)  # a failed round does not fail the timer
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.db.writes, [])
        self.notify("b", 3.0)
        self.store.round()
        self.runner.finish()
        self.assertEqual(self.db.writes, [[("a", 1.0, "198.51.100.1", 1000),
                                           ("b", 3.0, "198.51.100.1", 1000)]])

    def test_close_flushes_then_closes_on_the_worker(self):
        self.store.round()
        self.runner.finish()
        self.notify("b", 5.0)
        d = self.store.close()
        self.runner.finish()
        self.assertEqual(self.db.writes[-1], [("b", 5.0, "198.51.100.1", 1000)])
        self.assertFalse(self.db.closed)
        self.runner.finish()
        self.assertTrue(self.db.closed)
        self.successResultOf(d)

    def test_apply_failure_logged_and_read_again(self):
        def apply(records):
            raise ValueError("bad record")

        store = StoreSync(self.table, self.open, self.runner, apply)
        store.round()
        self.runner.finish()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        store.round()
        self.runner.finish()
        self.assertEqual(self.db.loads, 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_sync_now_inline(self):
        main = FakeRegistry({"b": "record-b"})
        self.notify("a", 7.0)
        self.store.sync_now(main)
        self.assertEqual(main.writes, [[("a", 7.0, "198.51.100.1", 1000)]])
        self.assertEqual(self.applied, [{"b": "record-b"}])
        self.assertEqual(self.runner.queue, [])


class RelayServiceStoreTests(SynchronousTestCase):
    """The service's rounds write through a connection of their own."""

    def test_write_reaches_the_file_and_stop_flushes(self):
        state = os.path.abspath(self.mktemp())
        from p2pnat.cli import main as cli
        self.assertEqual(cli(["relay", "init", "--state-dir", state, "--hostname", "r.test"]), 0)
        out = os.path.abspath(self.mktemp())
        self.assertEqual(cli(["device", "add", "cam", "--state-dir", state, "--relay",
                              "127.0.0.1:7478", "--service", "127.0.0.1:80", "--out", out]), 0)
        config = C.load(None, tap.SCHEMA, {"relay.state_dir": state, "udp.listen": "127.0.0.1:0",
                                           "terminal.https": "", "tunnel.listen": ""})
        svc = tap.RelayService(config, UDPMemoryReactor(), run_blocking=synchronous,
                               run_store=synchronous)
        self.assertIsNotNone(svc.table.get("cam"))
        svc.table.notify_a("cam", ("198.51.100.7", 4000), None, None, 1234.0)
        self.successResultOf(svc.store.round())
        self.assertEqual(svc.registry.device("cam").last_access, 1234.0)
        svc.table.notify_a("cam", ("198.51.100.7", 4000), None, None, 1300.0)
        svc.startService()
        self.successResultOf(svc.stopService())
        with Registry.open_state_dir(state, create=False) as reg:
            self.assertEqual(reg.device("cam").last_access, 1300.0)

