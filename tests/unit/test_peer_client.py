"""
The P2P client (L{p2pnat.peer.client.LobbyClient}) against the real lobby
logic (L{p2pnat.lobby.server.Lobby}) on a L{Clock}, every socket on a
simulated internet (L{tests.support.udp.SimNet}) behind simulated NATs:
login and presence, the exchange that ends in a direct path, the relay
when no punch works, the later upgrade to a direct path, refusals, and
frames that must be ignored.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import ControlProtocol
from p2pnat.peer.client import LobbyClient, Refused
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import SimNat, SimNet

LOBBY = ("198.18.1.1", 3478)
KEYS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}
EI, APD = "endpoint-independent", "address-and-port-dependent"
CONE = M.NatInfo(EI, APD, "preserving")
SEQUENTIAL = M.NatInfo(APD, APD, "sequential", 1, 0.0)
RANDOM = M.NatInfo(APD, APD, "random")
#: Private host, public IP of each client's NAT.
HOSTS = {"alice": ("10.0.1.2", "203.0.113.1"), "bob": ("10.0.2.2", "198.51.100.1"),
         "carol": ("10.0.3.2", "192.0.2.1")}
SIM = {CONE: dict(mapping=EI, filtering=APD), SEQUENTIAL: dict(mapping=APD, filtering=APD,
                                                               allocation="sequential"),
       RANDOM: dict(mapping=APD, filtering=APD, allocation="random")}


def kind(data):
    """The message type name of a p2pnat frame, for looking at the wire."""
    return wire.MESSAGES[wire.parse(data).type].__name__


class World:
    """A lobby and clients, each behind its own NAT."""

    def __init__(self, testcase, latency=0.005):
        self.testcase = testcase
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = SimNet(self.clock, latency)
        self.metrics = Metrics("lobby")
        self.lobby = Lobby(KEYS.get, self.clock, self.metrics, keepalive=20)
        self.lobby_proto = ControlProtocol(self.lobby, self.clock, self.metrics,
                                           wire.ReplayGuard(self.clock), name="lobby",
                                           stamper=wire.Stamper(self.clock))
        self.net.listen(LOBBY[0], self.lobby_proto, LOBBY[1])
        self.clients = {}
        self.incoming = {}
        testcase.addCleanup(self.stop)

    def client(self, name, nat=CONE, login=True, **options):
        host, public = HOSTS[name]
        self.net.nats[host] = SimNat(public, base=20000 + 1000 * len(self.clients),
                                     seed=len(self.clients), **SIM[nat])
        self.incoming[name] = []
        c = LobbyClient(name, KEYS[name], LOBBY, self.net, interface=host, nat=nat,
                        on_path=self.incoming[name].append, **options)
        self.clients[name] = c
        if login:
            d = c.start()
            self.advance(0.05)
            self.testcase.successResultOf(d)
        return c

    def advance(self, seconds, step=0.005):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def connect(self, a, b, limit=20.0):
        results = []
        self.clients[a].connect(b).addBoth(results.append)
        start = self.clock.seconds()
        while not results and self.clock.seconds() - start < limit:
            self.clock.advance(0.005)
        self.testcase.assertTrue(results, "connect did not finish")
        return results[0]

    def between(self, x, y):
        """Datagrams on the wire between the public addresses of x and y (either way)."""
        ips = {HOSTS[x][1], HOSTS[y][1]}
        return [s for s in self.net.sent if {s.src[0], s.dst[0]} == ips]

    def sockets(self, name):
        """The open sockets of a client's host."""
        return sorted(a for a in self.net.ports if a[0] == HOSTS[name][0])

    def stop(self):
        for c in self.clients.values():
            c.stop()
        self.advance(0.05)
        self.testcase.assertEqual(self.net.errors, [])
        # Every client socket closed.
        hosts = {h for h, _ in HOSTS.values()}
        self.testcase.assertEqual([a for a in self.net.ports if a[0] in hosts], [])


def exchange(testcase, w, path_a, path_b, via_lobby):
    """Data both ways over a pair of paths; check whether it went through the lobby."""
    got_a, got_b = [], []
    path_a.on_datagram, path_b.on_datagram = got_a.append, got_b.append
    before = len(w.net.sent)
    path_a.send(b"ping")
    w.advance(0.05)
    path_b.send(b"pong")
    w.advance(0.05)
    testcase.assertEqual((got_a, got_b), ([b"pong"], [b"ping"]))
    data = [s for s in w.net.sent[before:] if kind(s.data) == "Data"]
    through = [s for s in data if LOBBY in (s.src, s.dst)]
    testcase.assertEqual(len(data), 4 if via_lobby else 2)
    testcase.assertEqual(len(through), len(data) if via_lobby else 0)


class LoginTests(SynchronousTestCase):
    def test_login_and_keepalive(self):
        w = World(self)
        alice = w.client("alice", login=False)
        d = alice.start()
        self.assertNoResult(d)
        w.advance(0.02)
        self.assertIs(self.successResultOf(d), alice)
        nat = w.net.nats["10.0.1.2"]
        public = ("203.0.113.1", nat.by_key[(alice._local(alice.proto),)])
        self.assertEqual(alice.public, public)
        self.assertEqual(w.lobby.presence["alice"].addr, public)
        self.assertEqual(w.lobby.presence["alice"].nat, CONE)
        # A keepalive every 20 s (the lobby's figure) from the same socket.
        w.advance(65)
        keepalives = [s for s in w.net.sent if s.dst == LOBBY and kind(s.data) == "Keepalive"]
        self.assertEqual([s.src for s in keepalives], [public] * 3)
        w.lobby.expire()
        self.assertIn("alice", w.lobby.presence)
        self.assertAlmostEqual(w.lobby.presence["alice"].seen, w.clock.seconds() - 5, places=1)
        # No Login after the first.
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "Login"]), 1)

    def lost(self, w, names, times, count=3):
        """
        Lose the first C{count} messages of each kind in C{names}; note when
        each one of the first kind was sent.
        """
        t0 = w.clock.seconds()
        seen = {name: 0 for name in names}

        def lose(src, dst, data):
            name = kind(data)
            if name not in seen:
                return False
            seen[name] += 1
            if name == names[0]:
                times.append(round(w.clock.seconds() - t0, 2))
            return seen[name] <= count

        w.net.lose = lose

    def login_losing(self, names, before, after, count=3):
        """
        Log in losing the first C{count} messages of each kind in C{names}:
        not logged in C{before} seconds after the start, logged in C{after}
        more; the client and when each message of the first kind was sent.
        """
        w = World(self)
        times = []
        self.lost(w, names, times, count)
        alice = w.client("alice", login=False)
        d = alice.start()
        w.advance(before)
        self.assertNoResult(d)
        w.advance(after)
        self.successResultOf(d)
        self.assertEqual([c for c in w.clock.getDelayedCalls() if "_login" in repr(c)], [])
        return alice, times

    def test_login_retransmitted_with_backoff(self):
        """
        Before the RTT to the lobby is known (every Ping lost, and the
        optimistic Login beside it), login is retried after 0.5 s,
        doubling: the old fixed times.
        """
        alice, pings = self.login_losing(("Ping", "Login"), 3.4, 0.2)
        self.assertEqual(pings, [0, 0.5, 1.5, 3.5])
        self.assertEqual(alice.rtt.samples, 2)  # the last Ping's Pong, the Welcome

    def test_login_retried_after_the_measured_rtt(self):
        """
        Once a Pong measured the RTT (10 ms here), a lost Login is retried
        after two RTOs (at least LOGIN_FLOOR, 0.1 s), doubling, instead of
        after 0.5, 1 and 2 s.  Each attempt sends an optimistic Login and
        one once its Pong came.
        """
        alice, logins = self.login_losing(("Login",), 0.3, 0.05, count=5)
        # Each retry's timer is set again once its Pong measured the RTT.
        self.assertEqual(logins, [0, 0.01, 0.11, 0.12, 0.31, 0.32])
        self.assertAlmostEqual(alice.rtt.srtt, 0.01, places=3)

    def test_login_again_after_the_lobby_forgot(self):
        w = World(self)
        alice = w.client("alice")
        w.lobby.presence.clear()  # the lobby restarted, say
        w.advance(20.1)
        # The keepalive was refused (code 5): logged in again at once.
        self.assertIn("alice", w.lobby.presence)
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "Login"]), 2)
        self.assertEqual(w.lobby.presence["alice"].addr, alice.public)

    def test_probes_again_when_keepalives_go_unanswered(self):
        """
        When the lobby refuses our stamps (our clock drifted from the offset
        we learnt), two unanswered keepalives make the client probe the
        lobby's clock and log in again.
        """
        w = World(self)
        skew = [0]

        class LobbyClock:
            def seconds(self):
                return w.clock.seconds() + skew[0]

        w.lobby.clock = w.lobby_proto.replay._clock = LobbyClock()
        alice = w.client("alice")
        skew[0] = 120  # our keepalives are now two minutes behind: stale
        w.advance(61)
        # Two keepalives and the optimistic Login (on the old offset) stale.
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="stale"), 3)
        self.assertEqual([kind(s.data) for s in w.net.sent if s.dst == LOBBY][-5:],
                         ["Keepalive", "Keepalive", "Login", "Ping", "Login"])
        self.assertLess(abs(alice.stamper.offset - 120), 0.1)
        self.assertLess(w.clock.seconds() + 120 - w.lobby.presence["alice"].seen, 1.1)

    def test_lobby_answers_from_elsewhere_ignored(self):
        w = World(self)
        alice = w.client("alice")
        # A Refusal(0) under alice's key, but not from the lobby's address.
        stamper = wire.Stamper(w.clock)
        data = wire.seal(M.Refusal(0, 5), "alice", KEYS["alice"], stamper())
        w.net.send(("192.0.2.66", 3478), alice.public, data)
        # And one from the lobby's address under a wrong key.
        data = wire.seal(M.Refusal(0, 5), "alice", bytes(32), stamper())
        w.net.send(LOBBY, alice.public, data)
        w.advance(0.05)
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "Login"]), 1)
        self.assertEqual(alice.metrics.value("p2pnat_udp_dropped_total", reason="bad-mac"), 1)

    def test_stop(self):
        w = World(self)
        alice = w.client("alice")
        alice.stop()
        w.advance(0.05)
        self.assertNotIn("alice", w.lobby.presence)
        self.assertEqual(w.clock.getDelayedCalls(), [])


class CapturedLobbyFrameTests(SynchronousTestCase):
    """
    Frames captured off the wire and replayed from another address, later
    or at once (issue #9, item 2): a Login moves nobody's presence, and a
    clock probe earns no second answer.
    """

    ATTACKER = ("192.0.2.66", 40000)

    def captured(self, w, name):
        return [s.data for s in w.net.sent if s.dst == LOBBY and kind(s.data) == name][0]

    def to_attacker(self, w):
        return [kind(s.data) for s in w.net.sent if s.dst == self.ATTACKER]

    def test_captured_login_replayed_moves_nothing(self):
        w = World(self)
        alice, _bob = w.client("alice"), w.client("bob")
        login = self.captured(w, "Login")
        w.net.send(self.ATTACKER, LOBBY, login)  # at once
        w.advance(0.05)
        w.clock.advance(86400)  # and a day later
        w.advance(0.05)
        w.net.send(self.ATTACKER, LOBBY, login)
        w.advance(0.05)
        self.assertEqual(w.lobby.presence["alice"].addr, alice.public)
        # Both older than alice's latest frame (a keepalive): refused.
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="replay"), 2)
        # The next Invite for alice (bob's addresses, the session) goes to her.
        path = w.connect("bob", "alice")
        self.assertEqual(path.mode, "direct")
        self.assertEqual(self.to_attacker(w), [])

    def test_captured_ping_gets_no_answer(self):
        w = World(self)
        w.client("alice")
        ping = self.captured(w, "Ping")
        for _ in range(3):
            w.net.send(self.ATTACKER, LOBBY, ping)
            w.advance(0.05)
        w.clock.advance(86400)
        w.net.send(self.ATTACKER, LOBBY, ping)
        w.advance(0.05)
        self.assertEqual(self.to_attacker(w), [])
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="probe-replay"), 4)

    def test_answers_bound_to_outstanding_requests(self):
        """
        A Pong or Welcome replayed to the client (genuine, from the lobby's
        address) echoes nothing outstanding: it moves neither its clock
        offset nor its login.
        """
        w = World(self)
        alice = w.client("alice")
        answers = [s for s in w.net.sent if s.src == LOBBY and kind(s.data) in ("Pong", "Welcome")]
        self.assertEqual(sorted(kind(s.data) for s in answers), ["Pong", "Welcome"])
        offset, public = alice.stamper.offset, alice.public
        before = len(w.net.sent)
        w.advance(1)
        for s in answers:
            w.net.send(LOBBY, s.dst, s.data)
        w.advance(0.05)
        self.assertEqual((alice.stamper.offset, alice.public), (offset, public))
        self.assertEqual([kind(s.data) for s in w.net.sent[before:] if s.src != LOBBY], [])

    def test_login_follows_a_clock_probe(self):
        """
        A client whose clock is an hour off still logs in: its optimistic
        Login is stale, but its Ping learns the lobby's clock, and the next
        Login is stamped on it.
        """
        w = World(self)

        class LobbyClock:
            def seconds(self):
                return w.clock.seconds() + 3600

        w.lobby.clock = w.lobby_proto.replay._clock = LobbyClock()
        alice = w.client("alice", login=False)
        d = alice.start()
        w.advance(0.05)
        self.successResultOf(d)
        self.assertEqual([kind(s.data) for s in w.net.sent if s.dst == LOBBY],
                         ["Login", "Ping", "Login"])
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="stale"), 1)
        self.assertLess(abs(alice.stamper.offset - 3600), 0.1)


class OptimisticLoginTests(SynchronousTestCase):
    """
    The Login goes with the clock probe, stamped on our own clock: one
    round trip when the lobby accepts it, and no loss when it does not.
    """

    def start(self, skew=0.0, mark=None):
        """
        Alice logs in to a lobby whose clock is C{skew} seconds ahead of
        hers (C{mark}: a stamp of her key the lobby accepted before, in
        seconds of its clock); the world, alice, and what she sent to the
        lobby within 10 ms (one round trip) and 20 ms.
        """
        w = World(self)

        class LobbyClock:
            def seconds(self):
                return w.clock.seconds() + skew

        w.lobby.clock = w.lobby_proto.replay._clock = LobbyClock()
        if mark is not None:
            self.assertIsNone(w.lobby_proto.replay.check("alice", int(mark * 1_000_000)))
        alice = w.client("alice", login=False)
        d = alice.start()
        w.advance(0.01)
        one = (d.called, [kind(s.data) for s in w.net.sent if s.dst == LOBBY])
        w.advance(0.01)
        self.assertIs(self.successResultOf(d), alice)
        return w, alice, one

    def stays(self, w, alice, replays=0):
        """Her keepalives go on being accepted for two minutes."""
        w.advance(120)
        w.lobby.expire()
        self.assertIn("alice", w.lobby.presence)
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="replay"), replays)
        keepalives = [s for s in w.net.sent if s.dst == LOBBY and kind(s.data) == "Keepalive"]
        self.assertEqual(len(keepalives), 6)

    def test_logged_in_after_one_round_trip(self):
        w, alice, (called, sent) = self.start()
        self.assertEqual((called, sent), (True, ["Login", "Ping"]))
        self.assertEqual(len([s for s in w.net.sent if kind(s.data) == "Login"]), 1)
        self.stays(w, alice)

    def test_clock_30s_ahead(self):
        """
        The lobby accepted the guess, 30 s ahead of its clock: the stamps
        that follow, on its clock, must not fall below it (they would be
        replays for 30 s).
        """
        w, alice, (called, sent) = self.start(skew=-30)
        self.assertEqual((called, sent), (True, ["Login", "Ping"]))
        self.assertLess(abs(alice.stamper.offset + 30), 0.01)
        self.stays(w, alice)

    def test_clock_30s_behind(self):
        w, alice, (called, sent) = self.start(skew=30)
        self.assertEqual((called, sent), (True, ["Login", "Ping"]))
        self.stays(w, alice)

    def test_clock_two_minutes_off(self):
        """Stale: the Pong's Login logs in, one round trip later, as before."""
        for skew in (120, -120):
            w, alice, (called, sent) = self.start(skew=skew)
            self.assertEqual((called, sent), (False, ["Login", "Ping", "Login"]))
            self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="stale"), 1)
            self.stays(w, alice)

    def test_guess_below_an_earlier_stamp(self):
        """
        Our clock is 10 s behind and an earlier run of ours logged in on the
        lobby's clock a second ago: the guess is a replay, the Pong's Login
        is accepted.
        """
        now = 1_700_000_000
        w, alice, (called, sent) = self.start(skew=10, mark=now + 10 - 1)
        self.assertEqual((called, sent), (False, ["Login", "Ping", "Login"]))
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="replay"), 1)
        self.stays(w, alice, replays=1)


class ConnectTests(SynchronousTestCase):
    def test_cone_to_cone_direct(self):
        """connect → introduce → simultaneous open → a direct path, on both sides."""
        w = World(self)
        alice, bob = w.client("alice"), w.client("bob")
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy, path.rounds),
                         ("direct", "simultaneous-open", 1))
        w.advance(0.05)
        [incoming] = w.incoming["bob"]
        self.assertEqual((incoming.peer, incoming.mode), ("alice", "direct"))
        self.assertIs(alice.paths["bob"], path)
        self.assertIs(bob.paths["alice"], incoming)
        # The path's ends are the NATs' mappings of the sockets the lobby observed.
        proto, addr, _ = path.direct
        self.assertEqual(addr[0], "198.51.100.1")
        self.assertEqual(incoming.direct[1][0], "203.0.113.1")
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertEqual(w.lobby.sessions[path.direct[2].id].binds, {})

    def test_sequential_nats_predicted(self):
        """Two sequential symmetric NATs: the seed's window, direct in one round."""
        w = World(self)
        w.client("alice", SEQUENTIAL)
        w.client("bob", SEQUENTIAL)
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy, path.rounds), ("direct", "predict", 1))
        w.advance(0.05)
        exchange(self, w, path, w.incoming["bob"][0], via_lobby=False)

    def test_random_nats_relayed(self):
        """Two random-port NATs: no punch can work, the lobby relays at once."""
        w = World(self)
        w.client("alice", RANDOM)
        w.client("bob", RANDOM)
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay"))
        self.assertEqual(w.between("alice", "bob"), [])  # not one probe
        w.advance(0.3)  # bob learns the relay is ready at its next bind
        [incoming] = w.incoming["bob"]
        self.assertEqual(incoming.mode, "relayed")
        exchange(self, w, path, incoming, via_lobby=True)

    def test_failed_punch_falls_back_to_the_relay(self):
        """
        Cone NATs, but nothing passes between the peers: rounds of punches
        until only the relay's reserve is left, then the relayed path.
        """
        w = World(self)
        w.client("alice", connect_timeout=12.0)
        w.client("bob")
        blocked = {"203.0.113.1", "198.51.100.1"}
        w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        took = w.clock.seconds() - start
        self.assertEqual(path.mode, "relayed")
        self.assertEqual(path.strategy, "relay (after simultaneous-open)")
        self.assertTrue(path.rounds >= 3 and path.probes > 0, (path.rounds, path.probes))
        self.assertTrue(8 <= took <= 12, took)
        w.advance(0.5)
        incoming = w.incoming["bob"][-1]
        exchange(self, w, path, incoming, via_lobby=True)
        # Once bob's answers to the missed rounds gave up binding the relay
        # (10 s), each side keeps two sockets: presence and the path's.
        # (Bob's answer sockets of missed rounds used to stay open for good.)
        w.advance(12)
        for name, p in (("alice", path), ("bob", incoming)):
            self.assertEqual(w.sockets(name), sorted([
                w.clients[name].proto.transport.addr, p.relayed[0].transport.addr]), name)

    def test_relayed_path_upgraded_to_direct(self):
        w = World(self)
        alice = w.client("alice", upgrade_interval=20.0)
        w.client("bob")
        blocked = {"203.0.113.1", "198.51.100.1"}
        w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        path = w.connect("alice", "bob")
        w.advance(0.5)
        incoming = w.incoming["bob"][-1]
        modes_a, modes_b = [], []
        path.on_mode, incoming.on_mode = modes_a.append, modes_b.append
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        w.net.lose = lambda src, dst, data: False  # the way is open now
        w.advance(25)
        self.assertEqual((path.mode, incoming.mode), ("direct", "direct"))
        self.assertEqual((modes_a, modes_b), (["direct"], ["direct"]))
        self.assertIs(alice.paths["bob"], path)
        # The application was told of bob's path once, not again on the upgrade.
        self.assertEqual(len(w.incoming["bob"]), 1)
        exchange(self, w, path, incoming, via_lobby=False)
        # The sockets left: presence, the relayed route's, the direct route's
        # (for simultaneous open, the upgrade's fresh socket).
        w.advance(12)
        for name, p in (("alice", path), ("bob", incoming)):
            self.assertEqual(w.sockets(name), sorted([
                w.clients[name].proto.transport.addr, p.relayed[0].transport.addr,
                p.direct[0].transport.addr]), name)

    def test_failed_upgrade_attempts_release_their_sockets(self):
        w = World(self)
        w.client("alice", upgrade_interval=5.0)
        w.client("bob")
        blocked = {"203.0.113.1", "198.51.100.1"}
        w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        path = w.connect("alice", "bob")
        w.advance(60)  # upgrade attempts after 5, 10, 20 s ... all missed
        attempts = len([s for s in w.net.sent if kind(s.data) == "ConnectRequest"])
        self.assertGreater(attempts, 5)
        self.assertEqual(path.mode, "relayed")
        w.advance(12)
        self.assertEqual(w.sockets("alice"), sorted([w.clients["alice"].proto.transport.addr,
                                                     path.relayed[0].transport.addr]))


class RefusalTests(SynchronousTestCase):
    def test_peer_refuses(self):
        w = World(self)
        w.client("alice")
        w.client("bob", accept=lambda peer: peer == "carol")
        f = w.connect("alice", "bob")
        f.trap(Refused)
        self.assertEqual(f.getErrorMessage(), "bob refused")
        self.assertEqual(w.between("alice", "bob"), [])
        self.assertEqual(w.incoming["bob"], [])

    def test_lobby_refuses(self):
        w = World(self)
        w.client("alice")
        for peer, why in (("nobody", "no such client"), ("carol", "peer offline")):
            f = w.connect("alice", peer)
            f.trap(Refused)
            self.assertEqual(f.getErrorMessage(), why)

    def test_lobby_silent(self):
        w = World(self)
        alice = w.client("alice", connect_timeout=5.0)
        w.client("bob")
        w.net.lose = lambda src, dst, data: kind(data) == "ConnectRequest"
        start = w.clock.seconds()
        f = w.connect("alice", "bob")
        f.trap(Refused)
        self.assertEqual(f.getErrorMessage(), "the lobby did not answer in time")
        self.assertAlmostEqual(w.clock.seconds() - start, 5.0, places=1)
        self.assertEqual(alice._requests, {})


class RttTimerTests(SynchronousTestCase):
    """Timers that follow the RTT to the lobby (L{LobbyClient.rtt})."""

    def test_connect_request_retransmitted_after_the_rtt(self):
        """
        A lost ConnectRequest goes again after REQUEST_RTOS RTOs (10 ms
        RTT: at the floor, 0.15 s), then twice that, instead of 0.5 s, 1 s.
        """
        w = World(self)
        alice = w.client("alice")
        w.client("bob")
        self.assertEqual(alice.rtt.samples, 2)  # the Pong, the Welcome
        sent = []

        def lose(src, dst, data):
            if kind(data) == "ConnectRequest":
                sent.append(w.clock.seconds())
                return len(sent) <= 2
            return False

        w.net.lose = lose
        path = w.connect("alice", "bob")
        self.assertEqual(path.mode, "direct")
        self.assertEqual([round(t - sent[0], 3) for t in sent], [0, 0.15, 0.45])

    def _cached_client(self, nat, asked):
        """
        A world whose lobby answers STUN on two addresses, and alice with a
        NAT cache, not started; her port-mapping attempts go in C{asked}
        (their times).
        """
        from p2pnat.net.udp import link_siblings
        from p2pnat.peer.discovery import NatCache
        from tests.unit.test_discovery import NoHandler

        w = World(self)
        other = (LOBBY[0], LOBBY[1] + 1)
        sibling = ControlProtocol(NoHandler(), w.clock, w.metrics, wire.ReplayGuard(w.clock),
                                  name="lobby")
        w.net.listen(other[0], sibling, other[1])
        link_siblings([w.lobby_proto, sibling])
        host = HOSTS["alice"][0]
        cache = NatCache(w.clock, [LOBBY, other], host,
                         listen=lambda proto: w.net.listen(host, proto))
        alice = w.client("alice", nat=nat, login=False, discovery=cache,
                         portmap=lambda reactor, port: asked.append(w.clock.seconds())
                         or _NoMapping())
        return w, cache, alice

    def test_port_mapping_waits_for_discovery(self):
        """
        In a fresh process (the cache has no NAT yet), start() asks for no
        port mapping before discovery answers: its import and requests
        would delay the lobby's answers and so the login.  Behind a cone NAT
        it is asked MAPPING_DELAY after the login (a connect made at once
        goes first); behind a NAT with random ports (which needs it) as
        soon as discovery says so, and the login waits for it.
        """
        for nat in (CONE, RANDOM):
            asked = []
            w, _, alice = self._cached_client(nat, asked)
            t0 = w.clock.seconds()
            d = alice.start()
            self.assertEqual(asked, [], nat)
            w.advance(0.03)
            self.successResultOf(d)
            if nat is CONE:
                self.assertEqual(asked, [])
                w.advance(alice.MAPPING_DELAY)
                self.assertEqual(len(asked), 1)
                self.assertLess(abs(asked[0] - t0 - alice.MAPPING_DELAY - 0.01), 0.01)
            else:
                self.assertEqual(len(asked), 1, nat)
                self.assertGreater(asked[0], w.clock.seconds() - 0.03, nat)
            alice.stop()
            w.advance(3)

    def test_no_port_mapping_after_stop(self):
        """A client stopped before MAPPING_DELAY asks for no mapping."""
        asked = []
        w, _, alice = self._cached_client(CONE, asked)
        alice.start()
        w.advance(0.03)
        alice.stop()
        w.advance(3)
        self.assertEqual(asked, [])

    def test_discovery_alongside_the_login(self):
        """
        With a NAT cache (two lobby addresses answering STUN), start()
        learns the NAT during the login, shares its RTT, does not wait for
        a port mapping behind a cone NAT, and has the cache refresh when the
        lobby sees us at another IP address; stop() ends the refreshes.
        """
        asked = []
        w, cache, alice = self._cached_client(CONE, asked)
        self.assertIs(alice.rtt, cache.rtt)
        d = alice.start()
        w.advance(0.03)
        self.assertIs(self.successResultOf(d), alice)
        self.assertEqual((alice.nat.mapping, alice.nat.allocation), (EI, "preserving"))
        self.assertEqual(len(asked), 0)  # asked after the login, not waited for
        w.advance(0.3)
        self.assertEqual(alice.nat.filtering, APD)  # the run's end told the rest
        self.assertEqual(cache.runs, 1)
        nat = w.net.nats[HOSTS["alice"][0]]
        nat.forget()  # the NAT reboots: a new mapping, the same behaviour
        w.advance(21)
        self.assertEqual(cache.runs, 1)  # a new port alone is no reason to measure again
        self.assertEqual(len(asked), 1)
        nat.ip = "203.0.113.7"  # another network: another public IP
        nat.forget()
        w.advance(21)
        self.assertEqual(cache.runs, 2)
        alice.stop()
        w.advance(3)
        self.assertEqual([c for c in w.clock.getDelayedCalls() if "NatCache" in repr(c)], [])


class _NoMapping:
    """A port mapper whose gateway grants nothing, at once."""

    current = None

    def startService(self):
        pass

    def stopService(self):
        pass

    def map(self):
        from twisted.internet import defer

        return defer.succeed(None)
