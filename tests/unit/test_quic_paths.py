"""
One QUIC connection over a P2P path whose addresses change
(L{p2pnat.peer.streams.PathStreams}), on the simulated internet of
L{tests.unit.test_peer_streams}: the peer's NAT rebinds to a port our NAT
lets in (the path follows at QUIC's first authenticated packet from
there, not at the peer's next path keepalive), to a port our NAT filters
(QUIC's silence starts the path's recovery: the relay carries the
connection, then a new punch makes it direct again); a forged packet
from a new address moves nothing, a genuine one raced from elsewhere
moves the route only until the peer's next packet; and on a socket that
several paths share, a datagram from an unknown address finds its path
by connection ID.
"""

import hashlib

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.net.udp import ControlProtocol
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
        mappings.  Bob, silent too, sends the lobby a presence keepalive
        at once rather than at his next one (every 20 s here), so alice's
        recovery finds him and the transfer finishes intact on the same
        connection within 12 s.
        """
        modes = []
        self.path.on_mode = modes.append
        data, source = self.start(600_000)
        self.rebind("bob")
        # 6.9 s; 19 s when bob waited for his next presence keepalive.
        self.assertLess(self.finish(data, source, within=60), 12)
        self.assertGreaterEqual(self.a.recoveries, 1)
        self.assertIn("relayed", modes)
        self.assertEqual(len(self.p.accepted), 1)
        self.p.w.advance(10)
        self.assertEqual(self.path.mode, "direct")

    def test_raced_packet_moves_the_route_until_the_next_one(self):
        """
        Mallory, on the way, sends one of bob's QUIC packets to alice from
        her own address before bob's copy arrives (alice's NAT lets anyone
        in): it authenticates, so alice's path sends there, until bob's
        next packet brings it back; the transfer is intact.
        """
        self.nats["alice"].filtering = EI
        net = self.p.w.net
        mallory = ("192.0.2.66", 6666)
        net.listen(mallory[0], _Bare(), mallory[1])
        bob = self.path.direct[1]
        raced = []

        def lose(src, dst, data):
            if raced == [None] and src == bob and data[:1] and data[0] & 0xC0 == 0x40:
                raced[0] = data
                net.ports[mallory].write(data, dst)
                return True
            return False

        data, source = self.start(300_000)
        net.lose = lose
        raced.append(None)
        self.finish(data, source, within=10)
        self.assertIsNotNone(raced[0])
        self.assertEqual(self.a.follows, 2)  # to mallory, and back to bob
        self.assertEqual(self.path.direct[1], bob)

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


class TapRoutingTests(SynchronousTestCase):
    """Which path's QUIC a datagram on a socket shared by two paths goes to."""

    def test_by_address_then_by_connection_id(self):
        """
        A QUIC datagram from a path's peer address goes to that path; one
        from an address no path has goes to the path whose connection its
        connection ID names (that peer's NAT rebound), with its source;
        one whose connection ID nobody has goes on to the
        C{ControlProtocol}, which drops it.
        """
        got = []
        proto = ControlProtocol(_NoKeys(), None, None, None, stun_rate=0)
        proto.datagramReceived = lambda data, addr: got.append(("control", data))

        class Streams:
            def __init__(self, name, addr, cid):
                self.name, self.addr, self.cid = name, addr, cid
                self.socket = self

            def peer_address(self):
                return self.addr

            def owns(self, data):
                return data[1:9] == self.cid

            def packet_received(self, data):
                got.append((self.name, data))

            def packet_from(self, data, raw, addr):
                got.append((self.name, data, raw is proto, addr))

        one = Streams("one", ("192.0.2.1", 4000), b"1" * 8)
        two = Streams("two", ("192.0.2.2", 4000), b"2" * 8)
        tap = S._Tap.on(proto)
        tap.add(one)
        tap.add(two)
        to_two = b"\x40" + b"2" * 8 + b"rest"
        proto.datagramReceived(to_two, ("192.0.2.2", 4000))
        proto.datagramReceived(to_two, ("192.0.2.1", 4000))  # by address: one's peer
        proto.datagramReceived(to_two, ("198.51.100.9", 5000))
        proto.datagramReceived(b"\x40" + b"3" * 8 + b"rest", ("198.51.100.9", 5000))
        self.assertEqual(got, [("two", to_two), ("one", to_two),
                               ("two", to_two, True, ("198.51.100.9", 5000)),
                               ("control", b"\x40" + b"3" * 8 + b"rest")])
        tap.remove(one)
        tap.remove(two)


class _NoKeys:
    def key_for(self, key_id, mtype):
        return None


class _Bare:
    """A datagram protocol that ignores what it receives."""

    def makeConnection(self, transport):
        self.transport = transport

    def datagramReceived(self, data, addr):
        pass

    def doStop(self):
        pass
