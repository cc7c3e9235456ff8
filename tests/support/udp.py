"""
In-memory UDP for tests: protocols joined by a fake network with an
optional NAT rewriting source addresses, all on a L{Clock}.
"""

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
