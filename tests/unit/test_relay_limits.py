"""
Connection limits and timeouts of the relay (p2pnat.relay.limits and its
use by the terminal, tunnel and tap): nobody can take the relay's or a
device's capacity.  In memory, on a Clock; tests/process/test_relay_limits.py
does the same with real sockets.
"""

import resource

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from p2pnat.net import fastio
from p2pnat.protocol import tunnel
from p2pnat.relay import limits, tap
from p2pnat.relay.core import Timeouts, synchronous
from p2pnat.relay.limits import (
    TERMINAL,
    TUNNEL,
    ConnectionLimits,
    IdleWatch,
    QuietProbe,
    Sizes,
    StreamShares,
    Throttle,
)
from p2pnat.relay.terminal import Terminal, TerminalFactory
from p2pnat.relay.tunnel import RelayTunnelFactory
from tests.unit.test_relay_terminal import Transport, World, status


def v4(host):
    return IPv4Address("TCP", host, 1234)


class SourceTests(SynchronousTestCase):
    def test_sources(self):
        self.assertEqual(limits.source_of(v4("192.0.2.7")), "192.0.2.7")
        self.assertEqual(limits.source_of(IPv6Address("TCP", "2001:db8:1:2:aa::1", 1)),
                         "2001:db8:1:2::/64")
        # One /64 is one source, whatever the interface ID.
        self.assertEqual(limits.source_of(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 1)),
                         "2001:db8:1:2::/64")
        self.assertNotEqual(limits.source_of(IPv6Address("TCP", "2001:db8:1:3::1", 1)),
                            "2001:db8:1:2::/64")
        self.assertEqual(limits.source_of(IPv6Address("TCP", "::ffff:192.0.2.7", 1)),
                         "192.0.2.7")
        self.assertEqual(limits.source_of(IPv6Address("TCP", "fe80::1%eth0", 1)), "fe80::/64")
        self.assertEqual(limits.source_of(UNIXAddress(b"/tmp/x")), "local")
        self.assertEqual(limits.source_of(None), "local")


class SizeTests(SynchronousTestCase):
    def test_from_the_open_file_limit(self):
        sizes, clamped = limits.size(1024)
        self.assertEqual((sizes.max_connections, sizes.tunnel_reserve, sizes.max_terminals,
                          clamped), (960, 480, 480, False))
        sizes, _ = limits.size(65536, tunnel_share=0.25)
        self.assertEqual((sizes.max_connections, sizes.tunnel_reserve), (65472, 16368))

    def test_configured_cap_never_above_the_limit(self):
        self.assertEqual(limits.size(1024, 500)[0].max_connections, 500)
        sizes, clamped = limits.size(1024, 5000)
        self.assertEqual((sizes.max_connections, clamped), (960, True))

    def test_unlimited_and_tiny(self):
        self.assertEqual(limits.size(resource.RLIM_INFINITY)[0].max_connections, limits.MAX_AUTO)
        sizes, _ = limits.size(10)
        self.assertEqual((sizes.max_connections, sizes.max_terminals), (2, 1))
        sizes, _ = limits.size(1024, 3, tunnel_share=0.99)
        self.assertEqual(sizes.max_terminals, 1)  # terminals always get one

    def test_tap_sizes_from_getrlimit(self):
        config = C.load(None, tap.SCHEMA, {})
        got, nofile, clamped = tap.connection_limits(config, Clock(), lambda outcome: None)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual((nofile, clamped), (soft, False))
        self.assertEqual(got.sizes, limits.size(soft)[0])
        config = C.load(None, tap.SCHEMA, {
            "limits.max_connections": "100", "limits.tunnel_share": "0.2",
            "limits.terminals_per_source": "7", "limits.tunnels_per_source": "9"})
        got, _, _ = tap.connection_limits(config, Clock(), lambda outcome: None, nofile=1024)
        self.assertEqual(got.sizes, Sizes(100, 20, 7, 9))

    def test_bad_settings(self):
        for name, value in [("limits.tunnel_share", "1"), ("limits.tunnel_share", "-0.1"),
                            ("limits.max_connections", "-1"),
                            ("limits.terminals_per_source", "0"),
                            ("limits.streams_per_device_source", "0"),
                            ("terminal.first_byte_timeout", "0"),
                            ("terminal.stream_idle_timeout", "0"),
                            ("terminal.connect_idle_timeout", "0")]:
            with self.assertRaises(C.ConfigError, msg=name):
                C.load(None, tap.SCHEMA, {name: value})


class ConnectionLimitsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.counted = []
        self.limits = ConnectionLimits(Sizes(10, 4, 3, 5), self.clock, self.counted.append)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def refusals(self):
        return [e for e in self.events
                if e.get("log_namespace", "").startswith("p2pnat.relay.limits")]

    def test_per_source(self):
        held = [self.limits.admit(TERMINAL, "a") for _ in range(3)]
        self.assertNotIn(None, held)
        self.assertIsNone(self.limits.admit(TERMINAL, "a"))
        self.assertIsNotNone(self.limits.admit(TERMINAL, "b"))  # another source gets in
        self.assertIsNotNone(self.limits.admit(TUNNEL, "a"))  # and a's devices
        held[0].release()
        held[0].release()  # idempotent
        self.assertEqual(self.limits.from_source(TERMINAL, "a"), 2)
        self.assertIsNotNone(self.limits.admit(TERMINAL, "a"))
        self.assertEqual(self.counted, ["refused-terminal-per-source"])

    def test_reserve_for_tunnels(self):
        terminals = [self.limits.admit(TERMINAL, f"s{i}") for i in range(6)]
        self.assertNotIn(None, terminals)
        self.assertIsNone(self.limits.admit(TERMINAL, "new"))  # 6 = 10 - 4 reserved
        tunnels = [self.limits.admit(TUNNEL, "dev") for _ in range(4)]
        self.assertNotIn(None, tunnels)
        self.assertIsNone(self.limits.admit(TUNNEL, "dev2"))  # 10 in all
        self.assertEqual(self.counted, ["refused-terminal-reserve", "refused-tunnel-total"])
        for slot in terminals + tunnels:
            slot.release()
        self.assertEqual((self.limits.total, self.limits.open, self.limits._per_source),
                         (0, {TERMINAL: 0, TUNNEL: 0}, {TERMINAL: {}, TUNNEL: {}}))

    def test_refusals_logged_rate_limited(self):
        for _ in range(3):
            self.limits.admit(TERMINAL, "a")
        for _ in range(50):
            self.limits.admit(TERMINAL, "a")
        self.assertEqual(len(self.counted), 50)
        [line] = self.refusals()
        self.assertEqual((line["source"], line["kind"], line["held"]), ("a", TERMINAL, 0))
        self.clock.advance(limits.LOG_INTERVAL)
        self.limits.admit(TERMINAL, "a")
        self.assertEqual([e["held"] for e in self.refusals()], [0, 49])


class ThrottleTests(SynchronousTestCase):
    def test_throttle(self):
        clock = Clock()
        throttle = Throttle(clock, interval=10, max_keys=2)
        self.assertEqual([throttle("k") for _ in range(3)], [0, None, None])
        clock.advance(10)
        self.assertEqual(throttle("k"), 2)
        throttle("a")
        throttle("b")  # a third key: the table starts again, bounded
        self.assertEqual(len(throttle._last), 1)


class StreamSharesTests(SynchronousTestCase):
    def test_shares(self):
        shares = StreamShares(2)
        self.assertTrue(shares.take("t1", "cam", "a"))
        self.assertTrue(shares.take("t1", "cam", "a"))  # a retry holds the same one
        self.assertTrue(shares.take("t2", "cam", "a"))
        self.assertFalse(shares.take("t3", "cam", "a"))
        self.assertTrue(shares.take("t3", "cam", "b"))
        self.assertTrue(shares.take("t4", "cam2", "a"))
        shares.release("t1")
        shares.release("t1")
        self.assertTrue(shares.take("t5", "cam", "a"))
        for t in ("t2", "t3", "t4", "t5"):
            shares.release(t)
        self.assertEqual((shares._held, shares._holders), ({}, {}))

    def test_no_limit(self):
        shares = StreamShares(0)
        self.assertTrue(all(shares.take(i, "cam", "a") for i in range(100)))


class Path:
    def __init__(self):
        self.got = []
        self.send = self.got.append


class IdleTests(SynchronousTestCase):
    def test_probe(self):
        a, b = Path(), Path()
        probe = QuietProbe([(a, "send"), (b, "send")])
        self.assertFalse(probe.quiet())  # the first look arms the traps
        self.assertTrue(probe.quiet())
        a.send(b"x")
        self.assertEqual(a.got, [b"x"])
        self.assertFalse(probe.quiet())
        self.assertTrue(probe.quiet())
        b.send(b"y")
        b.send(b"z")  # only the first chunk after a look pays the trap
        self.assertEqual(b.got, [b"y", b"z"])
        self.assertFalse(probe.quiet())
        b.send = None  # the path closed: nothing goes that way
        self.assertTrue(probe.quiet())

    def test_sprung_trap_restores_the_path(self):
        a = Path()
        real = a.send
        probe = QuietProbe([(a, "send")])
        probe.quiet()
        self.assertIsNot(a.send, real)
        a.send(b"x")
        self.assertEqual(a.send, real)

    def test_watch(self):
        clock = Clock()
        a = Path()
        fired = []
        probe = QuietProbe([(a, "send")])
        watch = IdleWatch(clock, 100, probe.quiet, lambda: fired.append(clock.seconds()))
        for _ in range(8):
            clock.advance(25)
            a.send(b"x")  # busy: never idle
        self.assertEqual(fired, [])
        start = clock.seconds()
        for _ in range(10):
            clock.advance(25)
        self.assertEqual(len(fired), 1)
        self.assertTrue(100 <= fired[0] - start <= 125, fired[0] - start)
        self.assertEqual(clock.getDelayedCalls(), [])
        watch.stop()
        clock2 = Clock()
        IdleWatch(clock2, 100, lambda: True, fired.append).stop()
        self.assertEqual(clock2.getDelayedCalls(), [])


class FirstByteTests(SynchronousTestCase):
    """A terminal that sends nothing is dropped after terminal.first_byte_timeout."""

    def setUp(self):
        self.w = World(self)
        self.w.add("cam")

    def connect(self):
        t = Terminal(self.w.relay, True)
        t.makeConnection(Transport())
        return t

    def test_silent_connection_dropped_early(self):
        t = self.connect()
        self.w.clock.advance(4.9)
        self.assertFalse(t.transport.aborted)
        self.w.clock.advance(0.2)
        self.assertTrue(t.transport.aborted)

    def test_head_timeout_counts_from_the_start(self):
        t = self.connect()
        self.w.clock.advance(4)
        t.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(6):  # a byte every 4 s: slow, but within each timer
            self.w.clock.advance(4)
            self.assertFalse(t.transport.aborted)
            t.dataReceived(b"X")
        self.w.clock.advance(1.9)  # 29.9 s after connecting
        self.assertFalse(t.transport.aborted)
        self.w.clock.advance(0.2)
        self.assertTrue(t.transport.aborted)

    def test_settings(self):
        self.assertEqual(tap.timeouts(C.load(None, tap.SCHEMA, {
            "terminal.first_byte_timeout": "2", "terminal.stream_idle_timeout": "50",
            "terminal.connect_idle_timeout": "70"})),
            Timeouts(first_byte=2, stream=50, tcp_stream=70))


def decode(data):
    frames = []
    tunnel.FrameDecoder(lambda s: frames.append(("open", s)), lambda d: frames.append(("data", d)),
                        lambda: frames.append("end")).feed(data)
    return frames


class StreamIdleTests(SynchronousTestCase):
    """A stream that carries nothing either way is ended, at no cost per byte."""

    head = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"

    def setUp(self):
        # A long access-check period: the device stays online with no
        # notify while these streams run for many minutes.
        self.w = World(self, period=3600, timeouts=Timeouts(stream=100, tcp_stream=400))
        self.w.add("cam")

    def wait(self, seconds):
        """Let C{seconds} pass as a reactor would, a second at a time."""
        for _ in range(int(seconds)):
            self.w.clock.advance(1)

    def stream(self, head=None):
        t = self.w.terminal(head or self.head)
        tun = self.w.tunnel("cam", session=self.w.session())
        self.assertEqual((t.state, tun.state), ("stream", "stream"))
        return t, tun

    def test_idle_stream_closed(self):
        t, tun = self.stream()
        self.wait(99)
        self.assertFalse(tun.transport.aborted)
        self.wait(26)  # within timeout * (1 + 1/4)
        self.assertTrue(tun.transport.aborted)
        tun.connectionLost(None)
        self.assertTrue(t.transport.disconnecting)  # the terminal goes after what it got
        self.assertFalse(t.transport.aborted)
        self.assertEqual(self.w.relay.metrics.value("p2pnat_sessions_total",
                                                    outcome="stream-idle"), 1)

    def test_traffic_either_way_keeps_it(self):
        t, tun = self.stream()
        for i in range(20):
            self.wait(60)
            if i % 2:
                t.dataReceived(self.head)  # the next request on the kept-alive connection
            else:
                tun.dataReceived(tunnel.frame(tunnel.DATA, b"pong"))
        self.assertFalse(tun.transport.aborted)
        self.assertEqual(t.transport.value(), b"pong" * 10)
        data = [d for kind, d in decode(tun.transport.value()[1:]) if kind == "data"]
        self.assertEqual(b"".join(data), self.head * 11)

    def test_connect_streams_get_longer(self):
        t, tun = self.stream(b"CONNECT cam:ssh HTTP/1.1\r\n\r\n")
        self.assertEqual(t.stream_idle_timeout, 400)
        self.wait(399)
        self.assertFalse(tun.transport.aborted)
        self.wait(101)
        self.assertTrue(tun.transport.aborted)

    def test_draining_bounded(self):
        """The terminal left and the device never ends the stream: the tunnel goes."""
        t, tun = self.stream()
        t.connectionLost(None)
        self.assertEqual(tun.state, "draining")
        self.wait(125)
        self.assertTrue(tun.transport.aborted)

    def test_watch_stops_with_the_stream(self):
        _, tun = self.stream()
        tun.dataReceived(tunnel.frame(tunnel.END))
        self.assertEqual(tun.state, "idle")
        self.assertIsNone(tun.core.stream_watch)
        self.w.clock.advance(59)
        self.assertFalse(tun.transport.disconnecting)


class StreamSharesRelayTests(SynchronousTestCase):
    """
    64 idle kept-alive connections from one source cannot take a device's
    64 tunnels (agent.max_tunnels): the source holds at most
    limits.streams_per_device_source of them, and another source gets in.
    """

    head = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"

    def setUp(self):
        self.w = World(self, max_streams_per_source=16)
        self.w.add("cam")
        self.w.add("safe", mode="relay", credential="open sesame")

    def terminal(self, host="198.51.100.9", head=None):
        t = Terminal(self.w.relay, True)
        transport = Transport()
        transport.peerAddr = v4(host)
        t.makeConnection(transport)
        t.dataReceived(head or self.head)
        return t

    def test_one_source_cannot_take_a_device(self):
        held = []
        for _ in range(16):
            held.append(self.terminal())
            tun = self.w.tunnel("cam", session=self.w.session())
            tun.dataReceived(tunnel.frame(tunnel.DATA, b"HTTP/1.1 200 OK\r\n\r\n"))
        self.assertEqual({t.state for t in held}, {"stream"})
        refused = [self.terminal() for _ in range(48)]
        for t in refused:
            self.assertEqual(status(t.transport), 503)
            self.assertIn(b"Too many connections", t.transport.value())
        self.assertEqual(len(self.w.relay.sessions), 0)  # no connect request for them
        # Another source still reaches the device.
        other = self.terminal("203.0.113.77")
        self.assertEqual(other.state, "waiting")
        # One of the first source's streams ends: its place is free again.
        held[0].connectionLost(None)
        self.assertEqual(self.terminal().state, "waiting")
        self.assertEqual(self.w.relay.metrics.value(
            "p2pnat_sessions_total", outcome="refused-stream-per-source"), 48)

    def test_unauthorized_terminals_hold_nothing(self):
        head = b"GET / HTTP/1.1\r\nHost: safe.relay.test\r\n\r\n"
        for _ in range(20):
            self.assertEqual(status(self.terminal(head=head).transport), 401)
        self.assertEqual(self.w.relay.shares.held("safe", "198.51.100.9"), 0)
        authorized = head.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer open sesame\r\n\r\n")
        self.assertEqual(self.terminal(head=authorized).state, "waiting")
        self.assertEqual(self.w.relay.shares.held("safe", "198.51.100.9"), 1)


class AdmissionTests(SynchronousTestCase):
    """The listeners' factories count connections and close the ones over a limit."""

    def setUp(self):
        self.w = World(self)
        self.limits = ConnectionLimits(Sizes(4, 1, 2, 2), self.w.clock)

    def test_terminals(self):
        app = TerminalFactory(self.w.relay, False)
        factory = tap.Admission(self.limits, TERMINAL, app, app)
        a1, a2 = factory.buildProtocol(v4("192.0.2.1")), factory.buildProtocol(v4("192.0.2.1"))
        self.assertIsNone(factory.buildProtocol(v4("192.0.2.1")))
        self.assertEqual((a1.source, a1.slot.source), ("192.0.2.1", "192.0.2.1"))
        b = factory.buildProtocol(v4("192.0.2.2"))
        self.assertIsNone(factory.buildProtocol(v4("192.0.2.3")))  # the tunnels' reserve
        for t in (a1, a2, b):
            t.makeConnection(Transport())
        self.assertIsNone(app.admitted)
        a1.connectionLost(None)
        self.assertEqual(self.limits.from_source(TERMINAL, "192.0.2.1"), 1)
        self.assertIsNotNone(factory.buildProtocol(v4("192.0.2.3")))

    def test_tunnels_through_tls(self):
        """Refused before any TLS work, with the fast data path or Twisted's own."""
        self.w.add("cam")
        tls = tap.server_tls(self.make_state())
        for fast in (True, False):
            fastio._reset()
            self.addCleanup(fastio._reset)
            fastio.configure(fast)
            got = ConnectionLimits(Sizes(4, 1, 2, 2), self.w.clock)
            app = RelayTunnelFactory(self.w.relay)
            factory = tap.Admission(got, TUNNEL, fastio.TLSFactory(tls.tunnel, False, app,
                                                                  half_rtt=True), app)
            protos = [factory.buildProtocol(v4("192.0.2.1")) for _ in range(3)]
            self.assertIsNotNone(protos[1])
            self.assertIsNone(protos[2])
            self.assertEqual(got.open[TUNNEL], 2)

    def make_state(self):
        import os

        from p2pnat.deployment.provision import init_relay_state

        state = os.path.abspath(self.mktemp())
        init_relay_state(state, "relay.test")
        return state

    def test_service_wraps_its_listeners(self):
        state = __import__("os").path.abspath(self.mktemp())
        config = C.load(None, tap.SCHEMA, {
            "relay.state_dir": state, "udp.listen": "127.0.0.1:0",
            "terminal.http": "tcp:0", "limits.max_connections": "10",
            "limits.terminals_per_source": "1", "limits.streams_per_device_source": "3"})
        svc = tap.RelayService(config, MemoryReactorClock(), run_blocking=synchronous,
                               run_store=synchronous)
        self.addCleanup(svc.registry.close)
        self.assertEqual(svc.relay.shares.per_source, 3)
        for listener, kind in [(svc.terminal_https, TERMINAL), (svc.terminal_http, TERMINAL),
                               (svc.tunnel_listener, TUNNEL)]:
            factory = listener.factory
            self.assertIsInstance(factory, tap.Admission)
            self.assertEqual((factory.kind, factory.limits), (kind, svc.limits))
        t = svc.terminal_http.factory.buildProtocol(v4("192.0.2.1"))
        self.assertIsNone(svc.terminal_http.factory.buildProtocol(v4("192.0.2.1")))
        self.assertEqual(svc.metrics.value("p2pnat_connections", kind="terminal"), 1)
        t.makeConnection(Transport())
        t.connectionLost(None)
        self.assertEqual(svc.metrics.value("p2pnat_connections", kind="terminal"), 0)
        self.assertEqual(svc.metrics.value("p2pnat_sessions_total",
                                           outcome="refused-terminal-per-source"), 1)
