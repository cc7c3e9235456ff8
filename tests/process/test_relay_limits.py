"""
The relay's connection limits with real sockets on loopback (issue #9,
findings 4 and 5): a relay and a device agent in this process, joined by
real UDP, TLS and TCP.  One source opens many kept-alive and idle
connections; another terminal, and the device's tunnel for it, still get
through.
"""

import os

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial.unittest import TestCase

from tests.support.relay import start_agent, start_relay


class KeepAlive(protocol.Protocol):
    """A device's web server that answers every request and keeps the connection."""

    def connectionMade(self):
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class Client(protocol.Protocol):
    """
    Sends C{data}; C{answered} fires with the status of the first answer
    (None if the connection closed without one), C{lost} when it closes.
    """

    def __init__(self, data=b""):
        self.data = data
        self.got = b""
        self.answered = defer.Deferred()
        self.lost = defer.Deferred()
        self.open = False

    def connectionMade(self):
        self.open = True
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data):
        self.got += data
        if b"\r\n\r\n" in self.got and not self.answered.called:
            self.answered.callback(int(self.got.split(b" ", 2)[1]))

    def connectionLost(self, reason):
        self.open = False
        if not self.answered.called:
            self.answered.callback(None)
        self.lost.callback(None)


def wait(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class LimitsLoopbackTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.web = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(KeepAlive))
        self.addCleanup(self.web.stopListening)
        self.relay = start_relay(self, self.dir, **{
            "terminal.http": "tcp:0:interface=0.0.0.0",
            "limits.max_connections": "200", "limits.terminals_per_source": "40",
            "limits.streams_per_device_source": "16"})
        self.agent = yield defer.Deferred.fromCoroutine(start_agent(
            self, self.relay, "cam", os.path.join(self.dir, "cam"), self.web.getHost().port))
        self.clients = []

    def tearDown(self):
        for c in self.clients:
            if c.open:
                c.transport.abortConnection()
        return defer.DeferredList([c.lost for c in self.clients])

    @defer.inlineCallbacks
    def connect(self, source, data=b""):
        port = self.relay.terminal_http.address[1]
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
        c = Client(data)
        self.clients.append(c)
        yield endpoints.connectProtocol(ep, c)
        return c

    @defer.inlineCallbacks
    def test_one_source_cannot_take_the_device_or_the_relay(self):
        get = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"
        # 64 kept-alive requests from one address: it gets 16 of the
        # device's tunnels (the agent opens 64 at most), the rest 503 or,
        # past limits.terminals_per_source, a closed connection.
        first = yield defer.gatherResults([self.connect("127.0.0.1", get) for _ in range(64)])
        statuses = yield defer.gatherResults([c.answered for c in first])
        self.assertEqual(statuses.count(200), 16, statuses)
        self.assertEqual(set(statuses) - {200, 503, None}, set(), statuses)
        self.assertEqual(len(self.relay.relay.tunnels["cam"]), 16)
        yield defer.gatherResults([c.lost for c, s in zip(first, statuses) if s != 200])
        # Then idle connections from it: no more than its share stays open.
        idle = yield defer.gatherResults([self.connect("127.0.0.1") for _ in range(60)])
        for _ in range(100):
            if sum(c.open for c in idle) <= 40 - 16:
                break
            yield wait(0.05)
        self.assertEqual(sum(c.open for c in idle), 40 - 16)
        self.assertEqual(self.relay.limits.from_source("terminal", "127.0.0.1"), 40)
        # Another address still reaches the device, through a new tunnel.
        other = yield self.connect("127.0.0.2", get)
        status = yield other.answered
        self.assertEqual(status, 200)
        self.assertEqual(other.got[-2:], b"ok")
        self.assertEqual(len(self.relay.relay.tunnels["cam"]), 17)
        self.assertEqual(self.relay.metrics.value("p2pnat_connections", kind="tunnel"), 17)
        self.assertGreaterEqual(self.relay.metrics.value(
            "p2pnat_sessions_total", outcome="refused-terminal-per-source"), 36)
        # The kept-alive streams from the first address still work.
        kept = [c for c, s in zip(first, statuses) if s == 200]
        kept[0].got = b""
        kept[0].answered = defer.Deferred()
        kept[0].transport.write(get)
        status = yield kept[0].answered
        self.assertEqual(status, 200)
