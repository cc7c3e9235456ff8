"""
In-memory UDP for tests, on a L{Clock}.

- L{FakeNetwork}: protocols joined by a network that delivers at once,
  with an optional NAT table rewriting source addresses.
- L{SimNet}: a simulated internet with latency, loss and hosts behind
  L{SimNat}s of every RFC 4787 kind; it offers C{listenUDP}, so code that
  opens its own sockets (discovery, the P2P client's punches) runs on it.
"""

import itertools
import random
import socket
from collections import namedtuple

from twisted.internet import defer
from twisted.internet.address import IPv4Address


class FakeUDPTransport:
    """
    What a L{twisted.internet.interfaces.IUDPTransport} offers that our
    protocols use; records writes and hands them to C{network}.
    """

    def __init__(self, network, host, port):
        self.network = network
        self.host = host
        self.port = port
        self.written = []

    def write(self, data, addr):
        self.written.append((data, addr))
        if self.network is not None:
            self.network.send(data, (self.host, self.port), addr)

    def getHost(self):
        return IPv4Address("UDP", self.host, self.port)


class FakeNetwork:
    """
    Delivers datagrams between attached protocols at once.  C{nat} maps a
    private (host, port) to the public one its datagrams appear from; the
    reverse mapping is applied to replies.  C{drop} is a predicate for
    datagrams to lose.
    """

    def __init__(self):
        self.endpoints = {}
        self.nat = {}
        self.drop = lambda data, src, dst: False
        self.log = []

    def attach(self, proto, host, port):
        proto.makeConnection(FakeUDPTransport(self, host, port))
        self.endpoints[(host, port)] = proto
        return proto

    def send(self, data, src, dst):
        if self.drop(data, src, dst):
            return
        public_src = self.nat.get(src, src)
        target = dst
        for private, public in self.nat.items():
            if public == dst:
                target = private
        self.log.append((data, public_src, target))
        proto = self.endpoints.get(target)
        if proto is not None:
            proto.datagramReceived(data, public_src)


# -- a simulated internet: sockets on a clock, hosts behind NATs ------------------

#: The private address that stands for "other traffic" taking NAT ports.
OTHER_TRAFFIC = ("10.255.255.99", 0)


#: A datagram sent on a L{SimNet}: C{src} is its public source (after the NAT).
Sent = namedtuple("Sent", "src dst data ttl")


class SimNat:
    """
    A NAT: C{mapping} and C{filtering} as in RFC 4787 (values of
    L{p2pnat.protocol.nat}: ``endpoint-independent``, ``address-dependent``,
    ``address-and-port-dependent``), C{allocation} ``preserving`` (the local
    port when free), ``sequential`` (C{base}, C{base + step}, ...) or
    ``random``.  L{take} lets other traffic take ports; L{forget} drops
    every mapping (a NAT reboot).

    With C{timeout} (seconds, on C{clock}) a mapping idle that long is
    dropped, as a conntrack entry times out: traffic either way through
    it (outbound, or inbound that passed the filter) refreshes it, and
    traffic after the timeout gets a new mapping (a new port, unless the
    allocation preserves it).
    """

    def __init__(self, public_ip, mapping="endpoint-independent",
                 filtering="address-and-port-dependent", allocation="preserving", step=1,
                 base=20000, seed=1, timeout=None, clock=None):
        if timeout is not None and clock is None:
            raise ValueError("a mapping timeout needs a clock")
        self.timeout, self.clock = timeout, clock
        self.used = {}  # public port -> when traffic last went through it
        self.expired = 0  # mappings dropped by the timeout
        self.ip = public_ip
        self.mapping, self.filtering, self.allocation = mapping, filtering, allocation
        self.step = step
        self.next = base
        self.random = random.Random(seed)
        self.by_key = {}  # mapping key -> public port
        self.owner = {}  # public port -> private address
        self.sent_to = {}  # public port -> destinations sent to

    def _key(self, src, dst):
        return {"endpoint-independent": (src,), "address-dependent": (src, dst[0]),
                "address-and-port-dependent": (src, dst)}[self.mapping]

    def _allocate(self, src):
        if self.allocation == "preserving" and src[1] not in self.owner:
            return src[1]
        if self.allocation == "random":
            while True:
                port = self.random.randint(1024, 65535)
                if port not in self.owner:
                    return port
        port, self.next = self.next, self.next + self.step
        return port

    def take(self, n=1):
        """Other traffic takes n new ports."""
        for _ in range(n):
            self.owner[self._allocate(OTHER_TRAFFIC)] = OTHER_TRAFFIC

    def forget(self):
        """Drop every mapping: what was open is closed, new traffic gets new ports."""
        self.by_key.clear()
        self.owner.clear()
        self.sent_to.clear()

    def _expire(self):
        """Drop the mappings idle for longer than the timeout."""
        if self.timeout is None:
            return
        now = self.clock.seconds()
        for port in [p for p, t in self.used.items() if now - t > self.timeout]:
            del self.used[port]
            self.owner.pop(port, None)
            self.sent_to.pop(port, None)
            for key in [k for k, p in self.by_key.items() if p == port]:
                del self.by_key[key]
            self.expired += 1

    def _refresh(self, port):
        if self.timeout is not None:
            self.used[port] = self.clock.seconds()

    def outbound(self, src, dst):
        """The public source of a datagram from private C{src} to C{dst}."""
        self._expire()
        key = self._key(src, dst)
        port = self.by_key.get(key)
        if port is None:
            port = self._allocate(src)
            self.by_key[key] = port
            self.owner[port] = src
        self.sent_to.setdefault(port, set()).add(dst)
        self._refresh(port)
        return self.ip, port

    def inbound(self, port, src):
        """The private destination of a datagram from C{src} to public C{port}, or None."""
        self._expire()
        private = self.owner.get(port)
        if private is None or private == OTHER_TRAFFIC:
            return None
        seen = self.sent_to[port]
        allowed = {"endpoint-independent": True,
                   "address-dependent": any(d[0] == src[0] for d in seen),
                   "address-and-port-dependent": src in seen}
        if not allowed[self.filtering]:
            return None
        self._refresh(port)
        return private


class SimPort:
    """
    A bound UDP socket of a L{SimNet}: the protocol's transport and the
    listening port.  It closes as Twisted's UDP port does: reading stops at
    once, the protocol loses its transport on the next turn of the clock.
    A second C{stopListening} before then (which makes Twisted's reactor
    log an error) is recorded in the network's C{errors}.
    """

    def __init__(self, net, proto, addr):
        self.net, self.proto, self.addr = net, proto, addr
        self.reading = True
        self.closed = False
        self.ttl = 64

    def write(self, data, addr):
        if self.closed:
            raise AssertionError(f"write on the closed port {self.addr}")
        self.net.send(self.addr, tuple(addr), data, self.ttl)

    def getHost(self):
        return IPv4Address("UDP", *self.addr)

    def getHandle(self):
        """The "socket": only C{setsockopt(IPPROTO_IP, IP_TTL, n)} is understood."""
        return self

    def setsockopt(self, level, option, value):
        if (level, option) != (socket.IPPROTO_IP, socket.IP_TTL):
            raise OSError(92, "option not simulated")
        self.ttl = value

    def stopListening(self):
        if self.closed:
            return None
        if not self.reading:
            self.net.errors.append(f"stopListening twice on {self.addr}")
            return None
        self.reading = False
        self.net.ports.pop(self.addr, None)
        done = defer.Deferred()

        def lost():
            self.closed = True
            self.proto.doStop()
            done.callback(None)

        self.net.clock.callLater(0, lost)
        return done


class SimNet:
    """
    Datagrams delivered after C{latency} seconds on a clock; hosts behind a
    L{SimNat} by private IP (C{nats}); C{lose(src, dst, data)} drops on the
    wire (after the sender's NAT).  C{sent} records every datagram sent
    (a L{Sent}: public source, destination, data, TTL).

    With L{listenUDP} and the clock's methods it is a reactor
    (C{IReactorUDP} and C{IReactorTime}) for code that opens its own sockets.
    """

    def __init__(self, clock, latency=0.002):
        self.clock = clock
        self.latency = latency
        self.ports = {}
        self.nats = {}  # private IP -> SimNat
        self.lose = lambda src, dst, data: False
        self.delivered = 0
        self.sent = []
        self.errors = []
        self._ephemeral = itertools.count(41000, 13)

    def listen(self, ip, proto, port=0):
        addr = (ip, port or next(self._ephemeral))
        if addr in self.ports:
            raise OSError(98, f"address in use: {addr}")
        p = SimPort(self, proto, addr)
        self.ports[addr] = p
        proto.makeConnection(p)
        return p

    # IReactorTime from the clock: with listenUDP, the network is a reactor.

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, delay, f, *args, **kwargs):
        return self.clock.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        """L{twisted.internet.interfaces.IReactorUDP.listenUDP} on this network."""
        if not interface or interface == "0.0.0.0":
            raise ValueError("SimNet sockets need an interface: the host's address")
        return self.listen(interface, protocol, port)

    def send(self, src, dst, data, ttl=64):
        nat = self.nats.get(src[0])
        if nat is not None:
            src = nat.outbound(src, dst)
        self.sent.append(Sent(src, dst, data, ttl))
        if self.lose(src, dst, data):
            return
        self.clock.callLater(self.latency, self._deliver, src, dst, data)

    def _deliver(self, src, dst, data):
        for nat in self.nats.values():
            if dst[0] == nat.ip:
                dst = nat.inbound(dst[1], src)
                if dst is None:
                    return
                break
        port = self.ports.get(dst)
        if port is not None and port.reading:
            self.delivered += 1
            port.proto.datagramReceived(data, src)
