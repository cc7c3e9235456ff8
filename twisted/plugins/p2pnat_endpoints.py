"""
The ``p2pnat:`` client endpoint type for C{clientFromString} (see
L{p2pnat.peer.endpoint}): ``p2pnat:peer=bob:service=ssh:config=client.toml``
or ``p2pnat:device=cam1:service=http:relay=HOST\\:PORT``.  The parser is
imported only when a ``p2pnat:`` string is parsed, to keep plugin
discovery cheap.
"""

from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _P2pnatParser:
    prefix = "p2pnat"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from p2pnat.peer.endpoint import parse

        return parse(reactor, *args, **kwargs)


p2pnat_endpoint = _P2pnatParser()
