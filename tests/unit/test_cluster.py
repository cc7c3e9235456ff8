"""
The relay cluster's pure rules and the relay's routing between nodes, on a
fake clock with a fake shared state (the process tests,
L{tests.process.test_cluster}, run real nodes on a real Redis):

- when a node writes a device's live entry (notify B only when the address
  changed, notify A once per access-check period) and forgets what it wrote when
  Redis comes back without its data (a new epoch);
- a terminal on one node for a device live on another: the owner is asked
  for the connect request, the tunnel lands where the terminal waits;
  unknown and revoked devices are refused at once without asking; no live
  entry, a stale one or an unreachable Redis are clear refusals;
- registry records meeting from several nodes (later provisioning wins, a
  revocation wins at the same time); MAC keys sealed in Redis;
- messages between nodes: forged, garbled or old ones do nothing.
"""

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from p2pnat.cluster import redis as R
from p2pnat.cluster.embedded import EmbeddedState
from p2pnat.cluster.state import (
    ClusterUnavailable,
    IClusterState,
    LiveEntry,
    LiveWrites,
    NodeInfo,
    RecordCodec,
    Signer,
    check_node_name,
    cluster_keys,
    newer,
    rewrite_interval,
)
from p2pnat.deployment.registry import DeviceRecord
from p2pnat.protocol import tunnel, wire
from p2pnat.relay.notify import NotifyHandler
from tests.unit.test_relay_terminal import KEY, FakeSocket, World, status

HEAD = b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n"


def record(device_id="cam", created=100.0, revoked=None, key=b"k" * 32):
    return DeviceRecord(device_id, key, "ab" * 32, "device", None, created, revoked, None,
                        None, None)


@implementer(IClusterState)
class FakeCluster:
    """A shared cluster state whose lookups the test answers."""

    shared = True
    node = "n2"
    addresses = ()

    def __init__(self):
        self.lookups = []  # (device_id, Deferred)
        self.forwarded = []
        self.notifies = []

    def available(self):
        return True

    def notified(self, device_id, kind, addr, last_access, now):
        self.notifies.append((device_id, kind, addr, last_access))

    def locate(self, device_id):
        d = Deferred()
        self.lookups.append((device_id, d))
        return d

    def forward_connect(self, entry, device_id, session_id, nonce):
        self.forwarded.append((entry.node, device_id, session_id, nonce))

    def publish_registry(self, records):
        pass

    def nodes(self):
        return succeed([])

    def live_entries(self):
        return succeed([])

    def start(self):
        pass

    def stop(self):
        return succeed(None)


class InterfaceTests(SynchronousTestCase):
    def test_backends_provide_it(self):
        verifyObject(IClusterState, EmbeddedState())
        verifyObject(IClusterState, FakeCluster())
        state = R.RedisState(MemoryReactorClock(), "redis://127.0.0.1:1/0", "n1", (),
                             b"s" * 32, 300, lambda: ("127.0.0.1", 7443), object())
        verifyObject(IClusterState, state)
        self.assertFalse(state.available())

    def test_embedded_is_one_node(self):
        e = EmbeddedState("solo", ["192.0.2.1:7478"])
        self.assertFalse(e.shared)
        self.assertIsNone(self.successResultOf(e.locate("cam")))
        self.assertEqual([n.name for n in self.successResultOf(e.nodes())], ["solo"])


class LiveWritesTests(SynchronousTestCase):
    def setUp(self):
        self.w = LiveWrites(300)
        self.addr = ("203.0.113.5", 40000)

    def test_notify_b_writes_only_when_the_address_changed(self):
        w = self.w
        self.assertTrue(w.due("cam", "B", self.addr, None), "never written since connecting")
        w.wrote("cam", self.addr, None)
        for _ in range(100):
            self.assertFalse(w.due("cam", "B", self.addr, None))
        self.assertTrue(w.due("cam", "B", ("203.0.113.5", 40001), None))

    def test_notify_a_once_per_period(self):
        """Rewritten five sixths of a period on: the third of an agent's notify A writes."""
        w = self.w
        self.assertTrue(w.due("cam", "A", self.addr, 1000.0))
        w.wrote("cam", self.addr, 1000.0)
        self.assertFalse(w.due("cam", "A", self.addr, 1100.0))
        self.assertFalse(w.due("cam", "A", self.addr, 1200.0))
        self.assertFalse(w.due("cam", "A", self.addr, 1249.0))
        self.assertTrue(w.due("cam", "A", self.addr, 1250.0))
        self.assertTrue(w.due("cam", "A", ("198.51.100.1", 1), 1001.0), "moved")

    def test_forget(self):
        w = self.w
        w.wrote("cam", self.addr, 1000.0)
        w.wrote("cam2", self.addr, 1000.0)
        w.forget("cam")
        self.assertTrue(w.due("cam", "B", self.addr, None))
        self.assertFalse(w.due("cam2", "B", self.addr, None))
        w.forget_all()
        self.assertTrue(w.due("cam2", "B", self.addr, None))
        self.assertEqual(len(w), 0)

    def test_expiry_outlives_what_other_nodes_hold_live(self):
        """The entry lives while another node may hold it live: period + rewrite interval."""
        for period in (300, 10, 3600):
            self.assertGreater(LiveWrites(period).expiry(), period + rewrite_interval(period))
        self.assertEqual(self.w.expiry(), 580)

    def test_notify_handler_tells_each_notify(self):
        """The notify handler hands every recorded notify to the cluster hook."""
        w = World(self)
        w.add("cam", online=False)
        told = []
        handler = NotifyHandler(w.table, w.clock, None,
                                on_live=lambda d, kind, now: told.append((d.id, kind, d.addr)))
        sock = FakeSocket(w.clock)
        for message in (wire.NotifyA(local=("192.168.1.2", 1)),
                        wire.NotifyB(local=("192.168.1.2", 1))):
            frame, message = wire.unseal(wire.seal(message, "cam", KEY, sock.stamper()),
                                         lambda k, t: KEY)
            handler.handle(frame, message, ("203.0.113.5", 4), sock)
        self.assertEqual(told, [("cam", "A", ("203.0.113.5", 4)),
                                ("cam", "B", ("203.0.113.5", 4))])


class RecordTests(SynchronousTestCase):
    def test_newer(self):
        self.assertTrue(newer(record(created=2), record(created=1)))
        self.assertFalse(newer(record(created=1), record(created=2)))
        self.assertTrue(newer(record(revoked=5), record()), "a revocation wins")
        self.assertFalse(newer(record(), record(revoked=5)), "and is not undone")
        self.assertTrue(newer(record(created=200), record(revoked=150)), "but by provisioning")
        self.assertFalse(newer(record(), record()))
        self.assertTrue(newer(record(), None))
        self.assertFalse(newer(None, record()))

    def test_codec_round_trip_seals_the_key(self):
        _, seal = cluster_keys(b"s" * 32)
        codec = RecordCodec(seal)
        r = record(key=bytes(range(32)), revoked=7.5)
        text = codec.encode(r)
        self.assertNotIn(bytes(range(32)).hex(), text)
        self.assertNotIn("AAECAwQF", text)  # nor in base64
        self.assertEqual(codec.decode("cam", text), r)
        with self.assertRaises(ValueError):
            codec.decode("cam2", text)  # sealed for another device
        with self.assertRaises(ValueError) as cm:
            RecordCodec(cluster_keys(b"t" * 32)[1]).decode("cam", text)
        self.assertIn("terminal.secret", str(cm.exception))
        for garbage in ("", "{", "[]", json.dumps({"mac_key": "!!"}), "null"):
            with self.assertRaises(ValueError):
                codec.decode("cam", garbage)

    def test_live_entry_and_node_info(self):
        e = LiveEntry("cam", "n1", "203.0.113.5", 4, 1000.0)
        self.assertEqual(LiveEntry.from_json("cam", e.to_json()), e)
        self.assertFalse(e.stale(1300.0, 300))
        self.assertTrue(e.stale(1300.5, 300))
        self.assertTrue(LiveEntry("cam", "n1", "h", 1, None).stale(0, 300))
        for garbage in ("", "x", "[]", "{}", '{"node":1,"host":"h","port":"p","access":0}',
                        '{"node":"n","host":"h","port":1,"access":0,"period":0}',
                        '{"node":"n","host":"h","port":1,"access":0,"period":-5}',
                        '{"node":"n","host":"h","port":1,"access":0,"period":"x"}',
                        '{"node":"n","host":"h","port":1,"access":0,"period":1e99}',
                        '{"node":"n","host":"h","port":1,"access":0,"period":NaN}'):
            self.assertIsNone(LiveEntry.from_json("cam", garbage))
        n = NodeInfo("n1", ("192.0.2.1:7478",), "192.0.2.1", 7443, 5.0)
        self.assertEqual(NodeInfo.from_json("n1", n.to_json()), n)
        self.assertIsNone(NodeInfo.from_json("n1", "{}"))

    def test_node_names(self):
        for good in ("n1", "relay-2.example", "a_b"):
            self.assertEqual(check_node_name(good), good)
        for bad in ("", "N1", "a b", "x" * 65, "é", "a:b", "a*"):
            self.assertRaises(ValueError, check_node_name, bad)

    def test_redis_urls(self):
        self.assertEqual(R.parse_url("redis://10.0.0.5:6380/2"), ("10.0.0.5", 6380, None, None, 2))
        self.assertEqual(R.parse_url("redis://:pw%21@r.example"),
                         ("r.example", 6379, None, "pw!", None))
        for bad in ("http://x", "redis://", "redis://h:port", "rediss://h"):
            self.assertRaises(ValueError, R.parse_url, bad)


class SignerTests(SynchronousTestCase):
    def test_only_fresh_signed_messages_open(self):
        s = Signer(b"k" * 32, max_age=10)
        text = s.seal({"t": "connect", "device": "cam"}, 1000.0)
        self.assertEqual(s.open(text, 1005.0)["device"], "cam")
        self.assertIsNone(s.open(text, 1011.0), "too old: a replay")
        self.assertIsNone(s.open(text, 989.0), "from the future")
        self.assertIsNone(Signer(b"x" * 32).open(text, 1000.0), "another cluster's key")
        forged = text[:64] + text[64:].replace("cam", "cat")
        self.assertIsNone(s.open(forged, 1000.0))
        for garbage in (None, b"bytes", "", "0" * 64, "0" * 64 + "{}", "x" * 5000,
                        "0" * 64 + "\xe9"):
            self.assertIsNone(s.open(garbage, 1000.0))


class RoutingTests(SynchronousTestCase):
    """A terminal on node n2 for devices whose notifies reach other nodes."""

    def setUp(self):
        self.cluster = FakeCluster()
        self.w = World(self, cluster=self.cluster)

    def entry(self, node="n1", age=10.0):
        return LiveEntry("cam", node, "203.0.113.5", 40000, self.w.clock.seconds() - age)

    def test_remote_device_tunnel_lands_here(self):
        w = self.w
        w.add("cam", online=False)
        t = w.terminal(HEAD)
        self.assertEqual(t.state, "waiting")
        self.assertEqual([d for d, _ in self.cluster.lookups], ["cam"])
        self.cluster.lookups[0][1].callback(self.entry())
        self.assertEqual(w.socket.sent, [], "n2 has no mapping: it sends nothing itself")
        node, device_id, sid, nonce = self.cluster.forwarded[0]
        self.assertEqual((node, device_id), ("n1", "cam"))
        # Retransmits are forwarded too (UDP can be lost on the owner's side).
        w.clock.advance(0.3)
        self.assertEqual(len(self.cluster.forwarded), 2)
        from types import SimpleNamespace

        tun = w.tunnel("cam", session=SimpleNamespace(id=sid, nonce=nonce))
        self.assertEqual(tun.transport.value()[:1], bytes([tunnel.HELLO_OK]))
        self.assertEqual(t.state, "stream")

    def test_local_device_needs_no_lookup(self):
        w = self.w
        w.add("cam")
        t = w.terminal(HEAD)
        self.assertEqual(t.state, "waiting")
        self.assertEqual(self.cluster.lookups, [])
        self.assertEqual(len(w.socket.sent), 1)

    def test_unknown_and_revoked_refused_at_once(self):
        w = self.w
        w.add("gone", revoked=True)
        t = w.terminal(HEAD)
        self.assertEqual(status(t.transport), 401, "an unknown ID tells nothing of itself")
        t = w.terminal(b"GET / HTTP/1.1\r\nHost: gone.relay.test\r\n\r\n")
        self.assertEqual(status(t.transport), 403)
        self.assertEqual(self.cluster.lookups, [])

    def refused(self, answer):
        w = self.w
        w.add("cam", online=False)
        t = w.terminal(HEAD)
        d = self.cluster.lookups[0][1]
        if isinstance(answer, Exception):
            d.errback(answer)
        else:
            d.callback(answer)
        self.assertEqual(self.cluster.forwarded, [])
        self.assertEqual(len(w.relay.sessions), 0)
        return t.transport.value().decode()

    def test_no_live_entry(self):
        out = self.refused(None)
        self.assertTrue(out.startswith("HTTP/1.1 503"), out)
        self.assertIn("not contacted the relay", out)

    def test_stale_entry(self):
        out = self.refused(self.entry(age=301))
        self.assertTrue(out.startswith("HTTP/1.1 503"), out)
        self.assertIn("access-check period", out)

    def test_entry_naming_this_node_is_stale(self):
        """Redis says n2 owns it, but n2 has no mapping (it restarted): not a loop."""
        out = self.refused(self.entry(node="n2"))
        self.assertTrue(out.startswith("HTTP/1.1 503"), out)

    def test_redis_unavailable_is_a_clear_503(self):
        out = self.refused(ClusterUnavailable("redis down"))
        self.assertTrue(out.startswith("HTTP/1.1 503"), out)
        self.assertIn("shared state", out)
        self.assertIn("Retry-After: 5", out)

    def test_revoked_while_looked_up(self):
        w = self.w
        w.add("cam", online=False)
        t = w.terminal(HEAD)
        w.table.get("cam").revoked = True
        self.cluster.lookups[0][1].callback(self.entry())
        self.assertEqual(status(t.transport), 403)
        self.assertEqual(self.cluster.forwarded, [])

    def test_terminal_gone_before_lookup(self):
        w = self.w
        w.add("cam", online=False)
        t = w.terminal(HEAD)
        t.transport.loseConnection()
        t.connectionLost(None)
        self.cluster.lookups[0][1].callback(self.entry())
        self.assertEqual(self.cluster.forwarded, [])
        self.assertEqual(len(w.relay.sessions), 0)

    def test_owner_sends_the_connect_request(self):
        """On the owner: another node's session, that node's tunnel address."""
        w = self.w
        w.add("cam")
        sent = w.relay.send_connect("cam", b"S" * 16, b"N" * 16, "192.0.2.3", 7444)
        self.assertTrue(sent)
        data, addr, kind = w.socket.sent[-1]
        self.assertEqual((addr, kind), (("203.0.113.5", 40000), "ConnectRequest"))
        _, msg = wire.unseal(data, lambda k, t: KEY)
        self.assertEqual((msg.session_id, msg.nonce, msg.tunnel_host, msg.tunnel_port),
                         (b"S" * 16, b"N" * 16, "192.0.2.3", 7444))
        self.assertFalse(w.relay.send_connect("cam", b"S" * 16, b"N" * 16, "x" * 300, 1),
                         "a host the wire cannot carry")
        self.assertFalse(w.relay.send_connect("nobody", b"S" * 16, b"N" * 16, "h", 1))

    def test_device_left(self):
        w = self.w
        w.add("cam")
        w.relay.device_left("cam")
        self.assertFalse(w.relay.send_connect("cam", b"S" * 16, b"N" * 16, "h", 1))
        w.terminal(HEAD)
        self.assertEqual([d for d, _ in self.cluster.lookups], ["cam"], "now looked up")
        w.relay.device_left("nobody")  # nothing to do

    def test_revocation_cuts_tunnels_of_remote_devices(self):
        w = self.w
        w.add("cam", online=False)
        t = w.terminal(HEAD)
        self.cluster.lookups[0][1].callback(self.entry())
        _, _, sid, nonce = self.cluster.forwarded[0]
        from types import SimpleNamespace

        tun = w.tunnel("cam", session=SimpleNamespace(id=sid, nonce=nonce))
        w.relay.device_revoked("cam")
        self.assertTrue(tun.transport.aborted or tun.transport.disconnecting)
        self.assertTrue(t.transport.aborted or t.transport.disconnecting)


class RelayLink:
    """What RedisState asks of its node, recorded."""

    def __init__(self):
        self.connects = []
        self.left = []
        self.applied = []

    def send_connect(self, *args):
        self.connects.append(args)

    def device_left(self, device_id):
        self.left.append(device_id)

    def apply_records(self, records):
        self.applied.append(records)

    def local_records(self):
        return {}


class MessageTests(SynchronousTestCase):
    """What a node does with pub/sub messages: only signed, fresh ones act."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.relay = RelayLink()
        self.state = R.RedisState(self.clock, "redis://127.0.0.1:1/0", "n1", (), b"s" * 32,
                                  300, lambda: ("192.0.2.1", 7443), self.relay)
        self.signer = Signer(cluster_keys(b"s" * 32)[0])

    def connect(self, **fields):
        return self.signer.seal({"t": "connect", "from": "n2", "device": "cam",
                                 "sid": "aa" * 16, "nonce": "bb" * 16, "host": "192.0.2.2",
                                 "port": 7443, **fields}, self.clock.seconds())

    def test_signed_connect_is_sent(self):
        self.state._message(R.node_channel("n1"), self.connect())
        self.assertEqual(self.relay.connects,
                         [("cam", b"\xaa" * 16, b"\xbb" * 16, "192.0.2.2", 7443)])

    def test_harmless(self):
        bad = [
            (R.node_channel("n1"), Signer(b"x" * 32).seal({"t": "connect"}, 0)),  # forged
            (R.node_channel("n1"), self.connect()[:-2] + "}"),  # garbled
            (R.node_channel("n1"), self.connect(sid="zz")),  # not hex
            (R.node_channel("n1"), self.connect(port="x")),
            (R.node_channel("n1"), self.connect(**{"from": "n1"})),  # our own
            (R.node_channel("n1"), self.signer.seal({"t": "nonsense"}, 1_700_000_000)),
            (R.node_channel("n1"), self.signer.seal({"x": 1}, 1_700_000_000)),
            (R.CH_REGISTRY, self.connect()),  # a connect on the wrong channel
            (R.node_channel("n1"), self.signer.seal({"t": "connect"}, 1_600_000_000)),  # old
        ]
        for channel, text in bad:
            self.state._message(channel, text)
        self.assertEqual(self.relay.connects, [])
        self.assertEqual(self.relay.left, [])

    def test_released(self):
        self.state._message(R.node_channel("n1"), self.signer.seal(
            {"t": "released", "device": "cam"}, self.clock.seconds()))
        self.assertEqual(self.relay.left, ["cam"])

    def test_unavailable_state_refuses_fast(self):
        f = self.failureResultOf(self.state.locate("cam"))
        f.trap(ClusterUnavailable)
        self.state.notified("cam", "A", ("203.0.113.5", 1), 1.0, 1.0)  # dropped, no error
        self.assertEqual(len(self.state.writes), 0)
        self.successResultOf(self.state.round())


class FakeLink:
    """A RedisLink whose commands the test answers."""

    available = True

    def __init__(self):
        self.commands = []

    def command(self, *args):
        self.commands.append(args)
        if args[0] == "SET":
            return self.set_reply
        return succeed(None)

    set_reply = succeed(None)


class LiveEntryWriteTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.state = R.RedisState(MemoryReactorClock(), "redis://127.0.0.1:1/0", "n1", (),
                                  b"s" * 32, 300, lambda: ("192.0.2.1", 7443), RelayLink())
        self.link = self.state.link = FakeLink()

    def sets(self):
        return [c for c in self.link.commands if c[0] == "SET" and c[1].startswith("p2pnat:live:")]

    def test_writes_follow_the_rules(self):
        s = self.state
        addr = ("203.0.113.5", 4)
        s.notified("cam", "A", addr, 1000.0, 1000.0)
        for i in range(10):
            s.notified("cam", "B", addr, 1000.0, 1000.0 + 20 * i)
        s.notified("cam", "A", addr, 1100.0, 1100.0)
        sets = self.sets()
        self.assertEqual(len(sets), 1)
        key, value, ex, seconds, get = sets[0][1:]
        self.assertEqual((key, ex, get), ("p2pnat:live:cam", "EX", "GET"))
        self.assertEqual(LiveEntry.from_json("cam", value),
                         LiveEntry("cam", "n1", "203.0.113.5", 4, 1000.0, 300))
        s.notified("cam", "B", ("203.0.113.5", 5), 1100.0, 1101.0)
        self.assertEqual(len(self.sets()), 2, "moved")

    def test_a_failed_write_is_redone_by_the_next_notify(self):
        s = self.state
        self.link.set_reply = fail(ClusterUnavailable("down"))
        s.notified("cam", "B", ("203.0.113.5", 4), None, 1.0)
        self.link.set_reply = succeed(None)
        s.notified("cam", "B", ("203.0.113.5", 4), None, 2.0)
        self.assertEqual(len(self.sets()), 2)

    def test_taking_over_tells_the_old_owner(self):
        old = LiveEntry("cam", "n3", "203.0.113.5", 4, 900.0).to_json()
        self.link.set_reply = succeed(old)
        self.state.notified("cam", "A", ("203.0.113.9", 4), 1000.0, 1000.0)
        published = [c for c in self.link.commands if c[0] == "PUBLISH"]
        self.assertEqual(len(published), 1)
        self.assertEqual(published[0][1], R.node_channel("n3"))
        fields = self.state.signer.open(published[0][2], self.state.clock.seconds())
        self.assertEqual((fields["t"], fields["device"]), ("released", "cam"))

    def test_reconnecting_rewrites_from_notifies(self):
        # FakeLink's SET ... NX GET of the epoch answers None: a Redis with
        # no epoch, that is, one that lost its data.  (The same Redis is
        # tests.unit.test_cluster_slow_node.)
        s = self.state
        addr = ("203.0.113.5", 4)
        s.notified("cam", "B", addr, None, 1.0)
        s._availability(True)
        s.notified("cam", "B", addr, None, 2.0)
        self.assertEqual(len(self.sets()), 2)


class ScriptedLink:
    """A RedisLink answering from a dict of command name -> reply (or callable)."""

    available = True

    def __init__(self, replies):
        self.replies = replies
        self.commands = []

    def command(self, *args):
        self.commands.append(args)
        reply = self.replies.get(args[0])
        return succeed(reply(*args) if callable(reply) else reply)


class RoundTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.relay = RelayLink()
        self.relay.local_records = lambda: {"cam": record()}
        self.state = R.RedisState(self.clock, "redis://127.0.0.1:1/0", "n1", ("192.0.2.1:1",),
                                  b"s" * 32, 300, lambda: ("192.0.2.1", 7443), self.relay)

    def run_round(self, replies):
        self.state.link = ScriptedLink(replies)
        self.successResultOf(self.state.round())
        return [c[0] for c in self.state.link.commands]

    def test_new_epoch_merges_this_nodes_registry(self):
        codec = self.state.codec
        stored = codec.encode(record(revoked=150.0))
        ran = self.run_round({"SET": None, "GET": "1", "EVAL": ["2", "cam"],
                              "HGETALL": ["cam", stored]})
        self.assertIn("EVAL", ran)
        evals = [c for c in self.state.link.commands if c[0] == "EVAL"]
        self.assertEqual(evals[0][5:8], ("cam", "100.0", ""))
        self.assertEqual(self.relay.applied, [{"cam": record(revoked=150.0)}])
        self.assertIn("HSET", ran, "heartbeat")
        # Same epoch, same version: nothing merged or read again.
        self.clock.advance(1)
        ran = self.run_round({"SET": self.state._epoch, "GET": self.state._seen_version})
        self.assertEqual(ran, ["SET", "GET"])

    def test_nodes_alive_and_live_entries(self):
        alive = NodeInfo("n2", ("192.0.2.2:1",), "192.0.2.2", 7443, 995.0).to_json()
        dead = NodeInfo("n3", ("192.0.2.3:1",), "192.0.2.3", 7443, 900.0).to_json()
        self.state.link = ScriptedLink({"HGETALL": ["n2", alive, "n3", dead, "bad", "{"]})
        self.assertEqual([n.name for n in self.successResultOf(self.state.nodes())], ["n2"])
        entry = LiveEntry("cam", "n2", "203.0.113.5", 4, 990.0)
        self.state.link = ScriptedLink({"SCAN": ["0", ["p2pnat:live:cam", "p2pnat:live:x"]],
                                        "MGET": [entry.to_json(), "garbage"]})
        self.assertEqual(self.successResultOf(self.state.live_entries()), [entry])

    def test_a_failed_round_is_logged_and_retried(self):
        self.state.link = ScriptedLink({})
        self.state.link.command = lambda *args: fail(ClusterUnavailable("gone"))
        self.successResultOf(self.state.round())
        self.assertIsNone(self.state._round, "the next round may run")


class SettingsTests(SynchronousTestCase):
    """``[cluster]`` in relay.toml: no key is the single node, as before."""

    def service(self, **settings):
        from p2pnat.daemon import config as C
        from p2pnat.relay import tap
        from p2pnat.relay.core import synchronous
        from tests.unit.test_taps import UDPMemoryReactor

        config = C.load(None, tap.SCHEMA, {
            "relay.state_dir": self.mktemp(), "udp.listen": "127.0.0.1:0",
            "terminal.https": "", "tunnel.listen": "", **settings})
        svc = tap.RelayService(config, UDPMemoryReactor(), run_blocking=synchronous,
                               run_store=synchronous)
        self.addCleanup(svc.registry.close)
        return svc

    def test_no_key_is_a_single_node(self):
        svc = self.service()
        self.assertIsInstance(svc.cluster, EmbeddedState)
        self.assertIs(svc.relay.cluster, svc.cluster)
        self.assertEqual(svc.metrics.value("p2pnat_cluster_available"), 1)

    def test_redis_key_makes_a_node(self):
        svc = self.service(**{"cluster.redis": "redis://127.0.0.1:1/0", "cluster.node": "n7",
                              "cluster.addresses": ["198.51.100.1:7478"],
                              "tunnel.public_port": "7443"})
        self.assertIsInstance(svc.cluster, R.RedisState)
        self.assertEqual((svc.cluster.node, svc.cluster.addresses),
                         ("n7", ("198.51.100.1:7478",)))
        self.assertEqual(svc.tunnel_address(), ("198.51.100.1", 7443))
        self.assertFalse(svc.cluster.available())
        self.assertEqual(svc.metrics.value("p2pnat_cluster_available"), 0)

    def test_bad_settings(self):
        from p2pnat.daemon import config as C
        from p2pnat.relay import tap

        for name, value in (("cluster.redis", "http://x"), ("cluster.redis", "redis://"),
                            ("cluster.node", "Bad Name"), ("cluster.addresses", ["nope"])):
            with self.assertRaises(C.ConfigError, msg=(name, value)):
                C.load(None, tap.SCHEMA, {name: value})


class OwnerGoneTests(SynchronousTestCase):
    """Nobody listens on the owner's channel (it died): 503 at once, not 504 later."""

    def setUp(self):
        self.cluster = FakeCluster()
        self.heard = []
        self.cluster.forward_connect = lambda *args: self.heard.append(Deferred()) \
            or self.heard[-1]
        self.w = World(self, cluster=self.cluster)
        self.w.add("cam", online=False)

    def forwarded(self, heard_by):
        """A terminal's request, forwarded to n1, heard by C{heard_by} nodes."""
        t = self.w.terminal(HEAD)
        self.cluster.lookups[0][1].callback(
            LiveEntry("cam", "n1", "203.0.113.5", 4, self.w.clock.seconds()))
        self.heard[0].callback(heard_by)
        return t

    def test_owner_gone(self):
        w = self.w
        t = self.forwarded(0)
        out = t.transport.value().decode()
        self.assertTrue(out.startswith("HTTP/1.1 503"), out)
        self.assertIn("not answering", out)
        self.assertEqual(len(w.relay.sessions), 0)
        w.clock.advance(30)  # no retransmission, no late 504
        self.assertEqual(len(self.heard), 1)

    def test_owner_heard(self):
        t = self.forwarded(1)
        self.assertEqual(t.state, "waiting")
        self.assertEqual(len(self.w.relay.sessions), 1)
