"""
Certificates and connected socket pairs for the QUIC tests.

- L{Deployment}: a CA and peer credentials issued by it (clients,
  devices), at a chosen time so that tests on a L{task.Clock} agree with
  the certificates' validity;
- L{QuicPair}: two L{QuicSocket}s (real loopback sockets, or a
  L{tests.support.udp.SimNet}), one listening for the other, with
  clean-up that closes every connection and port;
- protocols that send and check bulk data: L{Source}, L{Sink}.
"""

import hashlib
import random

from twisted.internet import defer, interfaces, protocol
from zope.interface import implementer

from p2pnat.deployment import pki
from p2pnat.quic import Credentials, QuicSocket
from p2pnat.quic.identity import issue_client_cert

#: POSIX time the L{Deployment}s of clock-driven tests issue certificates at.
T0 = 1_800_000_000


class Deployment:
    """A CA and the credentials it issues."""

    def __init__(self, name="test CA", now=None):
        self.ca_cert, self.ca_key = pki.create_ca(name, now=now)
        self.now = now

    def client(self, client_id):
        cert, key = issue_client_cert(self.ca_cert, self.ca_key, client_id, now=self.now)
        return Credentials(cert, key, (self.ca_cert,))

    def device(self, device_id):
        cert, key = pki.issue_device_cert(self.ca_cert, self.ca_key, device_id, now=self.now)
        return Credentials(cert, key, (self.ca_cert,))


class QuicPair:
    """
    Sockets ``a`` (alice, connects) and ``b`` (bob, listens for alice).

    @param net: a L{SimNet} (then C{reactor} is its clock), or None for real
        loopback sockets on C{reactor}.
    """

    def __init__(self, testcase, reactor, *, net=None, deployment=None, a_creds=None,
                 b_creds=None, services=None, a_options=None, b_options=None,
                 b_accepts=("client:alice",)):
        self.testcase = testcase
        self.reactor = reactor
        self.net = net
        self.deployment = deployment or Deployment()
        self.a = QuicSocket(reactor, a_creds or self.deployment.client("alice"),
                            **(a_options or {}))
        self.b = QuicSocket(reactor, b_creds or self.deployment.client("bob"),
                            **(b_options or {}))
        self.ports = []
        self.sockets = [self.a, self.b]
        self.a_port = self.listen(self.a)
        self.b_port = self.listen(self.b)
        self.b_endpoints = []
        self.b.listen(b_accepts, self.b_endpoints.append, services=services or {})
        testcase.addCleanup(self.cleanup)

    def listen(self, sock, ip="127.0.0.1"):
        """Bind C{sock} to a new port (closed at clean-up)."""
        if self.net is not None:
            port = self.net.listen(ip, sock)
        else:
            port = self.reactor.listenUDP(0, sock, interface=ip)
        self.ports.append(port)
        if sock not in self.sockets:
            self.sockets.append(sock)
        return port

    @property
    def b_addr(self):
        host = self.b_port.getHost()
        return (host.host, host.port)

    def connect(self, peer="client:bob", **options):
        return self.a.connect(self.b_addr, peer, **options)

    def cleanup(self):
        closing = []
        for sock in self.sockets:
            for endpoint in sock.endpoints:
                endpoint.close("test over")
                closing.append(endpoint.closed)
        d = defer.DeferredList(closing)

        def stop(_):
            return defer.DeferredList([defer.maybeDeferred(p.stopListening)
                                       for p in self.ports])
        d.addCallback(stop)
        return d


def payload(size, seed=1):
    """C{size} pseudo-random bytes (deterministic, cheap)."""
    return random.Random(seed).randbytes(size)


class Source(protocol.Protocol):
    """
    Writes C{data} as a streaming producer would (pausing when told), then
    ends its side; C{done} fires with the reason of C{connectionLost}.
    It records the most bytes that were written but not yet sent.
    """

    CHUNK = 64 * 1024

    def __init__(self, data, close="write"):
        self.data = data
        self.offset = 0
        self.paused = False
        self.close = close
        self.done = defer.Deferred()
        self.received = hashlib.sha256()
        self.received_count = 0
        self.pauses = 0

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.transport.endpoint.clock.callLater(0, self.resumeProducing)

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.offset < len(self.data):
            chunk = self.data[self.offset:self.offset + self.CHUNK]
            self.offset += len(chunk)
            self.transport.write(chunk)
        if self.offset >= len(self.data) and self.transport is not None \
                and self.transport.connected:
            self.transport.unregisterProducer()
            if self.close == "write":
                self.transport.loseWriteConnection()
            elif self.close == "all":
                self.transport.loseConnection()

    def stopProducing(self):
        pass

    def dataReceived(self, data):
        self.received.update(data)
        self.received_count += len(data)

    def connectionLost(self, reason):
        self.done.callback(reason.value)


@implementer(interfaces.IHalfCloseableProtocol)
class Sink(protocol.Protocol):
    """
    Hashes what it receives; C{echo} sends it back; C{done} fires with
    C{(byte count, sha256 hex, exception)} at C{connectionLost}.
    """

    echo = False

    def __init__(self):
        self.hash = hashlib.sha256()
        self.count = 0
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.done.callback((self.count, self.hash.hexdigest(), reason.value))


class SinkFactory(protocol.Factory):
    """Builds L{Sink}s and keeps them in C{sinks}; C{built} fires with the first."""

    def __init__(self, echo=False):
        self.sinks = []
        self.echo = echo
        self.built = defer.Deferred()

    def buildProtocol(self, addr):
        sink = Sink()
        sink.echo = self.echo
        sink.addr = addr
        self.sinks.append(sink)
        if not self.built.called:
            self.built.callback(sink)
        return sink
