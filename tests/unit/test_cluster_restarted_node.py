"""
A relay node that restarts in a cluster: its own store still has each
device's address and a recent notify A, but the devices may have moved to
another node while it was down (the NAT lab's
L{tests.lab.test_cluster_lab} found terminals on the restarted node waiting
for a connect request it could never send).  Until a notify reaches the
restarted process, the live entry in the shared state decides who owns the
device.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster.state import LiveEntry
from tests.unit.test_cluster import HEAD, FakeCluster
from tests.unit.test_relay_terminal import World, status


class RestartedNodeTests(SynchronousTestCase):
    """Node n2, just restarted: ``cam`` is in its store, no notify came yet."""

    def setUp(self):
        self.cluster = FakeCluster()
        self.w = World(self, cluster=self.cluster)
        d = self.w.add("cam", online=False)
        # What the store gave the restarted node: an address and a notify A
        # 10 s old (within the access-check period), but no socket.
        d.addr = ("203.0.113.5", 40000)
        d.last_access = self.w.clock.seconds() - 10

    def lookup(self, node):
        t = self.w.terminal(HEAD)
        self.assertEqual([d for d, _ in self.cluster.lookups], ["cam"],
                         "the restarted node must ask who owns the device")
        self.cluster.lookups[0][1].callback(
            LiveEntry("cam", node, "198.51.100.7", 5000, self.w.clock.seconds() - 1))
        return t

    def test_moved_to_another_node(self):
        """The device reports to n1 now: n1 is asked for the connect request."""
        t = self.lookup("n1")
        self.assertEqual([(n, d) for n, d, _, _ in self.cluster.forwarded], [("n1", "cam")])
        self.assertEqual(self.w.socket.sent, [], "nothing sent to the old mapping")
        self.assertEqual(t.state, "waiting")

    def test_still_reports_here(self):
        """
        The entry names this node: the session waits for the device's next
        notify, whose socket the connect request then goes out from, as on a
        single relay after a restart.
        """
        w = self.w
        t = self.lookup("n2")
        self.assertEqual(self.cluster.forwarded, [])
        self.assertEqual(t.state, "waiting")
        self.assertEqual(w.socket.sent, [])
        w.table.notify_b("cam", ("203.0.113.5", 40000), ("192.168.1.2", 1), w.socket)
        w.clock.advance(1.0)  # the session's next retransmission
        self.assertEqual([kind for _, _, kind in w.socket.sent][:1], ["ConnectRequest"])

    def test_entry_gone(self):
        """No live entry (it expired): the clear 503, at once."""
        t = self.w.terminal(HEAD)
        self.cluster.lookups[0][1].callback(None)
        self.assertEqual(status(t.transport), 503)
