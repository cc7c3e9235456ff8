"""
Lobby nodes sharing state (L{p2pnat.cluster.lobby}, L{p2pnat.lobby.server})
on a L{Clock} with in-memory UDP: two L{Lobby} nodes on one fake network,
their cluster an in-memory bus that stands for Redis (presence, client
lists, one channel per node; messages go through JSON as over Redis).

- a client on node 1 asks for one on node 2: node 2 invites from the
  socket the invitee's presence uses, its Answer is acknowledged there,
  and node 1 introduces; one session key, never in a message in clear;
- refusals: unknown everywhere, known but offline, the invitee's node
  gone, the invitee gone from its node, the cluster down (same-node
  introductions still work), each at once;
- retransmissions on both sides, and expiry;
- the relayed session across nodes: each node relays its own client's leg,
  datagrams pass between the nodes' relay sockets, both ways, and only
  from the addresses the nodes observed;
- the pure rules: when presence is written, the session key's seal, and
  the signed messages (forged ones do nothing).
"""

import io
import json
import os
import sys

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from p2pnat.cluster.lobby import (
    REFUSAL_CLUSTER_DOWN,
    ILobbyCluster,
    KeySeal,
    PresenceWrites,
    RedisLobbyCluster,
    lobby_secret,
    node_channel,
)
from p2pnat.cluster.state import ClusterUnavailable, Signer, cluster_keys
from p2pnat.daemon.metrics import Metrics
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import FakeNetwork
from tests.unit import test_lobby_server
from tests.unit.test_taps import TapTestCase, UDPMemoryReactor

NODE1, NODE2 = ("198.18.1.1", 3478), ("198.18.2.1", 3478)
#: Each node's registry: alice and dave on node 1, bob and carol on node 2.
REGISTRY = {"n1": ("alice", "dave"), "n2": ("bob", "carol")}
KEYS = {**test_lobby_server.KEYS, "dave": bytes([4]) * 32}
SECRET = b"s" * 32


class Peer(test_lobby_server.Peer):
    """A client's socket (L{test_lobby_server.Peer}), for any client of L{KEYS}."""

    def datagramReceived(self, data, addr):
        frame = wire.parse(data)
        key = self.world.session_keys.get(frame.key_id) or KEYS.get(frame.key_id)
        self.got.append((frame, frame.open(key), addr))

    def send(self, message, key_id=None, key=None, to=NODE1, flags=0):
        return super().send(message, key_id, key or KEYS[key_id or self.name], to, flags)


class Bus:
    """What Redis holds and carries for lobby nodes, in memory; C{up} False: Redis is away."""

    def __init__(self):
        self.up = True
        self.presence = {}
        self.clients = {}  # node -> client IDs
        self.nodes = {}  # node -> Lobby
        self.messages = []  # every message, as JSON

    def deliver(self, node, text):
        self.messages.append(text)
        lobby = self.nodes.get(node)
        if lobby is not None:
            lobby.cluster_message(json.loads(text))
        return 1 if lobby is not None else 0


class BusCluster:
    """L{ILobbyCluster} of one node on a L{Bus}."""

    def __init__(self, bus, node, clock):
        self.bus = bus
        self.node = node
        self.keys = KeySeal(cluster_keys(SECRET)[1])
        self.clock = clock

    def available(self):
        return self.bus.up

    def present(self, client_id, addr, now):
        if self.bus.up:
            self.bus.presence[client_id] = self.node

    def gone(self, client_id):
        if self.bus.up and self.bus.presence.get(client_id) == self.node:
            del self.bus.presence[client_id]

    def locate(self, client_id):
        if not self.bus.up:
            return fail(ClusterUnavailable("redis 127.0.0.1:6379 not connected"))
        if client_id in self.bus.presence:
            return succeed(("online", self.bus.presence[client_id]))
        known = any(client_id in ids for ids in self.bus.clients.values())
        return succeed(("offline" if known else "unknown", None))

    def send(self, node, fields):
        if not self.bus.up:
            return fail(ClusterUnavailable("redis 127.0.0.1:6379 not connected"))
        return succeed(self.bus.deliver(node, json.dumps({**fields, "from": self.node})))

    def seal_key(self, session_key, session_id, a, b):
        return self.keys.seal(session_key, session_id, a, b, bytes(12))

    def open_key(self, text, session_id, a, b):
        return self.keys.open(text, session_id, a, b)


class Cluster:
    """Two lobby nodes on one network and one bus."""

    def __init__(self, **options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = FakeNetwork()
        self.bus = Bus()
        self.stampers = {}
        self.session_keys = {}
        self.lobbies, self.metrics = {}, {}
        for name, addr in (("n1", NODE1), ("n2", NODE2)):
            metrics = Metrics("lobby")
            keys = {c: KEYS[c] for c in REGISTRY[name]}
            lobby = Lobby(keys.get, self.clock, metrics, keepalive=20,
                          cluster=BusCluster(self.bus, name, self.clock), **options)
            proto = self.net.attach(
                ControlProtocol(lobby, self.clock, metrics, wire.ReplayGuard(self.clock),
                                stamper=wire.Stamper(self.clock)), *addr)
            lobby.relay_socket, lobby.relay_address = proto, addr
            self.bus.nodes[name] = lobby
            self.bus.clients[name] = set(keys)
            self.lobbies[name], self.metrics[name] = lobby, metrics

    def login(self, name, addr, node):
        p = Peer(self, name, addr)
        p.send(M.Login(addr, M.NatInfo("endpoint-independent")), to=node)
        return p

    def dropped(self, node, reason):
        return self.metrics[node].value("p2pnat_udp_dropped_total", reason=reason)


class _TwoNodes:
    """Alice logged into node 1, Bob into node 2, and their fresh ports."""

    options = {}

    def setUp(self):
        self.c = Cluster(**self.options)
        self.a = self.c.login("alice", ("203.0.113.1", 5000), NODE1)
        self.b = self.c.login("bob", ("198.51.100.2", 6000), NODE2)
        self.a2 = Peer(self.c, "alice", ("203.0.113.1", 5001))
        self.b2 = Peer(self.c, "bob", ("198.51.100.2", 6001))

    def request(self, peer="bob", rid=7, peer_from=None, to=NODE1):
        return (peer_from or self.a2).send(
            M.ConnectRequest(rid, peer, ("10.0.0.1", 40001),
                             M.NatInfo("address-and-port-dependent", "unknown", "sequential",
                                       1, 3.5)), to=to)

    def answer(self, accepted=True, rid=7):
        self.b2.send(M.Answer(rid, accepted, ("10.9.0.2", 50001),
                              M.NatInfo("endpoint-independent")), to=NODE2)

    def received(self, peer, cls):
        """What C{peer} got of C{cls}, as (message, source) pairs."""
        return [(m, a) for f, m, a in peer.got if isinstance(m, cls)]


class IntroductionTests(_TwoNodes, SynchronousTestCase):
    def test_exchange_across_nodes(self):
        self.request()
        [(invite, source)] = self.received(self.b, M.Invite)
        # From node 2, to the address Bob's presence uses: his NAT lets in
        # only what comes from where he sent.
        self.assertEqual(source, NODE2)
        self.assertEqual((invite.request_id, invite.peer, invite.observed, invite.local),
                         (7, "alice", ("203.0.113.1", 5001), ("10.0.0.1", 40001)))
        self.assertEqual((invite.nat.allocation, invite.nat.step, invite.nat.rate),
                         ("sequential", 1, 3.5))
        self.answer()
        self.assertEqual(self.received(self.b2, M.AnswerAck),
                         [(M.AnswerAck(7, ("198.51.100.2", 6001)), NODE2)])
        [(intro, source)] = self.received(self.a2, M.Introduce)
        self.assertEqual(source, NODE1)
        self.assertTrue(intro.accepted)
        self.assertEqual((intro.peer, intro.observed, intro.local),
                         ("bob", ("198.51.100.2", 6001), ("10.9.0.2", 50001)))
        ka = M.open_session_key(KEYS["alice"], intro.session_id, intro.sealed_key)
        kb = M.open_session_key(KEYS["bob"], invite.session_id, invite.sealed_key)
        self.assertEqual(ka, kb)
        self.assertEqual(intro.session_id, invite.session_id)
        # The key crossed the bus sealed only.
        self.assertFalse(any(ka.hex() in text for text in self.c.bus.messages))
        self.assertEqual([n.sessions[intro.session_id].key for n in self.c.lobbies.values()],
                         [ka, ka])

    def test_same_node_untouched_by_the_cluster(self):
        dave = self.c.login("dave", ("192.0.2.4", 7000), NODE1)
        self.request(peer="dave")
        self.assertEqual(len(self.received(dave, M.Invite)), 1)
        self.assertEqual(self.c.bus.messages, [])

    def test_refused_by_the_peer(self):
        self.request()
        self.answer(accepted=False)
        [(intro, _)] = self.received(self.a2, M.Introduce)
        self.assertFalse(intro.accepted)
        self.assertEqual(intro.sealed_key, bytes(32))
        self.assertEqual([n.sessions for n in self.c.lobbies.values()], [{}, {}])

    def test_retransmissions(self):
        self.request()
        self.request()  # A's request again: B invited again, the same session
        invites = self.received(self.b, M.Invite)
        self.assertEqual(len(invites), 2)
        self.assertEqual(invites[0][0].session_id, invites[1][0].session_id)
        self.answer()
        self.answer()  # B's answer again: acknowledged and passed on again
        self.assertEqual(len(self.received(self.b2, M.AnswerAck)), 2)
        self.assertEqual(len(self.received(self.a2, M.Introduce)), 2)
        self.request()  # A missed the Introduce: node 1 sends it again by itself
        self.assertEqual(len(self.received(self.a2, M.Introduce)), 3)
        self.assertEqual([len(n.sessions) for n in self.c.lobbies.values()], [1, 1])

    def test_answer_missed_by_the_asking_node(self):
        """Node 2 passes B's answer on again when A's request comes again."""
        self.request()
        self.c.bus.nodes["n1"], n1 = None, self.c.bus.nodes["n1"]
        self.answer()  # the answer is lost on its way to node 1
        self.c.bus.nodes["n1"] = n1
        self.assertEqual(self.received(self.a2, M.Introduce), [])
        self.request()
        self.assertEqual(len(self.received(self.a2, M.Introduce)), 1)

    def test_expiry(self):
        self.request()
        self.c.clock.advance(61)
        for lobby in self.c.lobbies.values():
            lobby.expire()
        self.assertEqual([(n.pending, n.remote, n.by_request) for n in self.c.lobbies.values()],
                         [({}, {}, {}), ({}, {}, {})])


class RefusalTests(_TwoNodes, SynchronousTestCase):
    def refusal(self, rid):
        return [m for m, a in self.received(self.a2, M.Refusal) if m.request_id == rid]

    def test_unknown_everywhere(self):
        self.request(peer="nobody", rid=1)
        self.assertEqual(self.refusal(1), [M.Refusal(1, 1)])

    def test_known_on_another_node_but_offline(self):
        self.request(peer="carol", rid=2)
        self.assertEqual(self.refusal(2), [M.Refusal(2, 2)])

    def test_known_here_but_logged_in_nowhere(self):
        self.request(peer="dave", rid=3)
        self.assertEqual(self.refusal(3), [M.Refusal(3, 2)])

    def test_self(self):
        self.request(peer="alice", rid=4)
        self.assertEqual(self.refusal(4), [M.Refusal(4, 2)])

    def test_not_logged_in(self):
        Peer(self.c, "dave", ("192.0.2.7", 1)).send(M.ConnectRequest(5, "bob"), to=NODE1)
        self.assertEqual(self.c.bus.messages, [])

    def test_invitee_gone_from_its_node(self):
        """Its presence in Redis outlives it a little: node 2 says so, at once."""
        self.b.send(M.Logout(), to=NODE2)
        self.c.bus.presence["bob"] = "n2"  # as if the deletion had been lost
        self.request(rid=6)
        self.assertEqual(self.refusal(6), [M.Refusal(6, 2)])
        self.assertEqual(self.c.lobbies["n1"].pending, {})

    def test_invitee_node_gone(self):
        """Nobody listens on the node's channel: refused at once, not at A's deadline."""
        del self.c.bus.nodes["n2"]
        self.request(rid=8)
        self.assertEqual(self.refusal(8), [M.Refusal(8, 2)])

    def test_cluster_down(self):
        """
        Redis away: a request for a client of another node gets a clear
        refusal; one for a client of this node is introduced as ever.
        """
        self.c.bus.up = False
        self.request(rid=9)
        self.assertEqual(self.refusal(9), [M.Refusal(9, REFUSAL_CLUSTER_DOWN)])
        dave = self.c.login("dave", ("192.0.2.4", 7000), NODE1)
        self.request(peer="dave", rid=10)
        self.assertEqual(len(self.received(dave, M.Invite)), 1)
        # Back: the next request goes through, nothing done by hand.
        self.c.bus.up = True
        self.b.send(M.Keepalive(), to=NODE2)
        self.request(rid=11)
        self.assertEqual(len(self.received(self.b, M.Invite)), 1)

    def test_cluster_lost_after_the_invite(self):
        self.request(rid=12)
        self.c.bus.up = False
        self.request(rid=12)  # the retransmission cannot be forwarded
        self.assertEqual(self.refusal(12), [M.Refusal(12, REFUSAL_CLUSTER_DOWN)])

    def test_malformed_message_raises_for_the_cluster_to_log(self):
        with self.assertRaises((KeyError, ValueError, TypeError)):
            self.c.lobbies["n2"].cluster_message({"t": "invite", "from": "n1", "a": "alice",
                                                  "b": "bob", "rid": 1, "sid": "zz"})


class RelayTests(_TwoNodes, SynchronousTestCase):
    options = {"relay_rate": 10_000}

    def setUp(self):
        _TwoNodes.setUp(self)
        self.request()
        self.answer()
        [(intro, _)] = self.received(self.a2, M.Introduce)
        self.sid = intro.session_id
        self.key = M.open_session_key(KEYS["alice"], self.sid, intro.sealed_key)
        self.ka, self.kb = M.session_key_id(self.sid, "a"), M.session_key_id(self.sid, "b")
        self.c.session_keys = {self.ka: self.key, self.kb: self.key}

    def bind(self, peer, kid, to):
        peer.send(M.RelayBind(), key_id=kid, key=self.key, to=to)
        return peer.last(M.RelayBound)

    def test_relay_across_nodes(self):
        """Each client binds at its own node; datagrams cross between the nodes."""
        self.assertEqual(self.bind(self.a2, self.ka, NODE1), M.RelayBound(False))
        self.assertEqual(self.bind(self.b2, self.kb, NODE2), M.RelayBound(True))
        self.c.clock.advance(0.25)
        self.assertEqual(self.bind(self.a2, self.ka, NODE1), M.RelayBound(True))
        sent = self.a2.send(M.Data(b"hello"), key_id=self.ka, key=self.key, to=NODE1)
        frame, msg, addr = self.b2.got[-1]
        self.assertEqual((msg, addr), (M.Data(b"hello"), NODE2))
        self.assertEqual(frame.signed + frame.mac, sent)  # as it was sent
        self.b2.send(M.Data(b"back"), key_id=self.kb, key=self.key, to=NODE2)
        self.assertEqual(self.received(self.a2, M.Data), [(M.Data(b"back"), NODE1)])
        # Neither node answered the other's forwarded binds.
        self.assertEqual([self.c.dropped(n, "unknown-key") for n in ("n1", "n2")], [0, 0])

    def test_forwarded_bind_lost(self):
        """A datagram from the other node binds its role as the lost bind would have."""
        self.c.net.drop = lambda data, src, dst: src == NODE1 and dst == NODE2
        self.bind(self.a2, self.ka, NODE1)
        self.c.net.drop = lambda data, src, dst: False
        self.assertEqual(self.bind(self.b2, self.kb, NODE2), M.RelayBound(False))
        self.c.clock.advance(0.25)
        self.assertEqual(self.bind(self.a2, self.ka, NODE1), M.RelayBound(True))
        self.c.net.drop = lambda data, src, dst: src == NODE1 and dst == NODE2 and (
            wire.parse(data).type == M.RelayBind.TYPE)
        self.a2.send(M.Data(b"hello"), key_id=self.ka, key=self.key, to=NODE1)
        self.assertEqual(self.b2.last(M.Data), M.Data(b"hello"))

    def test_only_from_the_observed_addresses(self):
        """Bob binding Alice's role at his node, or a stranger posing as node 1, does nothing."""
        self.bind(self.a2, self.ka, NODE1)
        self.bind(self.b2, self.kb, NODE2)
        stranger = Peer(self.c, "x", ("192.0.2.66", 9))
        self.c.clock.advance(0.001)
        before = len(self.received(self.b2, M.RelayBound))
        self.bind(self.b2, self.ka, NODE2)
        self.assertEqual(len(self.received(self.b2, M.RelayBound)), before)
        self.c.clock.advance(0.001)
        stranger.send(M.Data(b"x"), key_id=self.ka, key=self.key, to=NODE2)
        self.assertEqual(self.received(self.b2, M.Data), [])
        self.assertEqual(self.c.dropped("n2", "relay-bind-elsewhere"), 1)
        self.assertEqual(self.c.dropped("n2", "relay-unbound"), 1)

    def test_rate_limit_per_node(self):
        self.bind(self.a2, self.ka, NODE1)
        self.bind(self.b2, self.kb, NODE2)
        for _ in range(40):
            self.a2.send(M.Data(bytes(500)), key_id=self.ka, key=self.key, to=NODE1)
        passed = len(self.received(self.b2, M.Data))
        self.assertTrue(10 <= passed <= 20, passed)
        self.assertGreater(self.c.dropped("n1", "relay-rate-limited"), 0)


class PresenceWritesTests(SynchronousTestCase):
    def test_rules(self):
        w = PresenceWrites(keepalive=20)
        addr = ("203.0.113.1", 5000)
        self.assertTrue(w.due("alice", addr, 100))  # login
        w.wrote("alice", addr, 100)
        self.assertFalse(w.due("alice", addr, 120))  # the next keepalive
        self.assertTrue(w.due("alice", addr, 140))  # every second one
        self.assertTrue(w.due("alice", ("203.0.113.1", 5002), 121))  # it moved
        w.forget_all()  # Redis came back
        self.assertTrue(w.due("alice", addr, 121))
        self.assertEqual(w.expiry(), 80)  # outlives three missed keepalives


class KeySealTests(SynchronousTestCase):
    def test_sealed_for_one_session(self):
        seal = KeySeal(cluster_keys(SECRET)[1])
        key, sid = bytes(range(32)), bytes(16)
        text = seal.seal(key, sid, "alice", "bob", bytes(12))
        self.assertNotIn(key.hex(), text)
        self.assertEqual(seal.open(text, sid, "alice", "bob"), key)
        for args in ((bytes([1]) * 16, "alice", "bob"), (sid, "alice", "carol"),
                     (sid, "bob", "alice")):
            self.assertRaises(ValueError, seal.open, text, *args)
        other = KeySeal(cluster_keys(b"t" * 32)[1])
        self.assertRaises(ValueError, other.open, text, sid, "alice", "bob")
        self.assertRaises(ValueError, seal.open, "zz", sid, "alice", "bob")


class RedisMessageTests(SynchronousTestCase):
    """What L{RedisLobbyCluster} does with what arrives on its channel."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.got = []

        class Node:
            def cluster_message(node, fields):
                self.got.append(fields)
                if fields.get("t") == "bad":
                    raise KeyError("rid")

            def client_ids(node):
                return ["alice"]

        self.cluster = RedisLobbyCluster(self.clock, "redis://127.0.0.1:1/0", "n2", SECRET, 20,
                                         Node())
        self.signer = Signer(cluster_keys(SECRET)[0])

    def test_interface(self):
        verifyObject(ILobbyCluster, self.cluster)

    def test_genuine_forged_old_and_own(self):
        now = self.clock.seconds()
        channel = node_channel("n2")
        self.cluster._message(channel, self.signer.seal({"t": "invite", "from": "n1"}, now))
        forged = Signer(cluster_keys(b"x" * 32)[0]).seal({"t": "invite", "from": "n1"}, now)
        self.cluster._message(channel, forged)
        self.cluster._message(channel, self.signer.seal({"t": "invite", "from": "n1"},
                                                        now - 60))
        self.cluster._message(channel, self.signer.seal({"t": "invite", "from": "n2"}, now))
        self.cluster._message(channel, "garbage")
        self.assertEqual([f["t"] for f in self.got], ["invite"])

    def test_malformed_is_logged_not_raised(self):
        now = self.clock.seconds()
        self.cluster._message(node_channel("n2"), self.signer.seal({"t": "bad", "from": "n1"},
                                                                   now))
        self.assertEqual(len(self.got), 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_unavailable_when_not_connected(self):
        self.assertFalse(self.cluster.available())
        self.failureResultOf(self.cluster.locate("bob"), ClusterUnavailable)
        self.failureResultOf(self.cluster.send("n1", {"t": "invite"}), ClusterUnavailable)
        self.cluster.present("alice", ("203.0.113.1", 1), 0)  # dropped, never raises
        self.cluster.gone("alice")
        self.successResultOf(self.cluster.sync_clients())


class SecretTests(SynchronousTestCase):
    def test_secret_file(self):
        path = self.mktemp()
        self.assertRaisesRegex(ValueError, "cannot read the cluster secret", lobby_secret, path)
        with open(path, "wb") as f:
            f.write(b"short\n")
        self.assertRaisesRegex(ValueError, "shorter than 32 bytes", lobby_secret, path)
        with open(path, "wb") as f:
            f.write(b"a" * 64 + b"\n")
        self.assertEqual(lobby_secret(path), b"a" * 64)


class TapTests(TapTestCase):
    """``[cluster]`` in ``twistd lobby``: none by default; a clear line for what is missing."""

    from p2pnat.lobby import tap

    daemon = "lobby"

    def make(self, *more, secret=True):
        state = os.path.join(self.tmpdir(), "state")
        os.makedirs(state)
        if secret:
            with open(os.path.join(state, "cluster.secret"), "w") as f:
                f.write("ab" * 32)
        options = self.options("--config", self.etc(), "--lobby-state-dir", state,
                               "--udp-listen", "127.0.0.1:13478", *more)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        try:
            svc = self.tap.makeService(options, UDPMemoryReactor())
        except SystemExit as e:
            self.assertEqual(e.code, 1)
            return err.getvalue()
        self.addCleanup(svc.registry.close)
        return svc

    def test_single_lobby_by_default(self):
        svc = self.make()
        self.assertIsNone(svc.cluster)
        self.assertIsNone(svc.lobby.cluster)

    def test_cluster(self):
        svc = self.make("--cluster-redis", "redis://127.0.0.1:1/0", "--cluster-node", "n1")
        self.assertIsInstance(svc.cluster, RedisLobbyCluster)
        self.assertIs(svc.lobby.cluster, svc.cluster)
        self.assertEqual(svc.cluster.node, "n1")

    def test_errors(self):
        line = self.make("--cluster-redis", "redis://127.0.0.1:1/0", secret=False)
        self.assertTrue(line.startswith("twistd lobby: cluster.secret_file: cannot read the"
                                        " cluster secret"), line)
        line = self.make("--cluster-redis", "redis://127.0.0.1:1/0", "--udp-listen",
                         "0.0.0.0:13478")
        self.assertIn("cluster.addresses: needed when the first udp.listen address is a"
                      " wildcard", line)
        self.assertIn("cluster.redis", self.config_error("--config", self.etc(),
                                                         "--cluster-redis", "http://x"))
