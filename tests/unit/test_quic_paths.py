"""
One QUIC connection over a P2P path whose addresses change
(L{p2pnat.peer.streams.PathStreams}), on the simulated internet of
L{tests.unit.test_peer_streams}: the peer's NAT rebinds to a port our NAT
lets in (the path follows at QUIC's first authenticated packet from
there, not at the peer's next path keepalive), to a port our NAT filters
(QUIC's silence starts the path's recovery: the relay carries the
connection, then a new punch makes it direct again), and a forged packet
from a new address moves nothing.
"""

import hashlib

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import streams as S
from tests.support.quic import Source, payload
from tests.unit.test_peer_client import EI, HOSTS
from tests.unit.test_peer_streams import Peers


def sha(data):
    return hashlib.sha256(data).hexdigest()


class PathRebindTests(SynchronousTestCase):

    def setUp(self):
        self.p = Peers(self, upgrade_interval=5.0)
        self.path, self.incoming = self.p.connect()
        self.assertEqual((self.path.mode, self.incoming.mode), ("direct", "direct"))
        self.a, self.b = self.p.quic(self.path, self.incoming)
        self.assertIsInstance(self.a, S.PathStreams)
        self.nats = {name: self.p.w.net.nats[HOSTS[name][0]] for name in ("alice", "bob")}

    def start(self, size):
        data = payload(size, seed=11)
        source = Source(data)
        self.a.open_stream("echo", source)
        while source.offset < size // 4:
            self.p.w.advance(0.02, step=0.002)
        return data, source

    def finish(self, data, source, within):
        done = []
        source.done.addBoth(done.append)
        start = self.p.w.clock.seconds()
        while not done and self.p.w.clock.seconds() - start < within:
            self.p.w.advance(0.1, step=0.002)
        self.assertTrue(done, f"the transfer did not finish within {within}s")
        self.assertIsInstance(done[0], error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), sha(data))
        return self.p.w.clock.seconds() - start

    def rebind(self, name, filtering=None):
        """C{name}'s NAT forgets its mappings; new flows get ports from 40000 on."""
        nat = self.nats[name]
        nat.forget()
        nat.allocation, nat.next = "sequential", 40000
        if filtering:
            nat.filtering = filtering

    def test_peer_rebinds_to_a_port_we_let_in(self):
        """
        Bob's NAT rebinds mid-transfer and alice's NAT lets anyone in
        (endpoint-independent filtering): alice's path follows bob to his
        new port at QUIC's first authenticated packet from there, so the
        transfer finishes in well under a path keepalive (15 s), with no
        recovery and one connection.  Both directions follow: bob's path
        follows alice's packets to him too (same address, nothing to do).
        """
        self.nats["alice"].filtering = EI
        data, source = self.start(400_000)
        old = self.path.direct[1]
        self.rebind("bob")
        took = self.finish(data, source, within=20)
        self.assertLess(took, 3.0)
        self.assertEqual(self.path.direct[1], (HOSTS["bob"][1], 40000))
        self.assertNotEqual(self.path.direct[1], old)
        self.assertEqual(self.a.follows, 1)
        self.assertEqual(self.a.recoveries, 0)
        self.assertEqual(self.path.mode, "direct")
        self.assertEqual(len(self.p.accepted), 1)

    def test_we_rebind_to_a_port_the_peer_filters(self):
        """
        Alice's NAT rebinds mid-transfer and bob's NAT filters her new port
        (it only lets in whom bob sent to): nothing passes directly any
        more.  QUIC's silence (6 s) starts alice's path recovery at once,
        long before the path's own keepalives would (33 s): the relay
        carries the same connection, a new punch makes the path direct
        again, and the transfer finishes intact within 20 s, with no error
        and one connection throughout.  QUIC hears bob again within a
        second of the route's change to the relay: it probes the new route
        at once instead of waiting out the probe timeout's backoff.
        """
        clock = self.p.w.clock
        modes, alive = [], []
        self.path.on_mode = lambda mode: modes.append((mode, clock.seconds()))
        endpoint = self.a.endpoint
        on_alive = endpoint.on_alive
        endpoint.on_alive = lambda: (alive.append(clock.seconds()), on_alive())
        data, source = self.start(600_000)
        self.rebind("alice")
        self.assertLess(self.finish(data, source, within=60), 20)
        self.assertGreaterEqual(self.a.recoveries, 1)
        relayed = [t for mode, t in modes if mode == "relayed"]
        self.assertTrue(relayed, modes)
        self.assertTrue(alive)
        self.assertLess(alive[0] - relayed[0], 1.0)
        self.assertEqual(len(self.p.accepted), 1)
        self.p.w.advance(10)
        self.assertEqual(self.path.mode, "direct")

    def test_peer_rebinds_to_a_port_we_filter(self):
        """
        The same when bob's NAT rebinds: his lobby presence went with his
        mappings, so alice's first attempts find him only once his next
        presence keepalive reached the lobby (every 20 s here); QUIC's
        idle timeout on a path outlasts that, and the transfer finishes
        intact on the same connection.
        """
        modes = []
        self.path.on_mode = modes.append
        data, source = self.start(600_000)
        self.rebind("bob")
        self.finish(data, source, within=60)
        self.assertGreaterEqual(self.a.recoveries, 1)
        self.assertIn("relayed", modes)
        self.assertEqual(len(self.p.accepted), 1)
        self.p.w.advance(10)
        self.assertEqual(self.path.mode, "direct")

    def test_forged_packet_from_a_new_address_moves_nothing(self):
        """
        Random bytes with bob's connection ID for alice, sent from a new
        address to alice's socket: dropped (counted), the path's route
        stays where it was.
        """
        before = self.path.direct[1]
        proto = S._raw(self.path.direct[0])
        cid = self.a.endpoint.connection.host_cid
        dropped = self.a.socket.dropped.get("unauthenticated", 0)
        for i in range(5):
            proto.datagramReceived(bytes([0x41]) + cid + payload(900, seed=i),
                                   ("192.0.2.99", 5000 + i))
        self.assertEqual(self.path.direct[1], before)
        self.assertEqual(self.a.follows, 0)
        self.assertEqual(self.a.socket.dropped.get("unauthenticated", 0) - dropped, 5)
