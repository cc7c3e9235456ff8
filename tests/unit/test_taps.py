"""
The twistd plugins of the relay, the lobby and the device agent, in memory:
their options (``--config FILE`` and ``--section-key`` overrides), their
one-line config errors, and the service tree ``makeService`` builds, which
is then started and stopped on a fake reactor (no sockets, no real time).
"""

import io
import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import logs
from p2pnat.daemon.services import EndpointListener, UDPService
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import stun, wire
from p2pnat.relay.core import synchronous
from tests.support import procs
from tests.support.procs import provision
from tests.support.udp import FakeUDPTransport

ETC = os.path.join(procs.REPO, "etc")


class FakeUDPPort:
    """What L{UDPService} needs of a listening UDP port."""

    def __init__(self, protocol, host, port):
        self.protocol = protocol
        self.transport = FakeUDPTransport(None, host, port)
        self.listening = True
        protocol.makeConnection(self.transport)

    def getHost(self):
        return self.transport.getHost()

    def stopListening(self):
        self.listening = False
        self.protocol.doStop()


class UDPMemoryReactor(MemoryReactorClock):
    """
    L{MemoryReactorClock} plus C{listenUDP}, which it lacks: a port number
    0 is given the next free fake port from 40000.
    """

    def __init__(self):
        super().__init__()
        self.udpPorts = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        p = FakeUDPPort(protocol, interface, port or 40000 + len(self.udpPorts))
        self.udpPorts.append(p)
        return p


class TapTestCase(SynchronousTestCase):
    """
    Helpers.  makeService sets the process-wide log level from the config;
    it is put back after each test.
    """

    tap = None  # the module under test
    daemon = None  # its twistd name

    def setUp(self):
        level = logs._threshold.level
        self.addCleanup(setattr, logs._threshold, "level", level)

    def tmpdir(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write(self, text):
        path = os.path.join(self.tmpdir(), f"{self.daemon}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def etc(self):
        return os.path.join(ETC, f"{self.daemon}.toml")

    def options(self, *argv):
        options = self.tap.Options()
        options.parseOptions(list(argv))
        return options

    def config_error(self, *argv):
        """
        Parse C{argv}, which must fail: return the one line written to
        stderr, after checking it is one line and the exit status is 1.
        """
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as cm:
            self.options(*argv)
        self.assertEqual(cm.exception.code, 1)
        line = err.getvalue()
        self.assertTrue(line.endswith("\n") and line.count("\n") == 1, repr(line))
        self.assertTrue(line.startswith(f"twistd {self.daemon}: "), line)
        self.assertNotIn("Traceback", line)
        return line

    def etc_with(self, old, new):
        """The daemon's etc/ config file with C{old} replaced by C{new}."""
        with open(self.etc()) as f:
            text = f.read()
        self.assertIn(old, text)
        return self.write(text.replace(old, new, 1))

    def assert_file_errors(self, old, new, key):
        """
        A missing file, an unknown key and a bad value (C{old} replaced by
        C{new} in the daemon's etc/ file) each give one line naming the
        file and the key.
        """
        missing = os.path.join(self.tmpdir(), "missing.toml")
        line = self.config_error("--config", missing)
        self.assertEqual(line, f"twistd {self.daemon}: {missing}: no such config file\n")
        unknown = self.etc_with("[log]\n", '[log]\nlevle = "debug"\n')
        self.assertEqual(self.config_error("--config", unknown),
                         f"twistd {self.daemon}: {unknown}: log.levle: unknown key\n")
        bad = self.etc_with(old, new)
        line = self.config_error("--config", bad)
        self.assertTrue(line.startswith(f"twistd {self.daemon}: {bad}: {key}: "), line)

    def start(self, svc):
        """Start C{svc} as twistd does; it is stopped at the end of the test."""
        svc.privilegedStartService()
        svc.startService()

        def stop():
            if svc.running:
                self.successResultOf(svc.stopService())

        self.addCleanup(stop)

    def timers(self, svc):
        return [s for s in svc if isinstance(s, TimerService)]

    def udp_services(self, svc):
        return [s for s in svc if isinstance(s, UDPService)]


def stun_exchange(proto, source=("127.0.0.1", 5555)):
    """Give C{proto} a Binding request; return the mapped address it answers."""
    tid, request = stun.binding_request()
    proto.transport.written.clear()
    proto.datagramReceived(request, source)
    [(answer, to)] = proto.transport.written
    return to, stun.parse_binding_response(answer, tid).mapped


class RelayTapTests(TapTestCase):
    from p2pnat.relay import tap

    daemon = "relay"

    def relay_options(self, *more):
        self.state = os.path.join(self.tmpdir(), "state")
        return self.options(
            "--config", self.etc(), "--relay-state-dir", self.state,
            "--udp-listen", "127.0.0.1:17478,127.0.0.1:17479",
            "--terminal-https", "tcp:18443:interface=127.0.0.1",
            "--tunnel-listen", "tcp:17443:interface=127.0.0.1", *more)

    def make(self, options, reactor):
        """The relay's service on an in-memory reactor: blocking work runs inline."""
        return self.tap.makeService(options, reactor, run_blocking=synchronous,
                                    run_store=synchronous)

    def test_options(self):
        """The file's values, overridden by the command line."""
        options = self.relay_options("--relay-access-check-period", "60")
        c = options.config
        self.assertEqual(c.path, self.etc())
        # From etc/relay.toml:
        self.assertEqual(c["relay.hostname"], "relay.localhost")
        self.assertEqual(c["relay.notify_b_interval"], 20)
        self.assertEqual(c["terminal.http"], "")
        # From the command line:
        self.assertEqual(c["relay.access_check_period"], 60)
        self.assertEqual(c["udp.listen"], ["127.0.0.1:17478", "127.0.0.1:17479"])
        self.assertEqual(c["tunnel.listen"], "tcp:17443:interface=127.0.0.1")
        self.assertEqual(c.path_of("relay.state_dir"), self.state)

    def test_config_errors(self):
        self.assert_file_errors("access_check_period = 300", "access_check_period = -1",
                                "relay.access_check_period")
        line = self.config_error("--config", self.etc(), "--relay-access-check-period", "soon")
        self.assertEqual(line, "twistd relay: --relay-access-check-period:"
                               " relay.access_check_period: expected an integer, got 'soon'\n")
        line = self.config_error("--config", self.etc(), "--terminal-https", "8443")
        self.assertTrue(line.startswith("twistd relay: --terminal-https: terminal.https: "),
                        line)

    def test_service_tree(self):
        """
        One UDP service per udp.listen address, sharing one handler; the
        tunnel and terminal listeners; a TimerService on the given reactor.
        """
        reactor = UDPMemoryReactor()
        svc = self.make(self.relay_options(
            "--terminal-http", "tcp:18080:interface=127.0.0.1", "--relay-sync-interval", "2"),
            reactor)
        self.addCleanup(svc.registry.close)
        self.assertIsInstance(svc, service.MultiService)
        self.assertTrue(os.path.exists(os.path.join(self.state, "ca.crt")),
                        "the relay made its CA on first start")
        udp = self.udp_services(svc)
        self.assertEqual([(u.host, u.portnum) for u in udp],
                         [("127.0.0.1", 17478), ("127.0.0.1", 17479)])
        self.assertEqual(udp, svc.udp)
        for u in udp:
            self.assertIs(u.reactor, reactor)
            self.assertIsInstance(u.protocol, ControlProtocol)
            self.assertIs(u.protocol.handler, svc.handler)
            self.assertIs(u.protocol.replay, svc.replay)
            # One STUN limit per source across the relay's sockets, as in the lobby.
            self.assertIs(u.protocol.stun_limit, udp[0].protocol.stun_limit)
        self.assertIsNotNone(udp[0].protocol.stun_limit)
        listeners = [s for s in svc if isinstance(s, EndpointListener)]
        self.assertEqual([s.description for s in listeners],
                         ["tcp:17443:interface=127.0.0.1", "tcp:18443:interface=127.0.0.1",
                          "tcp:18080:interface=127.0.0.1"])
        self.assertEqual(listeners, [svc.tunnel_listener, svc.terminal_https, svc.terminal_http])
        [timer] = self.timers(svc)
        self.assertIs(timer.clock, reactor)
        self.assertEqual(timer.step, 2.0)
        self.assertEqual((svc.relay.tunnel_port, svc.relay.https_port, svc.relay.http_port),
                         (17443, 18443, 18080))

    def test_listeners_off(self):
        """An empty endpoint turns a listener off; metrics.listen adds metrics."""
        svc = self.make(self.relay_options(
            "--terminal-https", "", "--metrics-listen", "tcp:19101:interface=127.0.0.1"),
            UDPMemoryReactor())
        self.addCleanup(svc.registry.close)
        self.assertEqual([s.description for s in svc if isinstance(s, EndpointListener)],
                         ["tcp:17443:interface=127.0.0.1"])
        self.assertIsNone(svc.terminal_https)
        self.assertEqual(len([s for s in svc if isinstance(s, StreamServerEndpointService)]), 1)

    def test_start_stop(self):
        """
        Started, it listens where configured, answers STUN, a device's
        period request and notify A, and writes the notify's time to the
        store on the reactor's clock; stopped, nothing is left listening
        or scheduled.
        """
        reactor = UDPMemoryReactor()
        reactor.advance(1_700_000_000)
        options = self.relay_options()
        bundle = os.path.join(self.tmpdir(), "dev-1")
        provision("relay", "init", "--state-dir", self.state, "--hostname", "relay.localhost")
        provision("device", "add", "dev-1", "--state-dir", self.state, "--relay",
                  "127.0.0.1:17478", "--service", "127.0.0.1:9", "--out", bundle)
        with open(os.path.join(bundle, "mac.key")) as f:
            key = bytes.fromhex(f.read().strip())
        svc = self.make(options, reactor)
        self.start(svc)

        self.assertEqual([(p.transport.host, p.transport.port) for p in reactor.udpPorts],
                         [("127.0.0.1", 17478), ("127.0.0.1", 17479)])
        self.assertEqual([(port, interface) for port, f, backlog, interface in
                          reactor.tcpServers], [(17443, "127.0.0.1"), (18443, "127.0.0.1")])
        proto = reactor.udpPorts[1].protocol
        self.assertEqual(stun_exchange(proto), (("127.0.0.1", 5555), ("127.0.0.1", 5555)))

        device = ("127.0.0.1", 5556)

        def exchange(message):
            stamp = int(reactor.seconds() * 1e6)
            proto.transport.written.clear()
            proto.datagramReceived(wire.seal(message, "dev-1", key, stamp), device)
            [(answer, to)] = proto.transport.written
            self.assertEqual(to, device)
            return stamp, wire.unseal(answer, lambda kid, t: key)[1]

        stamp, period = exchange(wire.PeriodRequest())
        self.assertEqual((period.period, period.notify_b_max, period.echo), (300, 20, stamp))
        stamp, ack = exchange(wire.NotifyA(local=device))
        self.assertEqual((ack.echo, ack.observed), (stamp, device))
        self.assertIsNone(svc.registry.device("dev-1").last_access)
        reactor.advance(1.0)  # relay.sync_interval, on the reactor passed in
        self.assertEqual(svc.registry.device("dev-1").last_access, stamp / 1e6)

        self.successResultOf(svc.stopService())
        self.assertEqual([p.listening for p in reactor.udpPorts], [False, False])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_runners(self):
        """
        Runners given are used and no pool is made; by default the relay
        has its own credential and store pools, not started before it is.
        """
        calls = []

        def run_store(f, *args):
            calls.append(f)
            return synchronous(f, *args)

        svc = self.make(self.relay_options(), UDPMemoryReactor())
        self.addCleanup(svc.registry.close)
        self.assertEqual(svc.pools, [])
        svc = self.tap.makeService(self.relay_options(), UDPMemoryReactor(),
                                   run_blocking=synchronous, run_store=run_store)
        self.addCleanup(svc.registry.close)
        self.successResultOf(svc.store.round())
        self.assertEqual(len(calls), 1)

        # (Started and stopped with the service on a real reactor:
        # tests.unit.test_relay_loopback.)
        svc = self.tap.makeService(self.relay_options("--credentials-threads", "3"),
                                   UDPMemoryReactor())
        self.addCleanup(svc.registry.close)
        self.assertEqual(sorted((p.name, p.max) for p in svc.pools),
                         [("p2pnat-relay-credentials", 3), ("p2pnat-relay-store", 1)])
        self.assertFalse(any(p.started for p in svc.pools))


class LobbyTapTests(TapTestCase):
    from p2pnat.lobby import tap

    daemon = "lobby"

    def lobby_options(self, *more):
        self.state = os.path.join(self.tmpdir(), "state")
        return self.options("--config", self.etc(), "--lobby-state-dir", self.state, *more)

    def test_options(self):
        options = self.lobby_options("--udp-stun-rate", "5")
        c = options.config
        self.assertEqual(c.path, self.etc())
        self.assertEqual(c["udp.listen"], ["0.0.0.0:3478", "0.0.0.0:3479"])  # the file's
        self.assertEqual(c["lobby.sync_interval"], 1.0)
        self.assertEqual(c["udp.stun_rate"], 5.0)
        self.assertEqual(c.path_of("lobby.state_dir"), self.state)

    def test_config_errors(self):
        self.assert_file_errors('listen = ["0.0.0.0:3478", "0.0.0.0:3479"]',
                                'listen = ["localhost:3478"]', "udp.listen")
        line = self.config_error("--config", self.etc(), "--udp-listen", "127.0.0.1")
        self.assertTrue(line.startswith("twistd lobby: --udp-listen: udp.listen: "), line)

    def test_service_tree(self):
        reactor = UDPMemoryReactor()
        svc = self.tap.makeService(self.lobby_options(
            "--udp-listen", "127.0.0.1:13478,127.0.0.1:13479,127.0.0.2:13478"), reactor)
        self.addCleanup(svc.registry.close)
        udp = self.udp_services(svc)
        self.assertEqual([(u.host, u.portnum) for u in udp],
                         [("127.0.0.1", 13478), ("127.0.0.1", 13479), ("127.0.0.2", 13478)])
        for u in udp:
            self.assertIs(u.reactor, reactor)
            self.assertIs(u.protocol.handler, svc.handler)
        self.assertEqual(len({id(u.protocol.replay) for u in udp}), 1, "one replay guard")
        [timer] = self.timers(svc)
        self.assertIs(timer.clock, reactor)
        self.assertEqual(timer.step, 1.0)

    def test_one_stun_limit_per_source_across_sockets(self):
        """
        A source gets udp.stun_rate answers per second (burst: twice that)
        from the whole lobby, not from each of its sockets (issue #9, item 9).
        """
        reactor = UDPMemoryReactor()
        svc = self.tap.makeService(self.lobby_options(
            "--udp-listen", "127.0.0.1:13478,127.0.0.1:13479,127.0.0.2:13478,127.0.0.2:13479",
            "--udp-stun-rate", "5"), reactor)
        self.start(svc)
        answered = 0
        for _ in range(10):
            for p in reactor.udpPorts:
                p.protocol.transport.written.clear()
                p.protocol.datagramReceived(stun.binding_request()[1], ("192.0.2.7", 5555))
                answered += len(p.protocol.transport.written)
        self.assertEqual(answered, 10)  # the burst, once
        # Another source has its own bucket.
        self.assertEqual(stun_exchange(reactor.udpPorts[3].protocol)[1], ("127.0.0.1", 5555))

    def test_start_stop(self):
        """
        Started, each socket answers STUN and a client's ping; the registry
        sync runs on the reactor's clock and picks up a client added while
        running; stopped, nothing is left listening or scheduled.
        """
        reactor = UDPMemoryReactor()
        reactor.advance(1_700_000_000)
        svc = self.tap.makeService(self.lobby_options(
            "--udp-listen", "127.0.0.1:13478,127.0.0.1:0"), reactor)
        self.start(svc)
        self.assertEqual([(p.transport.host, p.transport.port) for p in reactor.udpPorts],
                         [("127.0.0.1", 13478), ("127.0.0.1", 40001)])
        for p in reactor.udpPorts:
            self.assertEqual(stun_exchange(p.protocol)[1], ("127.0.0.1", 5555))

        bundle = os.path.join(self.tmpdir(), "cl-1")
        provision("client", "add", "cl-1", "--state-dir", self.state, "--lobby",
                  "127.0.0.1:13478", "--out", bundle)
        with open(os.path.join(bundle, "mac.key")) as f:
            key = bytes.fromhex(f.read().strip())
        proto = reactor.udpPorts[1].protocol

        def ping():
            stamp = int(reactor.seconds() * 1e6)
            proto.transport.written.clear()
            proto.datagramReceived(wire.seal(wire.Ping(), "cl-1", key, stamp),
                                   ("127.0.0.1", 5557))
            return stamp, proto.transport.written

        self.assertEqual(ping()[1], [], "not registered when the lobby last looked")
        reactor.advance(1.0)  # the sync timer, on this reactor, reloads the registry
        stamp, [(answer, to)] = ping()
        frame, pong = wire.unseal(answer, lambda kid, t: key)
        self.assertEqual((to, pong.echo, pong.observed),
                         (("127.0.0.1", 5557), stamp, ("127.0.0.1", 5557)))

        self.successResultOf(svc.stopService())
        self.assertEqual([p.listening for p in reactor.udpPorts], [False, False])
        self.assertEqual(reactor.getDelayedCalls(), [])


class AgentTapTests(TapTestCase):
    from p2pnat.agent import tap

    daemon = "device-agent"

    def setUp(self):
        super().setUp()
        state = os.path.join(self.tmpdir(), "relay")
        provision("relay", "init", "--state-dir", state, "--hostname", "relay.localhost")
        self.bundle = os.path.join(self.tmpdir(), "dev-1")
        provision("device", "add", "dev-1", "--state-dir", state, "--relay", "127.0.0.1:17478",
                  "--service", "127.0.0.1:8080", "--out", self.bundle)
        self.agent_toml = os.path.join(self.bundle, "agent.toml")
        with open(os.path.join(self.bundle, "mac.key")) as f:
            self.key = bytes.fromhex(f.read().strip())

    def in_bundle(self, name):
        return os.path.join(self.bundle, name)

    def test_bundle_options(self):
        """The bundle `p2pnat device add` wrote, with command-line overrides."""
        options = self.options("--config", self.agent_toml, "--udp-listen", "127.0.0.1:0",
                               "--agent-notify-b-interval", "5",
                               "--agent-extra-services", "ssh=127.0.0.1:22")
        c = options.config
        self.assertEqual((c["agent.device_id"], c["agent.relay"], c["agent.relay_hostname"]),
                         ("dev-1", "127.0.0.1:17478", "relay.localhost"))
        self.assertEqual((c["udp.listen"], c["agent.notify_b_interval"]), ("127.0.0.1:0", 5.0))
        self.assertEqual(c.path_of("agent.mac_key_file"), self.in_bundle("mac.key"))
        self.assertEqual(options.mac_key, self.key)
        self.assertEqual(options.services,
                         {"": ("127.0.0.1", 8080), "ssh": ("127.0.0.1", 22)})
        self.assertIsNotNone(options.tls)

    def test_etc_options(self):
        """etc/device-agent.toml, with the bundle's files given on the command line."""
        options = self.options(
            "--config", self.etc(), "--agent-device-id", "dev-1",
            "--agent-mac-key-file", self.in_bundle("mac.key"),
            "--agent-cert-file", self.in_bundle("device.crt"),
            "--agent-key-file", self.in_bundle("device.key"),
            "--agent-ca-file", self.in_bundle("ca.crt"))
        c = options.config
        self.assertEqual(c.path, self.etc())
        self.assertEqual((c["agent.device_id"], c["agent.relay"]),
                         ("dev-1", "relay.localhost:7478"))
        self.assertEqual(options.mac_key, self.key)

    def test_config_errors(self):
        self.assert_file_errors("max_tunnels = 64", "max_tunnels = 0", "agent.max_tunnels")
        toml = self.agent_toml

        def error_with(name, mode=None, text=None):
            path = self.in_bundle(name)
            if text is not None:
                with open(path, "w") as f:
                    f.write(text)
            if mode is not None:
                os.chmod(path, mode)
            return self.config_error("--config", toml)

        line = error_with("mac.key", mode=0o644)
        self.assertEqual(line, f"twistd device-agent: {toml}: agent.mac_key_file:"
                               f" {self.in_bundle('mac.key')}: secret file is accessible by"
                               " group or others (mode 0644); run: chmod 600"
                               f" {self.in_bundle('mac.key')}\n")
        line = error_with("mac.key", mode=0o600, text="abcd\n")
        self.assertTrue(line.startswith(f"twistd device-agent: {toml}: agent.mac_key_file: "),
                        line)
        os.unlink(self.in_bundle("mac.key"))
        line = self.config_error("--config", toml)
        self.assertTrue(line.startswith(f"twistd device-agent: {toml}: agent.mac_key_file:"
                                        f" {self.in_bundle('mac.key')}: no such file"), line)
        line = self.config_error("--config", self.etc())
        self.assertTrue(line.startswith(f"twistd device-agent: {self.etc()}:"
                                        " agent.mac_key_file:"), line)
        self.assertIn("mac.key: no such file", line)

    def test_missing_device_id(self):
        path = self.write("[agent]\nrelay = \"127.0.0.1:7478\"\n")
        line = self.config_error("--config", path)
        self.assertTrue(line.startswith(f"twistd device-agent: {path}: agent.device_id: missing"),
                        line)

    def test_service_tree(self):
        """One UDP service on udp.listen; the notifier's timers on the reactor."""
        reactor = UDPMemoryReactor()
        options = self.options("--config", self.agent_toml, "--udp-listen", "127.0.0.1:0")
        svc = self.tap.makeService(options, reactor)
        [udp] = self.udp_services(svc)
        self.assertEqual((udp.host, udp.portnum), ("127.0.0.1", 0))
        self.assertIs(udp.reactor, reactor)
        self.assertIs(udp.protocol, svc.proto)
        self.assertIs(svc.proto.handler, svc.notifier)
        self.assertIs(svc.notifier.clock, reactor)
        self.assertEqual(svc.notifier.mac_key, self.key)
        self.assertEqual(self.timers(svc), [])  # its timers are the notifier's LoopingCalls

    def test_start_stop(self):
        """
        Started, it asks the relay for its period; once answered it sends
        notifies on the reactor's clock; stopped, nothing is left.
        """
        reactor = UDPMemoryReactor()
        reactor.advance(1_700_000_000)
        options = self.options("--config", self.agent_toml, "--udp-listen", "127.0.0.1:0",
                               "--agent-notify-b-interval", "5")
        svc = self.tap.makeService(options, reactor)
        self.start(svc)
        [port] = reactor.udpPorts
        self.assertEqual((port.transport.host, port.transport.port), ("127.0.0.1", 40000))
        relay = ("127.0.0.1", 17478)

        def sent():
            """(frame, message) sent since last time, all to the relay."""
            out = []
            for data, to in port.transport.written:
                self.assertEqual(to, relay)
                out.append(wire.unseal(data, lambda kid, t: self.key if kid == "dev-1" else None))
            port.transport.written.clear()
            return out

        [(frame, request)] = sent()
        self.assertIsInstance(request, wire.PeriodRequest)
        reactor.advance(1.0)
        [(frame, request)] = sent()  # retried until answered
        self.assertIsInstance(request, wire.PeriodRequest)
        now = int(reactor.seconds() * 1e6)
        port.protocol.datagramReceived(
            wire.seal(wire.Period(30, 25, now, frame.timestamp), "dev-1", self.key, now), relay)
        # Notify A at once, then every period / 3 = 10 s; notify B every 5 s.
        [(frame, notify_a)] = sent()
        self.assertIsInstance(notify_a, wire.NotifyA)
        self.assertEqual(notify_a.local, ("127.0.0.1", 40000))
        reactor.advance(5.0)
        self.assertEqual([type(m) for f, m in sent()], [wire.NotifyB])
        reactor.advance(5.0)
        self.assertEqual(sorted(type(m).__name__ for f, m in sent()), ["NotifyA", "NotifyB"])

        self.successResultOf(svc.stopService())
        self.assertFalse(port.listening)
        self.assertEqual(reactor.getDelayedCalls(), [])
