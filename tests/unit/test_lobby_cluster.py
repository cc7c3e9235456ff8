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
- the relayed session across nodes runs on the asking client's node
  alone: the invitee binds there with the proof of its bind secret (which
  the asker, holding the session key, cannot make), datagrams flow both
  ways through that node, and the invitee's node relays nothing;
- the wire format of the relay's address and the bind proof;
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
    EPOCH,
    REFUSAL_CLUSTER_DOWN,
    ILobbyCluster,
    KeySeal,
    PresenceWrites,
    RedisLobbyCluster,
    clients_key,
    lobby_secret,
    node_channel,
    presence_key,
)
from p2pnat.cluster.state import ClusterUnavailable, Signer, cluster_keys
from p2pnat.daemon.metrics import Metrics
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import ControlProtocol
from p2pnat.peer.client import LobbyClient
from p2pnat.peer.path import Path
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import FakeNetwork, SimNat, SimNet
from tests.unit import test_lobby_server, test_peer_client
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

    def seal_key(self, secret, session_id, a, b, purpose="session"):
        return self.keys.seal(secret, session_id, a, b, bytes(12), purpose)

    def open_key(self, text, session_id, a, b, purpose="session"):
        return self.keys.open(text, session_id, a, b, purpose)


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
            self.net.attach(
                ControlProtocol(lobby, self.clock, metrics, wire.ReplayGuard(self.clock),
                                stamper=wire.Stamper(self.clock)), *addr)
            lobby.relay_address = addr
            self.bus.nodes[name] = lobby
            self.bus.clients[name] = set(keys)
            self.lobbies[name], self.metrics[name] = lobby, metrics

    def login(self, name, addr, node):
        p = Peer(self, name, addr)
        p.send(M.Login(addr, M.NatInfo("endpoint-independent")), to=node)
        return p

    def dropped(self, node, reason):
        return self.metrics[node].value("p2pnat_udp_dropped_total", reason=reason)

    def relayed(self, node):
        """Datagrams node C{node} relayed."""
        return self.metrics[node].value("p2pnat_udp_sent_total", kind="relayed")


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
        # The session is node 1's alone: it relays it if need be.
        self.assertEqual(self.c.lobbies["n1"].sessions[intro.session_id].key, ka)
        self.assertEqual(self.c.lobbies["n2"].sessions, {})

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
        # The relay and Bob's bind secret, made once by node 1.
        self.assertEqual({(m.relay, m.sealed_secret) for m, _ in invites},
                         {(NODE1, invites[0][0].sealed_secret)})
        self.answer()
        self.answer()  # B's answer again: acknowledged and passed on again
        self.assertEqual(len(self.received(self.b2, M.AnswerAck)), 2)
        self.assertEqual(len(self.received(self.a2, M.Introduce)), 2)
        self.request()  # A missed the Introduce: node 1 sends it again by itself
        self.assertEqual(len(self.received(self.a2, M.Introduce)), 3)
        self.assertEqual([len(n.sessions) for n in self.c.lobbies.values()], [1, 0])

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
    """
    Alice (node 1) asked for Bob (node 2): node 1 relays.  Bob binds from
    a fresh mapping node 1 never saw (through a symmetric NAT, his socket's
    mapping towards node 1 is another than towards node 2).
    """

    options = {"relay_rate": 10_000}

    def setUp(self):
        _TwoNodes.setUp(self)
        self.request()
        self.answer()
        [(intro, _)] = self.received(self.a2, M.Introduce)
        [(self.invite, _)] = self.received(self.b, M.Invite)
        self.intro = intro
        self.sid = intro.session_id
        self.key = M.open_session_key(KEYS["alice"], self.sid, intro.sealed_key)
        self.secret = M.open_bind_secret(KEYS["bob"], self.sid, self.invite.sealed_secret)
        self.ka, self.kb = M.session_key_id(self.sid, "a"), M.session_key_id(self.sid, "b")
        self.c.session_keys = {self.ka: self.key, self.kb: self.key}
        # Bob's fresh socket as node 1 sees it.
        self.b3 = Peer(self.c, "bob", ("198.51.100.2", 6107))

    def bind(self, peer, kid, to=NODE1, secret=None, proof=None):
        """
        C{peer} binds C{kid} at C{to}, with a proof under C{secret} (or
        C{proof}): the L{M.RelayBound} it got back, or None.
        """
        stamp = peer.stamper()
        if secret is not None:
            proof = M.bind_proof(secret, kid, stamp)
        data = wire.seal(M.RelayBind(proof=proof or b""), kid, self.key, stamp)
        before = len(peer.got)
        self.c.net.send(data, peer.addr, to)
        new = [m for f, m, a in peer.got[before:] if isinstance(m, M.RelayBound)]
        return new[-1] if new else None

    def test_invite_names_the_relay(self):
        """Bob's Invite names node 1's relay address and his secret; Alice's Introduce neither."""
        self.assertEqual(self.invite.relay, NODE1)
        self.assertIsNone(self.intro.relay)
        self.assertEqual(len(self.secret), 16)
        # The secret crossed the bus sealed only; node 2 holds no session.
        self.assertFalse(any(self.secret.hex() in text for text in self.c.bus.messages))
        self.assertIn(self.sid, self.c.lobbies["n1"].sessions)
        self.assertEqual(self.c.lobbies["n2"].sessions, {})
        self.assertEqual(self.c.lobbies["n1"].sessions[self.sid].secrets, {"b": self.secret})

    def test_relay_on_one_node(self):
        """Both bind at node 1; datagrams go both ways through it, none through node 2."""
        self.assertEqual(self.bind(self.a2, self.ka), M.RelayBound(False))
        self.assertEqual(self.bind(self.b3, self.kb, secret=self.secret), M.RelayBound(True))
        self.c.clock.advance(0.25)
        self.assertEqual(self.bind(self.a2, self.ka), M.RelayBound(True))
        sent = self.a2.send(M.Data(b"hello"), key_id=self.ka, key=self.key, to=NODE1)
        frame, msg, addr = self.b3.got[-1]
        self.assertEqual((msg, addr), (M.Data(b"hello"), NODE1))
        self.assertEqual(frame.signed + frame.mac, sent)  # as it was sent
        self.b3.send(M.Data(b"back"), key_id=self.kb, key=self.key, to=NODE1)
        self.assertEqual(self.received(self.a2, M.Data), [(M.Data(b"back"), NODE1)])
        self.assertEqual((self.c.relayed("n1"), self.c.relayed("n2")), (2, 0))
        # Nothing went between the nodes' sockets.
        self.assertEqual(self.c.dropped("n2", "unknown-key"), 0)

    def test_asker_cannot_bind_the_invitees_role(self):
        """
        Alice holds the session key, not Bob's secret: her binds of Bob's
        role are dropped (no proof, a proof under another secret, Bob's
        proof replayed under a new timestamp), counted and logged.
        """
        self.bind(self.a2, self.ka)
        self.assertIsNone(self.bind(self.a2, self.kb))
        self.c.clock.advance(0.001)
        self.assertIsNone(self.bind(self.a2, self.kb, secret=self.key[:16]))
        self.c.clock.advance(0.001)
        self.bind(self.b3, self.kb, secret=self.secret)
        [bobs] = [wire.parse(d) for d, src, dst in self.sent_binds(self.b3)]
        stolen = M.RelayBind.decode_body(bobs.body).proof
        self.c.clock.advance(0.001)
        self.assertIsNone(self.bind(self.a2, self.kb, proof=stolen))
        self.assertEqual(self.c.dropped("n1", "relay-bind-unproven"), 3)
        # Bob's role is still bound to Bob: Alice's datagram goes to him.
        self.a2.send(M.Data(b"x"), key_id=self.ka, key=self.key, to=NODE1)
        self.assertEqual(self.b3.last(M.Data), M.Data(b"x"))
        self.assertEqual(self.received(self.a2, M.Data), [])

    def sent_binds(self, peer):
        return [(d, src, dst) for d, src, dst in self.c.net.log
                if src == peer.addr and wire.parse(d).type == M.RelayBind.TYPE]

    def test_invitees_node_relays_nothing(self):
        """A bind at node 2, as clients did before: node 2 has no session to bind."""
        self.assertIsNone(self.bind(self.b2, self.kb, to=NODE2, secret=self.secret))
        self.assertEqual(self.c.dropped("n2", "unknown-key"), 1)

    def test_rate_limit(self):
        self.bind(self.a2, self.ka)
        self.bind(self.b3, self.kb, secret=self.secret)
        for _ in range(40):
            self.a2.send(M.Data(bytes(500)), key_id=self.ka, key=self.key, to=NODE1)
        passed = len(self.received(self.b3, M.Data))
        self.assertTrue(10 <= passed <= 20, passed)
        self.assertGreater(self.c.dropped("n1", "relay-rate-limited"), 0)


class ClientsTests(SynchronousTestCase):
    """
    L{p2pnat.peer.client.LobbyClient}s on a simulated internet, each behind
    a symmetric NAT with random ports (a mapping per destination), Alice
    logged into node 1 and Bob into node 2: no punch can work, and the
    session is relayed by node 1 alone.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = SimNet(self.clock, 0.005)
        self.bus = Bus()
        self.metrics = {}
        for name, addr in (("n1", NODE1), ("n2", NODE2)):
            self.metrics[name] = metrics = Metrics("lobby")
            keys = {c: KEYS[c] for c in REGISTRY[name]}
            lobby = Lobby(keys.get, self.clock, metrics, keepalive=20,
                          cluster=BusCluster(self.bus, name, self.clock))
            lobby.relay_address = addr
            self.net.listen(addr[0], ControlProtocol(
                lobby, self.clock, metrics, wire.ReplayGuard(self.clock), name=name,
                stamper=wire.Stamper(self.clock)), addr[1])
            self.bus.nodes[name] = lobby
            self.bus.clients[name] = set(keys)
        self.clients, self.incoming = {}, {}
        for i, (name, node) in enumerate((("alice", NODE1), ("bob", NODE2))):
            host, public = test_peer_client.HOSTS[name]
            self.net.nats[host] = SimNat(public, base=20000 + 1000 * i, seed=i,
                                         **test_peer_client.SIM[test_peer_client.RANDOM])
            self.incoming[name] = []
            c = LobbyClient(name, KEYS[name], node, self.net, interface=host,
                            nat=test_peer_client.RANDOM, on_path=self.incoming[name].append,
                            upgrade_interval=600)
            self.clients[name] = c
            d = c.start()
            self.advance(0.05)
            self.successResultOf(d)
        self.addCleanup(self.stop)

    def stop(self):
        for c in self.clients.values():
            c.stop()
        self.advance(0.05)

    def advance(self, seconds, step=0.005):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def relayed(self, node):
        return self.metrics[node].value("p2pnat_udp_sent_total", kind="relayed")

    def test_relayed_by_one_node(self):
        results = []
        self.clients["alice"].connect("bob").addBoth(results.append)
        self.advance(15)
        [path] = results
        self.assertIsInstance(path, Path, path)
        [incoming] = self.incoming["bob"]
        self.assertEqual((path.mode, incoming.mode), ("relayed", "relayed"))
        # Both routes lead to node 1.
        self.assertEqual((path.relayed[1], incoming.relayed[1]), (NODE1, NODE1))
        got_a, got_b = [], []
        path.on_datagram, incoming.on_datagram = got_a.append, got_b.append
        before, relayed = len(self.net.sent), self.relayed("n1")
        path.send(b"ping")
        self.advance(0.05)
        incoming.send(b"pong")
        self.advance(0.05)
        self.assertEqual((got_a, got_b), ([b"pong"], [b"ping"]))
        data = [x for x in self.net.sent[before:] if test_peer_client.kind(x.data) == "Data"]
        # Each datagram: its sender to node 1, node 1 to its receiver; no hop
        # between the nodes, nothing through node 2.
        self.assertEqual(len(data), 4)
        self.assertTrue(all(NODE1 in (x.src, x.dst) for x in data), data)
        # (node 1 may relay a path keepalive meanwhile)
        self.assertGreaterEqual(self.relayed("n1") - relayed, 2)
        self.assertEqual(self.relayed("n2"), 0)
        # Bob bound with his proof from a mapping node 2 never saw.
        binds = [x for x in self.net.sent if test_peer_client.kind(x.data) == "RelayBind"
                 and x.src[0] == test_peer_client.HOSTS["bob"][1]]
        self.assertTrue(binds)
        self.assertEqual({x.dst for x in binds}, {NODE1})
        self.assertTrue(all(M.RelayBind.decode_body(wire.parse(x.data).body).proof
                            for x in binds))

    def test_relay_traffic_from_the_relay_only(self):
        """
        Bob takes RelayBound from node 1 only: one from his own node (which
        his fresh socket's NAT lets in: he answered from it) is ignored.
        """
        bob_ip = test_peer_client.HOSTS["bob"][1]
        self.net.lose = lambda src, dst, data: (
            src == NODE1 and dst[0] == bob_ip and test_peer_client.kind(data) == "RelayBound")
        self.clients["alice"].connect("bob").addBoth(lambda r: None)
        lobby2 = self.bus.nodes["n2"]
        self.advance(0.3)
        [p] = lobby2.remote.values()
        kid = M.session_key_id(p.session_id, "b")
        genuine = wire.seal(M.RelayBound(True), kid, p.session_key, wire.Stamper(self.clock)())
        self.net.send(NODE2, p.answer[1], genuine)  # to Bob's fresh socket
        self.advance(0.1)
        self.assertEqual(self.net.errors, [])
        self.assertEqual(self.incoming["bob"], [])
        self.net.lose = lambda src, dst, data: False  # node 1's next answer arrives
        self.advance(1)
        self.assertEqual(len(self.incoming["bob"]), 1)


class SingleNodeBindTests(_TwoNodes, SynchronousTestCase):
    """Alice and Dave, both on node 1: the role binds only from its observed mapping."""

    def setUp(self):
        _TwoNodes.setUp(self)
        self.dave = self.c.login("dave", ("192.0.2.4", 7000), NODE1)
        self.d2 = Peer(self.c, "dave", ("192.0.2.4", 7001))
        self.request(peer="dave")
        [(invite, _)] = self.received(self.dave, M.Invite)
        self.assertIsNone(invite.relay)
        self.d2.send(M.Answer(7, True, ("10.9.0.4", 50001), M.NatInfo()), to=NODE1)
        self.sid = invite.session_id
        self.key = M.open_session_key(KEYS["dave"], self.sid, invite.sealed_key)
        self.ka, self.kb = M.session_key_id(self.sid, "a"), M.session_key_id(self.sid, "b")
        self.c.session_keys = {self.ka: self.key, self.kb: self.key}

    def test_observed_mapping_only(self):
        self.assertEqual(self.c.lobbies["n1"].sessions[self.sid].secrets, {})
        self.a2.send(M.RelayBind(), key_id=self.ka, key=self.key, to=NODE1)
        # Alice binding Dave's role, even with a proof (there is no secret
        # to check it with): dropped, as ever.
        stamp = self.a2.stamper()
        self.c.net.send(wire.seal(M.RelayBind(proof=bytes(16)), self.kb, self.key, stamp),
                        self.a2.addr, NODE1)
        self.assertEqual(self.c.dropped("n1", "relay-bind-elsewhere"), 1)
        self.c.clock.advance(0.001)  # another stamper, on the same key ID
        self.d2.send(M.RelayBind(), key_id=self.kb, key=self.key, to=NODE1)
        self.assertEqual(self.d2.last(M.RelayBound), M.RelayBound(True))
        self.a2.send(M.Data(b"hi"), key_id=self.ka, key=self.key, to=NODE1)
        self.assertEqual(self.d2.last(M.Data), M.Data(b"hi"))
        # Each relayed datagram counted once.
        self.assertEqual(self.c.relayed("n1"), 1)
        self.assertEqual(self.c.bus.messages, [])


class WireTests(SynchronousTestCase):
    """The relay's address in introductions, and the bind proof."""

    ARGS = (1, "alice", ("1.1.1.1", 2), ("10.0.0.1", 3), M.NatInfo(), b"S" * 16, b"K" * 32)
    CANDS = (("198.51.100.7", 4000), ("2001:db8::7", 4001))

    def test_introductions_round_trip(self):
        for cls in (M.Invite, M.Introduce):
            for cands in ((), self.CANDS):
                for relay in (("198.18.1.1", 3478), ("2001:db8::1", 3478)):
                    m = cls(*self.ARGS, candidates=cands, relay=relay,
                            sealed_secret=bytes(range(16)))
                    self.assertEqual(cls.decode_body(m.encode_body()), m)
                plain = cls(*self.ARGS, candidates=cands)
                self.assertEqual(cls.decode_body(plain.encode_body()), plain)

    def test_without_relay_unchanged(self):
        """An introduction without a relay is the body of a single lobby, byte for byte."""
        with_relay = M.Invite(*self.ARGS, relay=("198.18.1.1", 3478)).encode_body()
        plain = M.Invite(*self.ARGS).encode_body()
        self.assertEqual(with_relay[:len(plain)], plain)
        # The count of no candidates, the relay's address, the secret.
        self.assertEqual(with_relay[len(plain):],
                         b"\0" + wire.pack_addr("198.18.1.1", 3478) + bytes(16))

    def test_introductions_malformed(self):
        plain = M.Introduce(*self.ARGS).encode_body()
        relayed = M.Introduce(*self.ARGS, relay=("198.18.1.1", 3478)).encode_body()
        for bad in (plain + b"\0",  # a stray zero: no relay block follows
                    relayed[:-1],  # the secret cut short
                    relayed + b"\0",  # anything after it
                    plain + b"\0" + wire.pack_addr("198.18.1.1", 3478)):  # no secret
            self.assertRaises(wire.WireError, M.Introduce.decode_body, bad)
        self.assertRaises(wire.WireError, M.Introduce(*self.ARGS, relay=("198.18.1.1", 1),
                                                      sealed_secret=b"short").encode_body)

    def test_relay_bind(self):
        self.assertEqual(M.RelayBind().encode_body(), bytes(8))  # as ever
        self.assertEqual(M.RelayBind.decode_body(bytes(8)), M.RelayBind())
        proven = M.RelayBind(padding=0, proof=bytes(range(1, 17)))
        self.assertEqual(proven.encode_body(), b"\x01" + bytes(range(1, 17)))
        self.assertEqual(M.RelayBind.decode_body(proven.encode_body()), proven)
        self.assertEqual(M.RelayBind.decode_body(M.RelayBind(4, b"p" * 16).encode_body()),
                         M.RelayBind(4, b"p" * 16))
        for bad in (b"\x01" + bytes(15),  # a proof cut short
                    b"\x02" + bytes(16),  # not the proof marker
                    b"\x01" + bytes(16) + b"\x01"):  # non-zero padding
            self.assertRaises(wire.WireError, M.RelayBind.decode_body, bad)
        self.assertRaises(wire.WireError, M.RelayBind(proof=b"short").encode_body)

    def test_bind_secret_and_proof(self):
        key, sid, secret = bytes(range(32)), bytes(16), b"s" * 16
        sealed = M.seal_bind_secret(key, sid, secret)
        self.assertNotEqual(sealed, secret)
        self.assertEqual(M.open_bind_secret(key, sid, sealed), secret)
        # Not the session key's pad: one sealed value does not give the other.
        self.assertNotEqual(sealed, M.seal_session_key(key, sid, secret + bytes(16))[:16])
        kid = M.session_key_id(sid, "b")
        proof = M.bind_proof(secret, kid, 1000)
        self.assertEqual(len(proof), 16)
        for other in (M.bind_proof(secret, kid, 1001), M.bind_proof(b"t" * 16, kid, 1000),
                      M.bind_proof(secret, M.session_key_id(sid, "a"), 1000)):
            self.assertNotEqual(other, proof)


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
    def test_sealed_for_one_purpose(self):
        """A sealed bind secret does not open as a session key, nor the other way."""
        seal = KeySeal(cluster_keys(SECRET)[1])
        sid = bytes(16)
        secret = seal.seal(b"b" * 16, sid, "alice", "bob", bytes(12), "bind")
        self.assertEqual(seal.open(secret, sid, "alice", "bob", "bind"), b"b" * 16)
        self.assertRaises(ValueError, seal.open, secret, sid, "alice", "bob")
        key = seal.seal(bytes(32), sid, "alice", "bob", bytes(12))
        self.assertRaises(ValueError, seal.open, key, sid, "alice", "bob", "bind")

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


class MemoryRedis:
    """
    The Redis commands a lobby node's presence and client list use, in a
    dict: ``SET key value EX n``, ``SET key value NX GET`` (the epoch) and
    ``EVAL`` of the client-list script.  Every command is kept in
    C{commands}; L{restart} loses the data as a Redis without its
    append-only file does.
    """

    available = True

    def __init__(self):
        self.data = {}
        self.commands = []

    def restart(self):
        self.data.clear()

    def command(self, *args):
        self.commands.append(args)
        if args[0] == "SET" and args[3:] == ("NX", "GET"):
            old = self.data.get(args[1])
            self.data.setdefault(args[1], args[2])
            return succeed(old)
        if args[0] == "SET" and args[3] == "EX":
            self.data[args[1]] = args[2]
            return succeed("OK")
        if args[0] == "EVAL":  # the client list: script, 2, the set, the node set, node, IDs
            self.data[args[3]] = set(args[6:])
            return succeed(len(args) - 6)
        raise AssertionError(f"not a command presence and the client list use: {args}")

    def writes(self):
        """The presence and client-list writes, oldest first (the epoch checks left out)."""
        return [c for c in self.commands if c[:2] != ("SET", EPOCH)]


class RedisReconnectionTests(SynchronousTestCase):
    """
    What a node writes again when its connection to Redis comes back:
    nothing if Redis kept its data, every presence (at each client's next
    keepalive) and the client list (at once) if it lost it.
    """

    def setUp(self):
        self.clock = Clock()

        class Node:
            def client_ids(node):
                return ["alice", "bob"]

        self.cluster = RedisLobbyCluster(self.clock, "redis://127.0.0.1:1/0", "n1", SECRET, 20,
                                         Node())
        self.redis = self.cluster.link = MemoryRedis()
        self.addr = ("203.0.113.1", 5000)
        self.cluster._availability(True)  # the first connection
        self.cluster.present("alice", self.addr, 100)

    def test_first_connection_writes_everything(self):
        self.assertEqual(self.redis.data[clients_key("n1")], {"alice", "bob"})
        self.assertEqual(self.redis.data[presence_key("alice")], "n1")
        self.assertEqual(len(self.redis.writes()), 2)

    def test_redis_kept_its_data(self):
        """A reconnection to the same Redis rewrites neither presence nor the client list."""
        before = len(self.redis.writes())
        self.cluster._availability(False)
        self.cluster._availability(True)
        self.cluster.present("alice", self.addr, 120)  # the next keepalive
        self.assertEqual(self.redis.writes()[before:], [])
        self.cluster.present("alice", self.addr, 140)  # the second: due as ever
        self.assertEqual([c[1] for c in self.redis.writes()[before:]], [presence_key("alice")])

    def test_redis_lost_its_data(self):
        """A new epoch: the client list at once, presence at each client's next keepalive."""
        self.cluster._availability(False)
        self.redis.restart()
        self.cluster._availability(True)
        self.assertEqual(self.redis.data[clients_key("n1")], {"alice", "bob"})
        self.assertNotIn(presence_key("alice"), self.redis.data)
        self.cluster.present("alice", self.addr, 120)
        self.assertEqual(self.redis.data[presence_key("alice")], "n1")

    def test_epoch_unreadable(self):
        """A failed epoch check counts as a new epoch: everything is written again."""
        self.cluster._availability(False)
        self.redis.restart()
        self.patch(self.redis, "command", lambda *args: fail(ClusterUnavailable("down")))
        self.cluster._availability(True)
        self.assertTrue(self.cluster.writes.due("alice", self.addr, 120))
        self.assertIsNone(self.cluster._ids)


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
