# -*- test-case-name: tests.unit.test_relay_loopback -*-
"""
TCP and TLS streams as the relay, the agent and the terminal-side tools
proxy them: tuning a connection for a data path, back-pressure between the
two sides of a stream, closing after what was written, and a tunnel's idle
timeout.
"""

import ipaddress

from twisted.internet import endpoints
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from zope.interface import implementer

from p2pnat.net import fastio


def nodelay(transport):
    """
    Turn Nagle's algorithm off on a (possibly TLS-wrapped) TCP transport: a
    proxy that writes a frame header and its payload, or a small answer,
    must not wait for the peer's delayed ACK (40 ms stalls otherwise).
    """
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


def close_after_writes(transport):
    """
    Close C{transport} once what was written is sent.  A producer still
    registered on a TLS transport would hold the close back for ever, so
    it is unregistered first.
    """
    try:
        transport.unregisterProducer()
    except (AttributeError, RuntimeError):
        pass
    transport.loseConnection()


def client_endpoint(reactor, host, port, timeout=10):
    """
    A TCP client endpoint: a plain TCP4/TCP6 one for an IP literal (no
    trip through the resolver's thread pool: ~0.4 ms per connection), a
    HostnameEndpoint for a name.
    """
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = endpoints.TCP4ClientEndpoint if version == 4 else endpoints.TCP6ClientEndpoint
    return cls(reactor, host, port, timeout=timeout)


def bigger_reads(transport, size=256 * 1024):
    """
    Read up to C{size} bytes per system call on the TCP connection under
    C{transport} (TLS-wrapped or not): fewer reads, frames and writes per
    megabyte on a proxy's data path.
    """
    t = transport
    for _ in range(3):
        if hasattr(t, "bufferSize") and hasattr(t, "socket"):
            t.bufferSize = size
            return
        t = getattr(t, "transport", None)
        if t is None:
            return


def tune(transport):
    """
    Set up a proxy's TCP (or TLS-over-TCP) connection for its data path: no
    Nagle, bigger reads, and writes sent at once (L{fastio.write_through}).
    """
    nodelay(transport)
    bigger_reads(transport)
    fastio.write_through(transport)


class OneShotFactory(Factory):
    """
    Builds the one protocol instance given, for an outgoing connection
    (like endpoints.connectProtocol's, without a log line per connection).
    """

    noisy = False

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class IdleTimeout:
    """
    Mixin of both ends of a tunnel: an idle tunnel (state ``idle``) is
    closed after C{timeout} seconds without a stream.
    """

    _idle_timer = None

    def _start_idle(self, clock, timeout):
        self._cancel_idle()
        self._idle_timer = clock.callLater(timeout, self._idle_late)

    def _cancel_idle(self):
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle_late(self):
        self._idle_timer = None
        if self.state == "idle":
            self.transport.loseConnection()


@implementer(IPushProducer)
class Gate:
    """
    Pauses and resumes a transport's reading on behalf of a peer whose
    write buffer filled: the back-pressure between the two sides of a
    proxied stream.  Survives the peer changing (streams come and go on a
    tunnel).
    """

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        pass
