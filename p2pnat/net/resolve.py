# -*- test-case-name: tests.unit.test_agent_failover,tests.unit.test_direct -*-
"""
Host names to addresses through the reactor's name resolver, every
address family at once.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

__all__ = ["resolve_all"]


def resolve_all(reactor, name, port=0):
    """
    Every address, IPv4 and IPv6, that host C{name} resolves to (the
    system's resolver, as Twisted's C{nameResolver} gives it).

    @return: a Deferred list of IP literals, empty when it resolves to
        nothing or not at all.
    """
    found = []
    done = defer.Deferred()

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution):
            pass

        def addressResolved(self, address):
            found.append(address.host)

        def resolutionComplete(self):
            done.callback(found)

    reactor.nameResolver.resolveHostName(Receiver(), name, port, (IPv4Address, IPv6Address), "UDP")
    return done
