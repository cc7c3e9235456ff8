"""
TCP forwarded over QUIC streams between two L{LobbyClient}s, on real
loopback sockets through a lobby in this process
(L{p2pnat.peer.streams.TcpForwardFactory} on alice's side,
L{p2pnat.peer.streams.TcpServiceFactory} on bob's): the bytes are checked
with sha256 both ways, a half-close passes through, and a service that
bob does not serve is refused.
"""

import hashlib

from twisted.internet import defer, interfaces, protocol, reactor, task
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2pnat.daemon.metrics import Metrics
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import ControlProtocol
from p2pnat.peer import streams as S
from p2pnat.peer.client import LobbyClient
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.quic import Deployment, payload

#: Enough to fill both TCP buffers and several QUIC windows.
BIG = 2_000_000
#: How long a slow reader keeps its transport paused.
SLOW = 0.5

KEYS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32}
PUBLIC = M.NatInfo("endpoint-independent", "endpoint-independent", "preserving")


@implementer(interfaces.IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Sends back what it receives, and ends when its input ends; hashes the input."""

    def connectionMade(self):
        self.hash = hashlib.sha256()
        self.count = 0
        self.factory.made.append(self)

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class Client(protocol.Protocol):
    """Writes C{data}, half-closes, and hashes what comes back until the end."""

    def __init__(self, data):
        self.data = data
        self.hash = hashlib.sha256()
        self.count = 0
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)

    def connectionLost(self, reason):
        self.done.callback(reason.value)


class Sender(protocol.Protocol):
    """A service that writes C{factory.data} and closes at once (a download, HTTP/1.0)."""

    def connectionMade(self):
        self.transport.write(self.factory.data)
        self.transport.loseConnection()


@implementer(interfaces.IHalfCloseableProtocol)
class Sink(protocol.Protocol):
    """
    A slow service: reads nothing for L{SLOW} seconds (back-pressure all
    the way to the client), then hashes its input; ends when the input ends.
    """

    def connectionMade(self):
        self.hash = hashlib.sha256()
        self.count = 0
        self.ended = defer.Deferred()
        self.factory.made.append(self)
        self.transport.pauseProducing()
        reactor.callLater(SLOW, self.transport.resumeProducing)

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self):
        self.ended.callback(None)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class SlowReader(protocol.Protocol):
    """
    A client that writes C{data} (none by default), reads nothing for
    L{SLOW} seconds, then hashes what comes until the end.
    """

    def __init__(self, data=b""):
        self.data = data
        self.hash = hashlib.sha256()
        self.count = 0
        self.done = defer.Deferred()

    def connectionMade(self):
        if self.data:
            self.transport.write(self.data)
        self.transport.pauseProducing()
        reactor.callLater(SLOW, self.transport.resumeProducing)

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)

    def connectionLost(self, reason):
        self.done.callback(reason.value)


class Closer(Client):
    """Writes C{data} and closes the whole connection at once (not a half-close)."""

    def connectionMade(self):
        self.transport.write(self.data)
        self.transport.loseConnection()


class ForwardTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment()
        metrics = Metrics("lobby")
        self.lobby = Lobby(KEYS.get, reactor, metrics)
        self.lobby_port = reactor.listenUDP(0, ControlProtocol(
            self.lobby, reactor, metrics, wire.ReplayGuard(reactor), name="lobby"),
            interface="127.0.0.1")
        self.addCleanup(self.lobby_port.stopListening)
        lobby = ("127.0.0.1", self.lobby_port.getHost().port)
        echo = protocol.Factory.forProtocol(Echo)
        echo.made = []
        self.echo = echo
        port = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.big = payload(BIG, seed=5)
        sender = protocol.Factory.forProtocol(Sender)
        sender.data = self.big
        sink = protocol.Factory.forProtocol(Sink)
        sink.made = []
        self.sink = sink
        more = {}
        for name, factory in (("send", sender), ("sink", sink)):
            listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            more[name] = listening.getHost().port
        self.events = {"alice": [], "bob": []}
        self.bob_streams = []

        def on_path(path):
            self.bob_streams.append(S.accept_streams(path, self.deployment.client("bob"), {
                "echo": S.TcpServiceFactory(reactor, "echo", "127.0.0.1", port.getHost().port,
                                            self.recorder("bob")),
                "closed": S.TcpServiceFactory(reactor, "closed", "127.0.0.1", 1,
                                              self.recorder("bob")),
                **{name: S.TcpServiceFactory(reactor, name, "127.0.0.1", number,
                                             self.recorder("bob"))
                   for name, number in more.items()}}))

        self.alice = LobbyClient("alice", KEYS["alice"], lobby, reactor, interface="127.0.0.1",
                                 nat=PUBLIC)
        self.bob = LobbyClient("bob", KEYS["bob"], lobby, reactor, interface="127.0.0.1",
                               nat=PUBLIC, on_path=on_path)
        for c in (self.alice, self.bob):
            self.addCleanup(c.stop)
            yield c.start()
        path = yield self.alice.connect("bob")
        self.streams = yield S.connect_streams(path, self.deployment.client("alice"))
        self.addCleanup(self.close)

    def close(self):
        """Close every QUIC connection, and wait until each is over."""
        closing = []
        for s in [self.streams, *self.bob_streams]:
            closing += [endpoint.closed for endpoint in s.socket.endpoints]
            s.close("test over")
        return defer.DeferredList(closing)

    def recorder(self, name):
        return lambda event, **fields: self.events[name].append((event, fields))

    def forward(self, service):
        port = reactor.listenTCP(0, S.TcpForwardFactory(self.streams, service,
                                                        self.recorder("alice")),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def through(self, service, data, kind=Client):
        """A TCP client (a C{kind}) sending C{data} through a forward to C{service}, once it ended."""
        client = kind(data)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.forward(service))
        yield client.done
        return client

    @defer.inlineCallbacks
    def settle(self, name, event):
        for _ in range(100):
            if any(e == event for e, _ in self.events[name]):
                return
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_forwarded_both_ways(self):
        """1 MB through the forward to bob's echo and back, sha256-checked at each end."""
        data = payload(1_000_000, seed=11)
        client = yield self.through("echo", data)
        expected = hashlib.sha256(data).hexdigest()
        [echo] = self.echo.made
        self.assertEqual((echo.count, echo.hash.hexdigest()), (len(data), expected))
        self.assertEqual((client.count, client.hash.hexdigest()), (len(data), expected))
        yield self.settle("bob", "stream-closed")
        yield self.settle("alice", "stream-closed")
        for name, direction in (("alice", "out"), ("bob", "in")):
            events = self.events[name]
            self.assertEqual([e for e, _ in events], ["stream-opened", "stream-closed"], name)
            closed = events[1][1]
            self.assertEqual((closed["service"], closed["direction"], closed["sent"],
                              closed["received"], "error" in closed),
                             ("echo", direction, len(data), len(data), False))
        self.assertEqual(self.events["alice"][0][1]["peer"], "client:bob")
        self.assertEqual(self.events["bob"][0][1]["peer"], "client:alice")

    @defer.inlineCallbacks
    def test_unknown_service_refused(self):
        """A stream for a service bob does not serve is refused: the TCP connection ends."""
        client = yield self.through("nothing-here", b"hello")
        self.assertEqual(client.count, 0)
        yield self.settle("alice", "stream-closed")
        [(first, _), (_, closed)] = self.events["alice"]
        self.assertEqual(first, "stream-opened")
        self.assertIn("refused service 'nothing-here'", closed["error"])
        self.assertEqual(self.events["bob"], [])

    @defer.inlineCallbacks
    def test_service_unreachable(self):
        """bob cannot reach the service's TCP address: the stream is reset, alice's TCP ends."""
        client = yield self.through("closed", b"hello")
        self.assertEqual(client.count, 0)
        yield self.settle("bob", "stream-failed")
        yield self.settle("alice", "stream-closed")
        failed = [f for e, f in self.events["bob"] if e == "stream-failed"]
        self.assertIn("cannot connect to 127.0.0.1:1", failed[0]["error"])
        self.assertIn("error", self.events["alice"][-1][1])

    def assertAll(self, count, digest):
        """C{count} bytes hashed to C{digest} are the whole of C{self.big}."""
        self.assertEqual((count, digest), (BIG, hashlib.sha256(self.big).hexdigest()))

    @defer.inlineCallbacks
    def assertClosedCleanly(self):
        """Both sides report the stream closed, without an error."""
        yield self.settle("bob", "stream-closed")
        yield self.settle("alice", "stream-closed")
        for name in ("alice", "bob"):
            closed = [f for e, f in self.events[name] if e == "stream-closed"]
            self.assertEqual(len(closed), 1, name)
            self.assertNotIn("error", closed[0], name)

    @defer.inlineCallbacks
    def test_service_closes_first(self):
        """
        A service that writes 2 MB and closes at once, to a client that
        reads slowly: the client gets all of it, then the end of stream
        (the service's close must not abort the stream under the bytes
        still queued).
        """
        client = yield self.through("send", b"", kind=SlowReader)
        self.assertAll(client.count, client.hash.hexdigest())
        yield self.assertClosedCleanly()

    @defer.inlineCallbacks
    def test_client_half_closes_first(self):
        """A client that writes 2 MB and half-closes, to a slow service: all of it arrives."""
        yield self.through("sink", self.big)
        [sink] = self.sink.made
        yield sink.ended
        self.assertAll(sink.count, sink.hash.hexdigest())
        yield self.assertClosedCleanly()

    @defer.inlineCallbacks
    def test_client_closes_first(self):
        """
        A client that writes 2 MB and closes the whole connection at once,
        to a slow service: all of it arrives, then the end of stream.
        """
        yield self.through("sink", self.big, kind=Closer)
        for _ in range(200):
            if self.sink.made:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        [sink] = self.sink.made
        yield sink.ended
        self.assertAll(sink.count, sink.hash.hexdigest())
        yield self.assertClosedCleanly()
