"""
IPv6 in the daemons' settings: listen addresses of both families
(L{p2pnat.daemon.config}), the listeners they make
(L{p2pnat.daemon.services}), and a relay and device agent configured
with them, on the IPv6 loopback with the real reactor.
"""

import os
import socket

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pnat.daemon import config as C
from p2pnat.daemon.metrics import Metrics
from p2pnat.daemon.services import EndpointListener, UDPService, endpoint_port
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import stun, wire
from tests.support.relay import start_agent, start_relay
from tests.unit.test_relay_loopback import Collect, HTTPOnce

SCHEMA = [
    C.Setting("udp.listen", list, ["0.0.0.0:1"], "addresses", C.udp_addresses, item=str),
    C.Setting("terminal.https", str, "tcp:8443", "endpoints", C.endpoints_or_empty),
]


def v6only(port):
    """Whether a listening port's socket takes IPv6 only."""
    return port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


class ParseTests(SynchronousTestCase):
    def test_hostport(self):
        self.assertEqual(C.parse_hostport("[::]:7478"), ("::", 7478))
        self.assertEqual(C.parse_hostport("[2001:2::1]:7478"), ("2001:2::1", 7478))
        self.assertEqual(C.parse_hostport("relay.example.org:7478"), ("relay.example.org", 7478))
        self.assertEqual(C.parse_hostport(":9", "::1"), ("::1", 9))

    def test_hostport_errors(self):
        """An IPv6 address needs brackets: 2001:2::1:7478 could be read two ways."""
        for text, reason in (("2001:2::1:7478", "in brackets"), ("::1:80", "in brackets"),
                             ("[::1]", "[ipv6]:port"), ("[1.2.3.4]:80", "[ipv6]:port"),
                             ("[::1]:x", "bad port"), ("[::1]:70000", "bad port")):
            with self.assertRaises(ValueError) as cm:
                C.parse_hostport(text)
            self.assertIn(reason, str(cm.exception), text)

    def test_listen_endpoints(self):
        self.assertEqual(C.listen_endpoints(""), [])
        self.assertEqual(
            C.listen_endpoints("0.0.0.0:8443 [::]:8443  tcp6:8443:interface=\\:\\:1"),
            [("address", ("0.0.0.0", 8443)), ("address", ("::", 8443)),
             ("endpoint", "tcp6:8443:interface=\\:\\:1")])
        for bad in ("8443", "relay.example.org:8443", "[::1]", "-:1"):
            self.assertRaises(ValueError, C.listen_endpoints, bad)

    def test_endpoint_port(self):
        self.assertEqual(endpoint_port("[::]:8443 0.0.0.0:8443"), 8443)
        self.assertEqual(endpoint_port("tcp:7443:interface=127.0.0.1 [::1]:7000"), 7443)
        self.assertEqual(endpoint_port(""), 0)


class LoadTests(SynchronousTestCase):
    def load(self, text=None, **overrides):
        path = None
        if text is not None:
            path = self.mktemp()
            with open(path, "w") as f:
                f.write(text)
        return C.load(path, SCHEMA, overrides)

    def test_both_families(self):
        c = self.load('udp.listen = ["0.0.0.0:7478", "[::]:7478", "[2001:2::1]:7479"]\n'
                      '[terminal]\nhttps = "0.0.0.0:8443 [::]:8443"\n')
        self.assertEqual(c["udp.listen"], ["0.0.0.0:7478", "[::]:7478", "[2001:2::1]:7479"])
        c = self.load(**{"udp.listen": "0.0.0.0:7478,[::]:7478"})
        self.assertEqual(c["udp.listen"], ["0.0.0.0:7478", "[::]:7478"])

    def test_errors_name_the_key_and_the_fix(self):
        for overrides, key, words in (
                ({"udp.listen": "2001:2::1:7478"}, "udp.listen", "in brackets"),
                ({"udp.listen": "[relay.example.org]:7478"}, "udp.listen", "[ipv6]:port"),
                ({"udp.listen": "relay.example.org:7478"}, "udp.listen", "[::]:7478"),
                ({"terminal.https": "[::]:8443 8443"}, "terminal.https", "'8443'")):
            with self.assertRaises(C.ConfigError) as cm:
                self.load(**overrides)
            message = str(cm.exception)
            self.assertIn(f": {key}: ", message)
            self.assertIn(words, message)
            self.assertNotIn("\n", message)


class ListenerTests(TestCase):
    """Listeners on the IPv6 loopback, with the real reactor."""

    def test_udp_ipv6_only(self):
        """
        An IPv6 UDP address gets a socket that takes IPv6 only (so that
        [::]:P can stand beside 0.0.0.0:P), with the big receive buffer;
        STUN over it tells the asker its IPv6 address.
        """
        proto = ControlProtocol(None, reactor, Metrics("test"), wire.ReplayGuard(reactor),
                                stun_rate=100)
        udp = UDPService(reactor, "::1", 0, proto)
        udp.startService()
        self.addCleanup(udp.stopService)
        self.assertTrue(v6only(udp.port))
        self.assertEqual(udp.address[0], "::1")

        answers = defer.Deferred()

        class Asker(DatagramProtocol):
            def datagramReceived(self, data, addr):
                answers.callback(data)

        asker = reactor.listenUDP(0, Asker(), interface="::1")
        self.addCleanup(asker.stopListening)
        tid, request = stun.binding_request()
        asker.write(request, udp.address)

        def check(data):
            self.assertEqual(stun.parse_binding_response(data, tid).mapped,
                             ("::1", asker.getHost().port))

        return answers.addCallback(check)

    def test_udp_bind_error(self):
        taken = UDPService(reactor, "::1", 0, DatagramProtocol())
        taken.startService()
        self.addCleanup(taken.stopService)
        again = UDPService(reactor, "::1", taken.address[1], DatagramProtocol())
        self.assertRaises(CannotListenError, again.startService)

    @defer.inlineCallbacks
    def test_tcp_both_families(self):
        """
        "127.0.0.1:0 [::1]:0" listens on both (the IPv6 one IPv6-only),
        answers on both, and stops both.
        """
        factory = protocol.Factory.forProtocol(lambda: HTTPOnce(b"hello"))
        listener = EndpointListener(reactor, "127.0.0.1:0 [::1]:0", factory)
        listener.startService()
        self.assertEqual([p.getHost().host for p in listener.ports], ["127.0.0.1", "::1"])
        self.assertEqual(listener.address[0], "127.0.0.1")
        self.assertTrue(v6only(listener.ports[1]))
        for cls, port in ((endpoints.TCP4ClientEndpoint, listener.ports[0]),
                          (endpoints.TCP6ClientEndpoint, listener.ports[1])):
            c = Collect(b"GET / HTTP/1.0\r\n\r\n")
            yield endpoints.connectProtocol(cls(reactor, port.getHost().host,
                                                port.getHost().port), c)
            self.assertTrue((yield c.done).endswith(b"\r\n\r\nhello"))
        ports = list(listener.ports)
        yield listener.stopService()
        self.assertEqual([p.connected for p in ports], [False, False])

    def test_tcp_half_failure_leaves_nothing(self):
        """If one address of the setting cannot listen, none does."""
        taken = EndpointListener(reactor, "[::1]:0", protocol.Factory())
        taken.startService()
        self.addCleanup(taken.stopService)
        listener = EndpointListener(reactor, f"127.0.0.1:0 [::1]:{taken.address[1]}",
                                    protocol.Factory())
        self.assertRaises(CannotListenError, listener.startService)
        self.assertEqual(listener.ports, [])

    def test_bad_endpoint(self):
        with self.assertRaises(C.ConfigError) as cm:
            EndpointListener(reactor, "nosuch:1", protocol.Factory())
        self.assertIn("'nosuch:1'", str(cm.exception))


class LobbyOverIPv6Tests(TestCase):
    """A lobby on both families answers STUN on each, RFC 5780's port change too."""

    def setUp(self):
        from p2pnat.lobby.tap import SCHEMA as LOBBY_SCHEMA
        from p2pnat.lobby.tap import LobbyService

        config = C.load(None, LOBBY_SCHEMA, {
            "lobby.state_dir": os.path.abspath(self.mktemp()),
            "udp.listen": "127.0.0.1:0,[::1]:0,[::1]:0"})
        self.lobby = LobbyService(config, reactor)
        self.lobby.startService()
        self.addCleanup(self.lobby.stopService)

    @defer.inlineCallbacks
    def ask(self, host, to, **change):
        """A Binding request from C{host} to C{to}: (the mapped address, who answered)."""
        answers = defer.Deferred()

        class Asker(DatagramProtocol):
            def datagramReceived(self, data, addr):
                answers.callback((data, addr[:2]))

        asker = reactor.listenUDP(0, Asker(), interface=host)
        self.addCleanup(asker.stopListening)
        tid, request = stun.binding_request(**change)
        asker.write(request, to)
        data, sender = yield answers
        self.assertEqual(stun.parse_binding_response(data, tid).mapped,
                         (host, asker.getHost().port))
        return sender

    @defer.inlineCallbacks
    def test_stun_on_both_families(self):
        v4, v6, other6 = (udp.address for udp in self.lobby.udp)
        self.assertEqual((v4[0], v6[0], other6[0]), ("127.0.0.1", "::1", "::1"))
        self.assertEqual((yield self.ask("127.0.0.1", v4)), v4)
        self.assertEqual((yield self.ask("::1", v6)), v6)
        # Another port of the same family answers a change of port.
        self.assertEqual((yield self.ask("::1", v6, change_port=True)), other6)


class RelayOverIPv6Tests(TestCase):
    """
    A relay listening on the IPv6 loopback (notifies, tunnels) and on both
    families (terminals), and a device agent that knows it by its IPv6
    address: the whole path, notify A, connect request, tunnel and HTTP.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.web = yield endpoints.TCP6ServerEndpoint(reactor, 0, interface="::1").listen(
            protocol.Factory.forProtocol(lambda: HTTPOnce(b"device page")))
        self.addCleanup(self.web.stopListening)
        self.relay = start_relay(self, self.dir, **{
            "udp.listen": "[::1]:0", "tunnel.listen": "[::1]:0",
            "terminal.http": "127.0.0.1:0 [::1]:0"})
        udp = self.relay.udp[0].address
        self.agent = yield defer.Deferred.fromCoroutine(start_agent(
            self, self.relay, "cam", os.path.join(self.dir, "cam"), self.web.getHost().port,
            ("--relay", f"[::1]:{udp[1]}", "--service", f"[::1]:{self.web.getHost().port}"),
            **{"udp.listen": "[::1]:0"}))

    @defer.inlineCallbacks
    def fetch(self, cls, port):
        c = Collect(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        yield endpoints.connectProtocol(cls(reactor, port.getHost().host, port.getHost().port), c)
        return (yield c.done)

    @defer.inlineCallbacks
    def test_page_over_both_families(self):
        self.assertEqual(self.relay.table.get("cam").addr[0], "::1")
        for cls, port in ((endpoints.TCP6ClientEndpoint, self.relay.terminal_http.ports[1]),
                          (endpoints.TCP4ClientEndpoint, self.relay.terminal_http.ports[0])):
            page = yield self.fetch(cls, port)
            self.assertTrue(page.startswith(b"HTTP/1.0 200"), page[:200])
            self.assertTrue(page.endswith(b"\r\n\r\ndevice page"), page[-200:])
        self.assertEqual(self.relay.metrics.value("p2pnat_sessions_total",
                                                  outcome="connect-request"), 1)
        [tunnel] = self.relay.relay.tunnels["cam"]
        self.assertEqual(tunnel.transport.getPeer().host, "::1")
