"""
The lobby's logic (L{p2pnat.lobby.server}) on a L{Clock} with in-memory UDP:
presence, the introduction exchange of the P2P path (docs/protocol.rst), session keys,
refusals, retransmissions and the authenticated, rate-limited relay.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import FakeNetwork

LOBBY = ("198.18.1.1", 3478)
KEYS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}


class Peer:
    """A client's socket on the fake network, collecting what it receives."""

    def __init__(self, world, name, addr):
        self.world = world
        self.name = name
        self.addr = addr
        # One stamper per client, as LobbyClient has: its sockets share the
        # client's key, so its timestamps keep increasing across them.
        self.stamper = world.stampers.setdefault(name, wire.Stamper(world.clock))
        self.got = []
        world.net.endpoints[addr] = self

    def datagramReceived(self, data, addr):
        frame = wire.parse(data)
        key = self.world.session_keys.get(frame.key_id) or KEYS.get(frame.key_id)
        self.got.append((frame, frame.open(key), addr))

    def send(self, message, key_id=None, key=None, to=LOBBY, flags=0):
        data = wire.seal(message, key_id or self.name, key or KEYS[self.name], self.stamper(),
                         flags=flags)
        self.world.net.send(data, self.addr, to)
        return data

    def last(self, cls):
        found = [m for f, m, a in self.got if isinstance(m, cls)]
        return found[-1] if found else None


class World:
    def __init__(self, testcase, **options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = FakeNetwork()
        self.metrics = Metrics("lobby")
        self.lobby = Lobby(KEYS.get, self.clock, self.metrics, keepalive=20, **options)
        self.proto = self.net.attach(
            ControlProtocol(self.lobby, self.clock, self.metrics, wire.ReplayGuard(self.clock),
                            stamper=wire.Stamper(self.clock)), *LOBBY)
        self.session_keys = {}
        self.stampers = {}

    def login(self, name, addr, flags=0):
        p = Peer(self, name, addr)
        p.send(M.Login(addr, M.NatInfo("endpoint-independent")), flags=flags)
        return p

    def dropped(self, reason):
        return self.metrics.value("p2pnat_udp_dropped_total", reason=reason)


class PresenceTests(SynchronousTestCase):
    def test_login_welcome(self):
        w = World(self)
        a = w.login("alice", ("203.0.113.1", 5000))
        welcome = a.last(M.Welcome)
        self.assertEqual((welcome.observed, welcome.keepalive), (("203.0.113.1", 5000), 20))
        self.assertIn("alice", w.lobby.presence)
        self.assertEqual(w.metrics.value("p2pnat_online"), 1)

    def test_unknown_client_and_forged_login(self):
        w = World(self)
        p = Peer(w, "mallory", ("203.0.113.9", 1))
        p.send(M.Login(), key_id="mallory", key=bytes(32))
        p.send(M.Login(), key_id="alice", key=bytes(32))
        self.assertEqual(p.got, [])
        self.assertEqual(w.dropped("unknown-key"), 1)
        self.assertEqual(w.dropped("bad-mac"), 1)

    def test_expiry_and_keepalive(self):
        w = World(self)
        a = w.login("alice", ("203.0.113.1", 5000))
        w.clock.advance(50)
        a.send(M.Keepalive())
        w.clock.advance(50)
        w.lobby.expire()
        self.assertIn("alice", w.lobby.presence)
        w.clock.advance(61)
        w.lobby.expire()
        self.assertNotIn("alice", w.lobby.presence)
        # A keepalive from a forgotten client asks it to log in again.
        a.send(M.Keepalive())
        self.assertEqual(a.last(M.Refusal), M.Refusal(0, 5))

    def test_logout(self):
        w = World(self)
        a = w.login("alice", ("203.0.113.1", 5000))
        a.send(M.Logout())
        self.assertNotIn("alice", w.lobby.presence)


class _Pair:
    """Alice and Bob logged in, with the fresh ports of an exchange."""

    world_options = {}

    def setUp(self):
        self.w = World(self, **self.world_options)
        self.a = self.w.login("alice", ("203.0.113.1", 5000))
        self.b = self.w.login("bob", ("198.51.100.2", 6000))
        # The fresh ports of the exchange.
        self.a2 = Peer(self.w, "alice", ("203.0.113.1", 5001))
        self.b2 = Peer(self.w, "bob", ("198.51.100.2", 6001))

    def request(self, peer="bob", rid=7):
        return self.a2.send(M.ConnectRequest(rid, peer, ("10.0.0.1", 40001),
                                             M.NatInfo("address-and-port-dependent", "unknown",
                                                       "sequential", 1, 3.5)))



class IntroductionTests(_Pair, SynchronousTestCase):
    def test_exchange(self):
        self.request()
        invite = self.b.last(M.Invite)
        self.assertEqual((invite.request_id, invite.peer, invite.observed, invite.local),
                         (7, "alice", ("203.0.113.1", 5001), ("10.0.0.1", 40001)))
        self.assertEqual((invite.nat.allocation, invite.nat.step, invite.nat.rate),
                         ("sequential", 1, 3.5))
        self.b2.send(M.Answer(7, True, ("10.9.0.2", 50001), M.NatInfo("endpoint-independent")))
        self.assertEqual(self.b2.last(M.AnswerAck), M.AnswerAck(7, ("198.51.100.2", 6001)))
        intro = self.a2.last(M.Introduce)
        self.assertTrue(intro.accepted)
        self.assertEqual((intro.peer, intro.observed, intro.local),
                         ("bob", ("198.51.100.2", 6001), ("10.9.0.2", 50001)))
        # Both peers get the same session key, each sealed for itself.
        ka = M.open_session_key(KEYS["alice"], intro.session_id, intro.sealed_key)
        kb = M.open_session_key(KEYS["bob"], invite.session_id, invite.sealed_key)
        self.assertEqual(ka, kb)
        self.assertEqual(intro.session_id, invite.session_id)
        self.assertNotEqual(intro.sealed_key, invite.sealed_key)
        self.assertNotIn(ka, intro.encode_body() + invite.encode_body())

    def test_refusals(self):
        self.request(peer="nobody", rid=1)
        self.assertEqual(self.a2.last(M.Refusal), M.Refusal(1, 1))
        self.request(peer="carol", rid=2)  # registered, not logged in
        self.assertEqual(self.a2.last(M.Refusal), M.Refusal(2, 2))
        self.request(peer="alice", rid=3)
        self.assertEqual(self.a2.last(M.Refusal), M.Refusal(3, 2))
        Peer(self.w, "carol", ("192.0.2.7", 1)).send(M.ConnectRequest(4, "bob"))
        self.assertEqual(self.w.lobby.pending.get(("carol", 4)), None)

    def test_peer_refuses(self):
        self.request()
        self.b2.send(M.Answer(7, False))
        intro = self.a2.last(M.Introduce)
        self.assertFalse(intro.accepted)
        self.assertEqual(intro.sealed_key, bytes(32))
        self.assertEqual(self.w.lobby.sessions, {})

    def test_retransmissions(self):
        self.request()
        self.request()  # A's request again: B is invited again, same session
        invites = [m for f, m, a in self.b.got if isinstance(m, M.Invite)]
        self.assertEqual(len(invites), 2)
        self.assertEqual(invites[0].session_id, invites[1].session_id)
        self.b2.send(M.Answer(7, True))
        self.b2.send(M.Answer(7, True))  # B's answer again: acked and introduced again
        self.assertEqual(len([m for f, m, a in self.a2.got if isinstance(m, M.Introduce)]), 2)
        self.request()  # A did not get the Introduce: sent again
        self.assertEqual(len([m for f, m, a in self.a2.got if isinstance(m, M.Introduce)]), 3)
        self.assertEqual(len(self.w.lobby.sessions), 1)

    def test_request_rate_limited(self):
        for rid in range(1, 30):
            self.request(rid=rid)
        self.assertIn(M.Refusal(29, 4), [m for f, m, a in self.a2.got])


MAPPED_A, A6 = ("203.0.113.1", 41000), ("2001:2:0:1::10", 40000)
MAPPED_B, B6 = ("198.51.100.2", 42000), ("2001:2:0:2::10", 50000)
READS = M.FLAG_CANDIDATES


class CandidateTests(SynchronousTestCase):
    """The lobby passes candidates on, validated, to clients that read them."""

    def setUp(self):
        self.w = World(self)

    def pair(self, a_flags=READS, b_flags=READS):
        self.a = self.w.login("alice", ("203.0.113.1", 5000), a_flags)
        self.b = self.w.login("bob", ("198.51.100.2", 6000), b_flags)
        self.a2 = Peer(self.w, "alice", ("203.0.113.1", 5001))
        self.b2 = Peer(self.w, "bob", ("198.51.100.2", 6001))

    def exchange(self, a_candidates, b_candidates, a_flags=READS, b_flags=READS):
        self.a2.send(M.ConnectRequest(7, "bob", ("10.0.0.1", 40001), M.NatInfo(),
                                      candidates=a_candidates), flags=a_flags)
        self.b2.send(M.Answer(7, True, ("10.9.0.2", 50001), M.NatInfo(),
                              candidates=b_candidates), flags=b_flags)
        invite = [(f, m) for f, m, _ in self.b.got if isinstance(m, M.Invite)][-1]
        intro = [(f, m) for f, m, _ in self.a2.got if isinstance(m, M.Introduce)][-1]
        return invite, intro

    def test_welcome_says_the_lobby_relays_candidates(self):
        self.pair()
        frame, welcome, _ = self.a.got[-1]
        self.assertIsInstance(welcome, M.Welcome)
        self.assertEqual(frame.flags, READS)
        self.a.send(M.Keepalive())
        frame, welcome, _ = self.a.got[-1]
        self.assertEqual((type(welcome), frame.flags), (M.Welcome, READS))

    def test_relayed_both_ways(self):
        self.pair()
        (fi, invite), (fa, intro) = self.exchange((MAPPED_A, A6), (B6,))
        self.assertEqual(invite.candidates, (MAPPED_A, A6))
        self.assertEqual(intro.candidates, (B6,))
        # Each introduction says that the other side got the candidates.
        self.assertEqual((fi.flags, fa.flags), (READS, READS))

    def test_not_to_clients_that_cannot_read_them(self):
        """
        A client of an older release gets the introduction it knows (no
        candidate block), and its peer learns that its own candidates did
        not reach it.
        """
        self.pair(b_flags=0)
        (fi, invite), (fa, intro) = self.exchange((MAPPED_A, A6), (), b_flags=0)
        self.assertEqual(invite.candidates, ())
        self.assertEqual(len(invite.encode_body()), len(M.Invite(
            1, "alice", invite.observed, invite.local, invite.nat, invite.session_id,
            invite.sealed_key).encode_body()))
        self.assertEqual((fi.flags, fa.flags), (READS, 0))
        self.assertEqual(len(self.w.lobby.sessions), 1)

    def test_invalid_candidates_dropped(self):
        self.pair()
        bad = [("127.0.0.1", 5), ("::", 5), ("224.0.0.9", 5), ("fe80::1", 5), (MAPPED_A[0], 0)]
        (_, invite), (_, intro) = self.exchange((bad[0], MAPPED_A, bad[1], MAPPED_A),
                                                (bad[2], bad[3], bad[4], B6))
        self.assertEqual(invite.candidates, (MAPPED_A,))  # and the repeat once
        self.assertEqual(intro.candidates, (B6,))
        self.assertEqual(self.w.dropped("bad-candidate"), 2)

    def test_oversized_list_dropped(self):
        """A forged list of more than four: the whole request is dropped, nobody invited."""
        self.pair()
        body = bytearray(M.ConnectRequest(7, "bob", candidates=(MAPPED_A,) * 4).encode_body())
        body[len(body) - 4 * 7 - 1] = 5
        body += wire.pack_addr(*MAPPED_A)

        class Forged(M.ConnectRequest):
            def encode_body(self):
                return bytes(body)

        self.a2.send(Forged(), flags=READS)
        self.assertEqual(self.w.dropped("bad-body"), 1)
        self.assertIsNone(self.b.last(M.Invite))
        self.assertEqual(self.w.lobby.pending, {})


class SessionCapTests(_Pair, SynchronousTestCase):
    world_options = {"max_sessions": 3}

    def test_oldest_session_evicted_at_the_cap(self):
        ids = []
        for rid in range(1, 6):
            self.w.clock.advance(1)  # stay under the request rate limit
            self.request(rid=rid)
            self.b2.send(M.Answer(rid, True))
            ids.append(self.a2.last(M.Introduce).session_id)
        self.assertEqual(list(self.w.lobby.sessions), ids[2:])
        self.assertEqual(self.w.metrics.value("p2pnat_sessions_total", outcome="evicted"), 2)

    def test_active_session_outlives_idle_ones_at_the_cap(self):
        """
        At the cap the least recently active session goes, not the oldest:
        a session still relaying survives any number of newer idle ones.
        """
        self.w.clock.advance(1)
        self.request(rid=1)
        self.b2.send(M.Answer(1, True))
        sid = self.a2.last(M.Introduce).session_id
        key = M.open_session_key(KEYS["alice"], sid, self.a2.last(M.Introduce).sealed_key)
        ka, kb = M.session_key_id(sid, "a"), M.session_key_id(sid, "b")
        self.w.session_keys = {ka: key, kb: key}
        self.a2.send(M.RelayBind(), key_id=ka, key=key)
        self.b2.send(M.RelayBind(), key_id=kb, key=key)
        for rid in range(2, 8):
            self.w.clock.advance(1)
            self.request(rid=rid)
            self.b2.send(M.Answer(rid, True))
            # The relayed session is in use all along.
            self.a2.send(M.Data(b"still here"), key_id=ka, key=key)
        self.assertIn(sid, self.w.lobby.sessions)
        self.assertEqual(len(self.w.lobby.sessions), 3)
        self.assertEqual(self.w.metrics.value("p2pnat_sessions_total", outcome="evicted"), 4)


class RelayTests(_Pair, SynchronousTestCase):
    world_options = {"relay_rate": 10_000}

    def setUp(self):
        _Pair.setUp(self)
        w = self.w
        self.request()
        self.b2.send(M.Answer(7, True))
        intro = self.a2.last(M.Introduce)
        self.sid = intro.session_id
        self.key = M.open_session_key(KEYS["alice"], self.sid, intro.sealed_key)
        self.ka, self.kb = M.session_key_id(self.sid, "a"), M.session_key_id(self.sid, "b")
        w.session_keys = {self.ka: self.key, self.kb: self.key}

    def bind(self, peer, kid):
        peer.send(M.RelayBind(), key_id=kid, key=self.key)
        return peer.last(M.RelayBound)

    def test_relay(self):
        self.assertEqual(self.bind(self.a2, self.ka), M.RelayBound(False))
        self.assertEqual(self.bind(self.b2, self.kb), M.RelayBound(True))
        sent = self.a2.send(M.Data(b"hello"), key_id=self.ka, key=self.key)
        frame, msg, addr = self.b2.got[-1]
        self.assertEqual((msg, addr), (M.Data(b"hello"), LOBBY))
        # Forwarded as it is: the MAC is the sender's, checked by the receiver.
        self.assertEqual(frame.signed + frame.mac, sent)

    def test_relay_refuses_strangers_and_replays(self):
        self.bind(self.a2, self.ka)
        self.bind(self.b2, self.kb)
        before = len(self.b2.got)
        # Wrong key, a client key, an unknown session, from another address.
        self.a2.send(M.Data(b"x"), key_id=self.ka, key=bytes(32))
        self.a2.send(M.Data(b"x"), key_id="alice", key=KEYS["alice"])
        self.a2.send(M.Data(b"x"), key_id=M.session_key_id(bytes(16), "a"), key=self.key)
        self.w.clock.advance(0.001)  # newer than alice's frames: not a replay
        Peer(self.w, "x", ("192.0.2.66", 9)).send(M.Data(b"x"), key_id=self.ka, key=self.key)
        self.assertEqual(len(self.b2.got), before)
        self.assertEqual(self.w.dropped("relay-unbound"), 1)
        self.w.clock.advance(0.001)
        data = self.a2.send(M.Data(b"once"), key_id=self.ka, key=self.key)
        self.w.net.send(data, self.a2.addr, LOBBY)
        self.assertEqual(len(self.b2.got), before + 1)
        self.assertEqual(self.w.dropped("replay"), 1)

    def test_peer_cannot_bind_the_other_role(self):
        """
        Bob holds the session key too, but binding Alice's role (to his own
        address, or to a victim's) does nothing: a role binds only from the
        fresh mapping the lobby observed for it (issue #9, item 12).
        """
        victim = Peer(self.w, "victim", ("192.0.2.99", 53))
        for peer in (self.b2, victim):
            self.w.clock.advance(0.001)  # a new frame each time, not a replay
            self.assertIsNone(self.bind(peer, self.ka))
        self.assertEqual(self.w.dropped("relay-bind-elsewhere"), 2)
        self.w.clock.advance(0.001)
        self.bind(self.b2, self.kb)
        self.assertEqual(self.bind(self.a2, self.ka), M.RelayBound(True))
        self.a2.send(M.Data(b"for bob"), key_id=self.ka, key=self.key)
        self.assertEqual(self.b2.last(M.Data), M.Data(b"for bob"))
        self.assertEqual(victim.got, [])

    def test_own_role_not_bound_to_a_spoofed_address(self):
        """Nor can a peer have its own role relayed to another address."""
        self.bind(self.a2, self.ka)
        victim = Peer(self.w, "victim", ("192.0.2.99", 53))
        self.assertIsNone(self.bind(victim, self.kb))  # sent by bob, spoofing the victim
        self.a2.send(M.Data(bytes(500)), key_id=self.ka, key=self.key)
        self.assertEqual(victim.got, [])
        self.assertNotIn("b", self.w.lobby.sessions[self.sid].binds)

    def test_rate_limit(self):
        self.bind(self.a2, self.ka)
        self.bind(self.b2, self.kb)
        before = len(self.b2.got)
        for _ in range(40):
            self.a2.send(M.Data(bytes(500)), key_id=self.ka, key=self.key)
        passed = len(self.b2.got) - before
        self.assertTrue(10 <= passed <= 20, passed)
        self.assertGreater(self.w.dropped("relay-rate-limited"), 0)
        self.w.clock.advance(1)
        self.a2.send(M.Data(bytes(500)), key_id=self.ka, key=self.key)
        self.assertEqual(len(self.b2.got) - before, passed + 1)
