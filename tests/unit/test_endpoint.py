"""
L{p2pnat.peer.endpoint}: parsing ``p2pnat:`` strings (bad ones give clear
errors), the plugin, the relay's CONNECT exchange, and connects with
fakes and a L{task.Clock} (timeouts, refusals, shared attempts).
"""

import base64
import os

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import endpoint as E
from p2pnat.peer.client import Refused


def parse_error(testcase, description):
    """The message of the ValueError that C{clientFromString} raises for C{description}."""
    with testcase.assertRaises(ValueError) as caught:
        endpoints.clientFromString(MemoryReactorClock(), description)
    return str(caught.exception)


class ParseTests(SynchronousTestCase):
    def test_plugin(self):
        parsers = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
                   if p.prefix == "p2pnat"]
        self.assertEqual(len(parsers), 1)
        ep = endpoints.clientFromString(
            MemoryReactorClock(), "p2pnat:device=cam:service=ssh:relay=relay.test\\:8443"
                                  ":plain_http=yes:timeout=7")
        self.assertIsInstance(ep, E.DeviceEndpoint)
        self.assertEqual((ep.device, ep.service, ep.timeout), ("cam", "ssh", 7.0))
        self.assertEqual(ep.request, b"CONNECT cam:ssh HTTP/1.1\r\nHost: cam:ssh\r\n\r\n")

    def test_errors(self):
        cases = {
            "p2pnat:bob": "p2pnat: takes KEY=VALUE arguments only (peer=, device=), got 'bob'",
            "p2pnat:service=ssh": "p2pnat: give either peer=CLIENT_ID or device=DEVICE_ID",
            "p2pnat:peer=bob:device=cam": "give either peer=CLIENT_ID or device=DEVICE_ID",
            "p2pnat:peer=bob:service=ssh": "config=PATH (the client.toml from `p2pnat client"
                                           " add`) is required with peer=",
            "p2pnat:peer=bob:config=c.toml": "p2pnat: service=NAME is required with peer=",
            "p2pnat:peer=bob:service=-x:config=c.toml": "p2pnat: service=-x: not a valid"
                                                        " service name",
            "p2pnat:peer=bob:service=ssh:config=c.toml:relay=x": "unknown argument relay for"
                                                                 " peer=",
            "p2pnat:peer=bob:service=ssh:config=/no/such.toml": "p2pnat: /no/such.toml: no"
                                                                " such config file",
            "p2pnat:peer=:service=ssh:config=c.toml": "p2pnat: peer= is empty",
            "p2pnat:device=cam": "relay=HOST\\:PORT (the relay's terminal address) is"
                                 " required with device=",
            "p2pnat:device=cam:relay=r": "p2pnat: relay=r: expected host:port",
            "p2pnat:device=cam:relay=r\\:1:config=c": "unknown argument config for device=",
            "p2pnat:device=cam:relay=r\\:1:timeout=0": "timeout=0: between 0 and 300 seconds",
            "p2pnat:device=cam:relay=r\\:1:timeout=301": "timeout=301: between 0 and 300",
            "p2pnat:device=cam:relay=r\\:1:timeout=soon": "timeout=soon: not a number",
            "p2pnat:device=cam:relay=r\\:1:plain_http=maybe": "plain_http=maybe: yes or no",
            "p2pnat:device=cam:relay=r\\:1:credential_file=/no/cred": "credential_file=/no/cred:"
                                                                       " No such file",
            "p2pnat:device=cam:relay=r\\:1:ca=/no/ca.crt": "cannot read /no/ca.crt",
        }
        for description, expected in cases.items():
            message = parse_error(self, description)
            self.assertIn(expected, message, description)
            self.assertTrue(message.startswith("p2pnat: "), message)

    def test_peer_options(self):
        """nat=, ipv6= and portmap= are checked before the config is read."""
        for option, expected in [("nat=weird", "p2pnat: nat=weird: "),
                                 ("ipv6=on", "p2pnat: ipv6=on: auto or off"),
                                 ("portmap=later", "p2pnat: portmap=later: yes or no")]:
            message = parse_error(self, f"p2pnat:peer=bob:service=ssh:config=c.toml:{option}")
            self.assertTrue(message.startswith(expected), message)

    def test_ca_not_a_certificate(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assertIn(f"{path} is not a PEM certificate",
                      parse_error(self, f"p2pnat:device=cam:relay=r\\:1:ca={path}"))

    def test_credential(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\n")
        ep = endpoints.clientFromString(
            MemoryReactorClock(), f"p2pnat:device=cam:relay=r\\:1:credential_file={path}")
        token = base64.b64encode(b":s3cret")
        self.assertEqual(ep.request, b"CONNECT cam HTTP/1.1\r\nHost: cam\r\n"
                                     b"Proxy-Authorization: Basic " + token + b"\r\n\r\n")


class ConnectAnswerTests(SynchronousTestCase):
    def test_incomplete(self):
        self.assertIsNone(E.connect_answer(b"HTTP/1.1 200 OK\r\n"))

    def test_ok_with_stream_bytes(self):
        self.assertEqual(E.connect_answer(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\nSSH-2"),
                         ("HTTP/1.1 200 Connection established", True, b"SSH-2"))

    def test_refused(self):
        self.assertEqual(E.connect_answer(b"HTTP/1.1 404 Not Found\r\n\r\n"),
                         ("HTTP/1.1 404 Not Found", False, b""))
        self.assertFalse(E.connect_answer(b"garbage\r\n\r\n")[1])

    def test_too_long(self):
        E.connect_answer(b"x" * E.MAX_ANSWER)
        self.assertRaises(E.AnswerTooLong, E.connect_answer, b"x" * (E.MAX_ANSWER + 1))


class Collect(protocol.Protocol):
    def __init__(self):
        self.got = b""
        self.lost = None

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason):
        self.lost = reason


class FakeRelay:
    """A client endpoint whose connections are L{StringTransport}s, made when the test says."""

    def __init__(self):
        self.attempts = []
        self.cancelled = []

    def connect(self, factory):
        d = defer.Deferred(self.cancelled.append)
        self.attempts.append((factory, d))
        return d

    def succeed(self):
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class DeviceEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.relay = FakeRelay()
        self.ep = E.DeviceEndpoint(self.clock, self.relay, "cam", "ssh", None, timeout=5)
        self.app = Collect()
        self.d = self.ep.connect(protocol.Factory.forProtocol(lambda: self.app))

    def test_connected(self):
        handshake, transport = self.relay.succeed()
        self.assertEqual(transport.value(), self.ep.request)
        self.assertNoResult(self.d)
        handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0")
        self.assertIs(self.successResultOf(self.d), self.app)
        self.assertIs(self.app.transport, transport)
        handshake.dataReceived(b" more")
        self.assertEqual(self.app.got, b"SSH-2.0 more")
        self.clock.advance(10)  # no timeout once connected
        self.assertIsNone(self.app.lost)

    def test_refused(self):
        handshake, transport = self.relay.succeed()
        handshake.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "device cam:ssh: the relay refused: HTTP/1.1 403 Forbidden")
        self.assertTrue(transport.disconnecting)

    def test_answer_too_long(self):
        handshake, _ = self.relay.succeed()
        handshake.dataReceived(b"x" * (E.MAX_ANSWER + 1))
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertIn("longer than", str(f.value))

    def test_relay_unreachable(self):
        self.relay.attempts[-1][1].errback(Failure(ConnectionRefusedError("refused")))
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "device cam:ssh: cannot reach the relay: refused")

    def test_closed_before_answer(self):
        handshake, _ = self.relay.succeed()
        handshake.connectionLost(Failure(ConnectionResetError("reset")))
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertIn("the relay closed the connection before answering", str(f.value))

    def test_timeout_while_connecting(self):
        self.clock.advance(5)
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "device cam:ssh: no answer within 5s")
        self.assertEqual(self.relay.cancelled, [self.relay.attempts[-1][1]])

    def test_timeout_waiting_for_answer(self):
        handshake, transport = self.relay.succeed()
        self.clock.advance(5)
        self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertTrue(transport.disconnecting)
        handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: ignored
        self.assertIsNone(self.app.transport)


class FakeShared:
    """Stands in for the shared lobby client: its streams come when the test says."""

    def __init__(self):
        self.waiting = []

    def streams(self, peer):
        d = defer.Deferred()
        self.waiting.append((peer, d))
        return d


class FakeStreams:
    peer = "client:bob"
    address = ("127.0.0.1", 9)

    def __init__(self, up=True):
        self.up = up
        self.opened = []

    def open_stream(self, service, proto):
        if not self.up:
            raise ConnectionError("no QUIC connection to client:bob")
        self.opened.append((service, proto))
        proto.makeConnection(StringTransport())


class PeerEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        settings = E.ClientSettings(os.path.abspath("unit-client.toml"), None, None, None,
                                    None, {})
        self.ep = E.PeerEndpoint(self.clock, settings, "bob", "ssh", timeout=3)
        self.addCleanup(E._CLIENTS.pop, (id(self.clock), settings.path), None)
        self.ep.shared = self.shared = FakeShared()
        self.app = Collect()
        self.d = self.ep.connect(protocol.Factory.forProtocol(lambda: self.app))

    def test_stream_opened(self):
        streams = FakeStreams()
        self.shared.waiting[0][1].callback(streams)
        self.assertIs(self.successResultOf(self.d), self.app)
        self.assertEqual(streams.opened, [("ssh", self.app)])

    def test_connection_gone(self):
        self.shared.waiting[0][1].callback(FakeStreams(up=False))
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "bob's ssh: no QUIC connection to client:bob")

    def test_refused(self):
        self.shared.waiting[0][1].errback(Refused("peer offline"))
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "bob's ssh: peer offline")

    def test_timeout(self):
        self.clock.advance(2.9)
        self.assertNoResult(self.d)
        self.clock.advance(0.1)
        f = self.failureResultOf(self.d, E.EndpointConnectError)
        self.assertEqual(str(f.value), "bob's ssh: no stream within 3s")


class OutcomeTests(SynchronousTestCase):
    def test_each_waiter_on_its_own(self):
        attempt = defer.Deferred()
        outcome = E._Outcome(attempt)
        first, second = outcome.wait(), outcome.wait()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertNoResult(attempt)
        attempt.callback("up")
        self.assertEqual(self.successResultOf(second), "up")
        self.assertEqual(self.successResultOf(outcome.wait()), "up")
        self.assertFalse(outcome.failed)

    def test_failure_reaches_every_waiter(self):
        attempt = defer.Deferred()
        outcome = E._Outcome(attempt)
        waiter = outcome.wait()
        attempt.errback(Refused("no such client"))
        self.failureResultOf(waiter, Refused)
        self.failureResultOf(outcome.wait(), Refused)
        self.assertTrue(outcome.failed)
