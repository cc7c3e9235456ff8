# -*- test-case-name: tests.unit.test_cluster -*-
"""
The embedded backend: one relay node and nothing shared, as before
clustering existed.  The relay's SQLite registry and its in-memory tables
are the whole state; every device a terminal may reach is live on this
node, so nothing is ever located elsewhere.
"""

from twisted.internet.defer import succeed
from zope.interface import implementer

from p2pnat.cluster.state import IClusterState, NodeInfo


@implementer(IClusterState)
class EmbeddedState:
    """
    L{IClusterState} of a single node: always available, never shared.

    @param live: C{live()} -> the node's own L{p2pnat.cluster.state.LiveEntry}
        list, for status pages (default: none).
    """

    shared = False

    def __init__(self, node="local", addresses=(), live=None):
        self.node = node
        self.addresses = tuple(addresses)
        self._live = live or (lambda: [])

    def available(self):
        return True

    def notified(self, device_id, kind, addr, last_access, now):
        pass  # the relay's own table and store already hold it

    def locate(self, device_id):
        return succeed(None)

    def forward_connect(self, entry, device_id, session_id, nonce):
        raise AssertionError("a single node never forwards a connect request")

    def publish_registry(self, records):
        pass

    def nodes(self):
        return succeed([NodeInfo(self.node, self.addresses, "", 0, 0.0)])

    def live_entries(self):
        return succeed(list(self._live()))

    def start(self):
        pass

    def stop(self):
        return succeed(None)
