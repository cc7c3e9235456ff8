"""
``p2pnat cluster status`` (p2pnat.cli.cluster) from what it reads, and the
per-node stats record it shows (p2pnat.cluster.stats, written by the
relay): a cluster read through a fake Redis, a single node read from its
state directory, and ``p2pnat cluster admin-password``.  The command
against a real redis-server (and an unreachable one) is in
tests.process.test_admin.
"""

import json
import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cli import cluster as status_cli
from p2pnat.cluster.redis import NODES, REGISTRY, live_key
from p2pnat.cluster.state import LiveEntry, NodeInfo
from p2pnat.cluster.stats import STATS_FILE, STATS_KEY, NodeStats, parse_stats
from p2pnat.daemon import config as C
from p2pnat.deployment.registry import verify_credential
from p2pnat.relay import tap
from p2pnat.relay.core import synchronous
from tests.support.procs import provision
from tests.unit.test_relay_terminal import Transport

NOW = 1_800_000_000.0


class FakeRedis:
    """The few commands the status reads, on dicts (replies as txredisapi gives them)."""

    def __init__(self):
        self.strings = {}
        self.hashes = {}
        self.sets = {}

    def command(self, *args):
        name, rest = args[0], args[1:]
        if name == "PING":
            return succeed("PONG")
        if name == "INFO":
            return succeed("# Server\r\nredis_version:7.0.15\r\n# Memory\r\n"
                           "used_memory_human:1.50M\r\n# Persistence\r\naof_enabled:1\r\n")
        if name == "HGETALL":
            flat = []
            for k, v in self.hashes.get(rest[0], {}).items():
                flat += [k, v]
            return succeed(flat)
        if name == "TYPE":
            return succeed("set" if rest[0] in self.sets else
                           "hash" if rest[0] in self.hashes else "none")
        if name == "SMEMBERS":
            return succeed(sorted(self.sets.get(rest[0], ())))
        if name == "SCARD":
            return succeed(len(self.sets.get(rest[0], ())))
        if name == "SCAN":  # two pages, to walk the cursor
            keys = sorted(k for k in self.strings if k.startswith(rest[2][:-1]))
            half = len(keys) // 2
            return succeed(["7", keys[:half]] if rest[0] == "0" else ["0", keys[half:]])
        if name == "HLEN":
            return succeed(len(self.hashes.get(rest[0], {})))
        if name == "MGET":
            return succeed([self.strings.get(k) for k in rest])
        raise AssertionError(f"unexpected command {args!r}")


def cluster_redis():
    r = FakeRedis()
    r.hashes[NODES] = {
        "n1": NodeInfo("n1", ("192.0.2.1:7478",), "192.0.2.1", 7443, NOW - 2).to_json(),
        "n2": NodeInfo("n2", ("192.0.2.2:7478",), "192.0.2.2", 7443, NOW - 60).to_json(),
        "junk": "not json"}
    for device_id, node, access in (("cam1", "n1", NOW - 10), ("cam2", "n1", NOW - 1000),
                                    ("cam3", "n2", NOW - 20)):
        r.strings[live_key(device_id)] = LiveEntry(device_id, node, "198.51.100.4", 4000,
                                                   access).to_json()
    r.strings[live_key("bad")] = "{"
    r.hashes[REGISTRY] = {"cam1": json.dumps({"revoked": None}),
                          "cam2": json.dumps({"revoked": None}),
                          "cam3": json.dumps({"revoked": 5.0}), "x": "garbage"}
    r.hashes[STATS_KEY] = {"n1": NodeStats("n1", NOW - 1, 1, 4, 2, 3, 5000, 600).to_json(),
                           "n2": NodeStats("n2", NOW - 60, 9, 9, 9, 9, 9, 9).to_json()}
    return r


def read(redis, seconds=lambda: NOW):
    d = Deferred.fromCoroutine(status_cli.read_cluster(redis.command, seconds,
                                                       "redis://:secret@10.0.0.5:6379/0"))
    return d


class ClusterStatusTests(SynchronousTestCase):
    def status(self, redis=None, devices=False):
        snap = self.successResultOf(read(redis or cluster_redis()))
        return status_cli.summarize(snap, NOW, devices=devices)

    def test_nodes(self):
        s = self.status()
        self.assertEqual([(n["name"], n["alive"], n["devices"], n["online"])
                          for n in s["nodes"]], [("n1", True, 2, 1), ("n2", False, 1, 1)])
        self.assertEqual(s["nodes"][0]["addresses"], ["192.0.2.1:7478"])
        self.assertEqual(s["nodes"][0]["tunnels_to"], "192.0.2.1:7443")
        self.assertEqual(s["nodes_alive"], 1)
        self.assertEqual((s["devices_registered"], s["devices_live"]), (4, 3))

    def test_sessions_of_live_nodes_only(self):
        s = self.status()
        self.assertEqual(s["nodes"][0]["stats"]["tunnels"], 4)
        self.assertIsNone(s["nodes"][1]["stats"], "a dead node's last record is not shown")
        self.assertEqual(s["sessions"], {"sessions": 1, "tunnels": 4, "streams": 2,
                                         "terminals": 3, "bytes_from_devices": 5000,
                                         "bytes_to_devices": 600})

    def test_redis_health(self):
        ticks = iter([NOW, NOW + 0.0015])
        snap = self.successResultOf(read(cluster_redis(), lambda: next(ticks)))
        self.assertEqual(snap.redis, {"reachable": True, "version": "7.0.15",
                                      "memory_used": "1.50M", "aof": True, "rtt_ms": 1.5})
        self.assertEqual(snap.where, "redis://10.0.0.5:6379/0", "no password shown")

    def test_devices_listed(self):
        s = self.status(devices=True)
        self.assertEqual([(d["id"], d["stale"], d["nat_address"])
                          for d in s["nodes"][0]["device_list"]],
                         [("cam1", False, "198.51.100.4:4000"),
                          ("cam2", True, "198.51.100.4:4000")])
        text = "\n".join(status_cli.format_text(s))
        self.assertIn("cam2", text)
        self.assertNotIn("device_list", json.dumps(self.status()))

    def test_text(self):
        text = "\n".join(status_cli.format_text(self.status()))
        self.assertIn("1 of 2 relay nodes alive", text)
        self.assertIn("version 7.0.15, 1.50M used, AOF on", text)
        self.assertIn("node n2: GONE", text)
        self.assertIn("lobby: no lobby nodes", text)
        self.assertNotIn("secret", text)

    def test_lobby_nodes(self):
        r = cluster_redis()
        r.sets[status_cli.LOBBY_NODES] = {"l1", "l2"}
        r.sets[status_cli.LOBBY_CLIENTS + "l1"] = {"alice", "bob", "carol"}
        r.sets[status_cli.LOBBY_CLIENTS + "l2"] = {"dave"}
        r.strings[status_cli.LOBBY_PRESENCE + "alice"] = "l1"
        r.strings[status_cli.LOBBY_PRESENCE + "bob"] = "l1"
        r.strings[status_cli.LOBBY_PRESENCE + "dave"] = "l2"
        s = self.status(r)
        self.assertEqual(s["lobby_nodes"], [
            {"name": "l1", "clients_online": 2, "clients_registered": 3},
            {"name": "l2", "clients_online": 1, "clients_registered": 1}])
        self.assertEqual(s["devices_live"], 3, "lobby keys are not live entries")
        text = "\n".join(status_cli.format_text(s))
        self.assertIn("lobby node l1: 2 clients logged in (3 registered)", text)

    def test_lobby_key_of_another_kind(self):
        r = cluster_redis()
        r.hashes[status_cli.LOBBY_NODES] = {"l1": "?"}
        self.assertEqual(self.status(r)["lobby_nodes"], [])

    def test_empty_cluster(self):
        s = self.status(FakeRedis())
        self.assertEqual((s["nodes"], s["devices_live"], s["lobby_nodes"]), ([], 0, []))
        self.assertIn("0 of 0 relay nodes alive", "\n".join(status_cli.format_text(s)))


class StatsRecordTests(SynchronousTestCase):
    def test_round_trip(self):
        s = NodeStats("n1", NOW, 1, 2, 3, 4, 5, 6)
        self.assertEqual(NodeStats.from_json(s.to_json()), s)

    def test_garbage(self):
        for text in ("", "{", "[]", '{"node": "n1"}', json.dumps({
                "node": "n1", "at": "x", "sessions": 1, "tunnels": 1, "streams": 1,
                "terminals": 1, "bytes_from_devices": 1, "bytes_to_devices": 1})):
            self.assertIsNone(NodeStats.from_json(text), text)

    def test_parse_keeps_matching_names(self):
        good = NodeStats("n1", NOW).to_json()
        self.assertEqual(parse_stats({"n1": good, "n2": good, "n3": "x"}),
                         {"n1": NodeStats("n1", NOW)})
        self.assertEqual(parse_stats(["n1", good]), {"n1": NodeStats("n1", NOW)})


class RelayStatsTests(SynchronousTestCase):
    """What the relay counts and writes (p2pnat.relay.tap)."""

    def setUp(self):
        self.state = os.path.abspath(self.mktemp())
        config = C.load(None, tap.SCHEMA, {
            "relay.state_dir": self.state, "udp.listen": "127.0.0.1:0", "terminal.https": "",
            "tunnel.listen": "", "cluster.node": "solo"})
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.svc = tap.RelayService(config, self.reactor, run_blocking=synchronous,
                                    run_store=synchronous)
        self.addCleanup(self.svc.registry.close)

    def test_tunnels_count_their_bytes(self):
        tunnel = tap._CountedTunnelFactory(self.svc.relay, self.svc.traffic).buildProtocol(None)
        tunnel.makeConnection(Transport())
        tunnel.dataReceived(b"x" * 10)  # part of a hello
        tunnel.write_data(b"abc")
        tunnel._direct = True
        tunnel.send_data(b"defg")
        self.assertEqual((self.svc.traffic.from_devices, self.svc.traffic.to_devices), (10, 7))

    def test_stats(self):
        busy, idle = object(), object()
        self.svc.relay.tunnels["cam1"] = {busy, idle}
        self.svc.relay.idle["cam1"] = [idle]
        self.svc.relay.terminals.add(object())
        self.svc.traffic.from_devices = 99
        self.assertEqual(self.svc.stats(NOW), NodeStats("solo", NOW, 0, 2, 1, 1, 99, 0))

    def test_single_node_writes_its_file_every_few_seconds(self):
        path = os.path.join(self.state, STATS_FILE)
        self.svc._sync_round()
        with open(path) as f:
            self.assertEqual(NodeStats.from_json(f.read()), NodeStats("solo", NOW))
        self.svc.traffic.to_devices = 5
        self.reactor.advance(1)
        self.svc._sync_round()
        with open(path) as f:
            self.assertEqual(NodeStats.from_json(f.read()).bytes_to_devices, 0, "not yet")
        self.reactor.advance(4)
        self.svc._sync_round()
        with open(path) as f:
            self.assertEqual(NodeStats.from_json(f.read()).bytes_to_devices, 5)


class SingleNodeTests(SynchronousTestCase):
    def test_reads_the_state_directory(self):
        from p2pnat.deployment.registry import Registry

        tmp = os.path.abspath(self.mktemp())
        state = os.path.join(tmp, "state")
        provision("relay", "init", "--state-dir", state, "--hostname", "relay.test")
        for device_id in ("cam1", "cam2"):
            provision("device", "add", device_id, "--state-dir", state, "--service",
                      "127.0.0.1:80", "--relay", "127.0.0.1:7478",
                      "--out", os.path.join(tmp, device_id))
        with Registry.open_state_dir(state) as registry:
            registry.record_access("cam1", NOW - 30, "203.0.113.5", 40000)
            registry.record_access("cam2", NOW - 3000, "203.0.113.6", 40001)
        with open(os.path.join(state, STATS_FILE), "w") as f:
            f.write(NodeStats("solo", NOW - 2, 0, 1, 1, 1, 10, 20).to_json())
        config_path = os.path.join(tmp, "relay.toml")
        with open(config_path, "w") as f:
            f.write('[relay]\nstate_dir = "state"\n')
        config = C.load(config_path, tap.SCHEMA)
        s = status_cli.summarize(status_cli.read_single(config, NOW), NOW, devices=True)
        self.assertEqual(s["mode"], "single")
        self.assertEqual((s["devices_registered"], s["devices_live"]), (2, 1))
        [node] = s["nodes"]
        self.assertEqual((node["name"], node["alive"], node["stats"]["tunnels"]),
                         ("solo", True, 1))
        self.assertEqual([d["id"] for d in node["device_list"]], ["cam1"])
        self.assertEqual(node["device_list"][0]["nat_address"], "203.0.113.5:40000")
        text = "\n".join(status_cli.format_text(s))
        self.assertIn("single node (no [cluster])", text)
        self.assertNotIn("lobby", text)
        # A relay that stopped writing its record is not running.
        s = status_cli.summarize(status_cli.read_single(config, NOW + 60), NOW + 60)
        self.assertFalse(s["nodes"][0]["alive"])
        self.assertIn("not running", "\n".join(status_cli.format_text(s)))


class AdminPasswordTests(SynchronousTestCase):
    def test_generate(self):
        path = os.path.abspath(self.mktemp())
        out = provision("cluster", "admin-password", "--out", path, "--generate")
        password = out.split("stored hashed): ")[1].strip()
        self.assertEqual(len(password), 24)
        with open(path) as f:
            stored = f.read().strip()
        self.assertTrue(verify_credential(stored, password))
        self.assertNotIn(password, stored)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with self.assertRaises(AssertionError, msg="no overwrite without --force"):
            provision("cluster", "admin-password", "--out", path, "--generate")
        provision("cluster", "admin-password", "--out", path, "--generate", "--force")

    def test_short_password_refused(self):
        given = os.path.abspath(self.mktemp())
        with open(given, "w") as f:
            f.write("short\n")
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(AssertionError) as e:
            provision("cluster", "admin-password", "--out", path, "--password-file", given)
        self.assertIn("at least 12 characters", str(e.exception))
        self.assertFalse(os.path.exists(path))


