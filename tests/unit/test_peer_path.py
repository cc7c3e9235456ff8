"""
A peer-to-peer path (L{p2pnat.peer.path.Path}) on a L{Clock}, between two
sockets of a simulated internet (L{tests.support.udp.SimNet}): datagrams
both ways, direct and relayed, the upgrade, the keepalive, a peer's new
NAT mapping, close, and frames that must not be delivered.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.client import LobbyClient, Session
from p2pnat.peer.path import Path
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import SimNat, SimNet

LOBBY = ("198.18.1.1", 3478)
SID = bytes(range(16))
KEY = bytes([7]) * 32


def kind(data):
    return wire.MESSAGES[wire.parse(data).type].__name__


class End:
    """One end: a client (not logged in), its session, a socket, its Path."""

    def __init__(self, net, name, role, host):
        self.client = LobbyClient(name, bytes([ord(name[0])]) * 32, LOBBY, net, interface=host)
        peer = "bob" if name == "alice" else "alice"
        self.session = Session(self.client, SID, KEY, role, peer)
        self.sock = self.client._listen(self.client)
        self.path = Path(self.client, peer)
        self.got, self.modes = [], []
        self.path.on_mode = self.modes.append

    @property
    def addr(self):
        return self.sock.transport.addr


class PathTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = SimNet(self.clock, 0.005)
        self.a = End(self.net, "alice", "a", "203.0.113.1")
        self.b = End(self.net, "bob", "b", "198.51.100.1")
        self.a.path.use_direct(self.a.sock, self.b.addr, self.a.session)
        self.b.path.use_direct(self.b.sock, self.a.addr, self.b.session)
        self.addCleanup(self.check_clean)

    def check_clean(self):
        for end in (self.a, self.b):
            end.path.close()
        self.clock.advance(0.1)
        self.assertEqual(self.net.errors, [])
        self.assertEqual(self.net.ports, {})

    def advance(self, seconds, step=0.005):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_send_and_receive(self):
        self.assertEqual((self.a.path.mode, self.a.modes), ("direct", ["direct"]))
        self.a.path.send(b"early")  # before bob's application listens: kept
        self.advance(0.01)
        self.b.path.on_datagram = self.b.got.append
        self.assertEqual(self.b.got, [b"early"])
        self.a.path.on_datagram = self.a.got.append
        self.b.path.send(b"x" * M.MAX_PAYLOAD)
        self.advance(0.01)
        self.assertEqual(self.a.got, [b"x" * M.MAX_PAYLOAD])
        self.assertRaises(ValueError, self.b.path.send, b"x" * (M.MAX_PAYLOAD + 1))
        self.assertEqual((self.a.path.sent, self.a.path.received), (1, 1))
        [sent] = [s for s in self.net.sent if s.src == self.a.addr]
        self.assertEqual((sent.dst, wire.parse(sent.data).key_id),
                         (self.b.addr, M.session_key_id(SID, "a")))

    def test_backlog_bounded(self):
        for i in range(Path.BACKLOG + 10):
            self.a.path.send(b"%d" % i)
        self.advance(0.01)
        self.b.path.on_datagram = self.b.got.append
        self.assertEqual(self.b.got, [b"%d" % i for i in range(Path.BACKLOG)])

    def test_keepalive(self):
        """Every 15 s a PathKeepalive to the peer, while the path is up; not after close."""
        self.advance(46)
        keepalives = [(s.src, s.dst) for s in self.net.sent if kind(s.data) == "PathKeepalive"]
        self.assertEqual(sorted(keepalives), sorted([(self.a.addr, self.b.addr)] * 3
                                                    + [(self.b.addr, self.a.addr)] * 3))
        self.a.path.close()
        self.advance(0.05)
        self.assertEqual(self.b.path.mode, "closed")
        sent = len(self.net.sent)
        self.advance(30)
        self.assertEqual(len(self.net.sent), sent)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keepalive_survives_a_failed_send(self):
        calls = []

        def fail(data, addr, kind):
            calls.append(kind)
            raise OSError(101, "network unreachable")

        self.a.sock.send, real = fail, self.a.sock.send
        self.advance(15.01)
        self.assertEqual(calls, ["PathKeepalive"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.a.sock.send = real
        self.advance(15)
        self.assertEqual(len([s for s in self.net.sent if s.src == self.a.addr
                              and kind(s.data) == "PathKeepalive"]), 1)

    def test_close(self):
        self.a.path.close()
        self.assertEqual((self.a.path.mode, self.a.modes), ("closed", ["direct", "closed"]))
        self.assertRaises(ConnectionError, self.a.path.send, b"x")
        self.advance(0.05)
        self.assertEqual((self.b.path.mode, self.b.modes), ("closed", ["direct", "closed"]))
        self.assertEqual(self.net.ports, {})  # both sockets released
        self.a.path.close()  # again: nothing

    def test_forged_replayed_and_foreign_frames_ignored(self):
        self.b.path.on_datagram = self.b.got.append
        stamper = wire.Stamper(self.clock)
        a_kid = M.session_key_id(SID, "a")
        for message, kid, key in ((M.Data(b"forged"), a_kid, bytes(32)),
                                  (M.Data(b"mine"), M.session_key_id(SID, "b"), KEY),
                                  (M.PathClose(), a_kid, bytes(32)),
                                  (M.Data(b"lobby"), "bob", self.b.client.key)):
            self.net.send(self.a.addr, self.b.addr, wire.seal(message, kid, key, stamper()))
        self.advance(0.01)
        self.assertEqual((self.b.got, self.b.path.mode), ([], "direct"))
        self.a.path.send(b"once")
        self.advance(0.01)
        s = self.net.sent[-1]
        self.assertEqual(wire.parse(s.data).open(KEY), M.Data(b"once"))
        self.net.send(self.a.addr, self.b.addr, s.data)  # replayed
        self.advance(0.01)
        self.assertEqual(self.b.got, [b"once"])
        m = self.b.client.metrics
        self.assertEqual([m.value("p2pnat_udp_dropped_total", reason=r)
                          for r in ("bad-mac", "unknown-key", "replay")], [2, 2, 1])

    def test_follows_the_peers_new_mapping_on_path_traffic_only(self):
        self.b.path.on_datagram = self.b.got.append
        stamper = self.a.session.stamper
        probe = wire.seal(M.Probe(1, 0), M.session_key_id(SID, "a"), KEY, stamper())
        self.net.send(("203.0.113.1", 6666), self.b.addr, probe)
        self.advance(0.01)
        # A late probe from another socket is answered there, but not followed.
        self.assertEqual(self.b.path.direct[1], self.a.addr)
        [ack] = [s for s in self.net.sent if kind(s.data) == "ProbeAck"]
        self.assertEqual(ack.dst, ("203.0.113.1", 6666))
        # Data from a new mapping (a NAT appeared in front of alice's socket,
        # as when one re-maps it) is followed, and the answer goes there.
        self.net.nats["203.0.113.1"] = SimNat("203.0.113.1", allocation="sequential",
                                              base=9000)
        self.a.path.on_datagram = self.a.got.append
        self.a.path.send(b"moved")
        self.advance(0.01)
        self.assertEqual(self.b.got, [b"moved"])
        self.assertEqual(self.b.path.direct[1], ("203.0.113.1", 9000))
        self.b.path.send(b"answer")
        self.advance(0.01)
        self.assertEqual(self.a.got, [b"answer"])
        del self.net.nats["203.0.113.1"]

    def test_silence_seen_within_the_bound_and_the_way_back(self):
        """
        Keepalives both ways keep the path alive however long it idles; a
        route that loses everything is reported silent once, within
        C{dead_after}, with the keepalive halved; the peer heard again is
        reported back.
        """
        events = []
        times = []
        self.a.path.on_event = lambda name, fields: (events.append(
            (name, fields["keepalive"], fields["mode"])), times.append(self.clock.seconds()))
        self.advance(100, step=0.05)
        self.assertEqual(events, [])
        cut = self.clock.seconds()
        self.net.lose = lambda src, dst, data: True
        bound = self.a.path.health.dead_after
        self.advance(bound + 5, step=0.05)
        self.assertEqual(events, [("path-silent", 7.5, "direct")])
        # Last heard at most one 15 s keepalive before the cut: 18-33 s after it.
        self.assertTrue(cut + bound - 15.1 <= times[0] <= cut + bound + 0.1, times[0] - cut)
        self.net.lose = lambda src, dst, data: False
        self.advance(8, step=0.05)  # the peer's next keepalive (7.5 s now)
        self.assertEqual(events[1:], [("path-back", 7.5, "direct")])
        self.assertEqual(self.a.path.keepalive_interval, 7.5)

    def test_relayed_then_upgraded(self):
        """
        A path relayed by the lobby sends there; an upgrade makes it direct
        (on_mode), and a relay of a new session drops the stale routes.
        """
        lobby = self.net.listen(LOBBY[0], _Sink(), LOBBY[1])
        c = End(self.net, "alice", "a", "203.0.113.2")
        relay_sock = c.sock
        c.path.use_relay(relay_sock, LOBBY, c.session)
        self.assertEqual((c.path.mode, c.modes), ("relayed", ["relayed"]))
        c.path.send(b"via lobby")
        self.advance(0.01)
        self.assertEqual([kind(d) for d, _ in lobby.proto.got], ["Data"])
        direct = c.client._listen(c.client)
        c.path.use_direct(direct, self.b.addr, c.session)
        self.assertEqual((c.path.mode, c.modes), ("direct", ["relayed", "direct"]))
        c.path.send(b"direct")
        self.advance(0.01)
        self.assertEqual(len(lobby.proto.got), 1)
        # The peer connected afresh (a new session), relayed: the old routes go.
        fresh = c.client._listen(c.client)
        new = Session(c.client, bytes(16), KEY, "a", "bob")
        c.path.use_relay(fresh, LOBBY, new)
        self.clock.advance(0)
        # The stale routes' sockets are released (the old relay's used to stay open).
        self.assertEqual((direct.transport, relay_sock.transport), (None, None))
        self.assertEqual((c.path.mode, c.path.direct), ("relayed", None))
        c.path.send(b"via lobby again")
        self.advance(0.01)
        self.assertEqual(len(lobby.proto.got), 2)
        c.path.close()
        lobby.stopListening()


class _Sink:
    """A listening "lobby" that keeps what it gets."""

    def __init__(self):
        self.got = []

    def makeConnection(self, transport):
        self.transport = transport

    def doStop(self):
        self.transport = None

    def datagramReceived(self, data, addr):
        self.got.append((data, addr))
