"""
Lobby nodes sharing a Redis, as real processes on loopback: a redis-server
of the test's own (L{tests.support.redis}), two ``twistd lobby`` nodes with
their own registries and one shared secret, and ``p2pnat peer`` clients
logged into different nodes.

- Alice on node 1 connects to Bob on node 2 (``peer connect`` against
  ``peer wait --echo``): introduced, a direct path (loopback), an echo;
  an ID no node knows is refused as such, one known on node 2 but logged
  in nowhere as offline;
- Redis killed: Alice's request for Bob gets a clear refusal at once, her
  request for Dave (on her own node) still connects; Redis back: Bob is
  reached again, with nothing done by hand;
- a relayed session across nodes (both clients say their ports are
  random behind symmetric NATs, from different loopback addresses: no
  punch is tried) runs on node 1 alone: the echo comes back, node 1's
  metrics count the relayed datagrams and node 2's count none.
"""

import os
import re
import subprocess
import time
import urllib.request

from tests.process.test_daemons import ETC, LOOPBACK, DaemonTestCase
from tests.support import procs
from tests.support.lab.running import events, first
from tests.support.procs import provision
from tests.support.redis import RedisServer, free_port, require_redis

PEER_FLAGS = ("--json", "-v", "--no-portmap", "--no-ipv6")
#: What a client behind a symmetric NAT with random ports says of it: no
#: punch can work between two of them, the lobby relays.
RANDOM = ("--nat", "address-and-port-dependent/random")


class LobbyClusterTests(DaemonTestCase):
    def setUp(self):
        require_redis()
        super().setUp()
        self.redis = RedisServer(self)
        self.secret = os.urandom(32).hex()
        self.nodes = {}

    def node(self, name):
        """Start lobby node C{name}; its state directory, UDP address and metrics port."""
        state = os.path.join(self.tmpdir(), name)
        os.makedirs(state)
        with open(os.path.join(state, "cluster.secret"), "w") as f:
            f.write(self.secret)
        metrics = free_port()
        lobby = self.start(
            "lobby", "--config", os.path.join(ETC, "lobby.toml"), "--lobby-state-dir", state,
            "--udp-listen", f"{LOOPBACK}:0", "--lobby-sync-interval", "0.2",
            "--lobby-keepalive", "1", "--cluster-redis", self.redis.url, "--cluster-node", name,
            "--metrics-listen", f"tcp:{metrics}:interface={LOOPBACK}")
        m = lobby.wait_for(r"other nodes reach it at 127\.0\.0\.1:(\d+)")
        lobby.wait_for("connected to redis")
        node = {"daemon": lobby, "state": state, "addr": f"{LOOPBACK}:{m.group(1)}",
                "metrics": metrics}
        self.nodes[name] = node
        return node

    def client(self, cid, node, interface=None):
        """Provision C{cid} on C{node} (its lobby), bound to C{interface} if given; its client.toml."""
        out = os.path.join(self.tmpdir(), cid)
        provision("client", "add", cid, "--state-dir", node["state"], "--lobby", node["addr"],
                  "--out", out)
        config = os.path.join(out, "client.toml")
        if interface:
            with open(config, "a") as f:
                f.write(f'interface = "{interface}"\n')
        return config

    def wait(self, config, name, *flags):
        """``p2pnat peer wait --echo`` as a daemon; returns once it logged in."""
        waiter = self.start(name, argv=procs.p2pnat("peer", "wait", "--config", config,
                                                     "--echo", *PEER_FLAGS, *flags))
        waiter.wait_for('"event": "login"', timeout=30)
        return waiter

    def connect(self, config, peer, *flags, timeout=30):
        """``p2pnat peer connect PEER --send ping``: (exit status, events, stderr)."""
        done = subprocess.run(  # noqa: PLW1510 (the status is part of the result)
            procs.p2pnat("peer", "connect", peer, "--config", config, "--send", "ping",
                         "--no-stdin", "--wait", "2", "--timeout", "8", *PEER_FLAGS, *flags),
            cwd=procs.REPO, env=procs.env(), capture_output=True, text=True, timeout=timeout)
        return done.returncode, events(done.stdout), done.stderr

    def relayed(self, node):
        """Datagrams lobby node C{node} relayed, from its Prometheus metrics."""
        url = f"http://{LOOPBACK}:{node['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:  # noqa: S310 (our own daemon)
            text = page.read().decode()
        m = re.search(r'^p2pnat_udp_sent_total\{kind="relayed"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    def assert_path(self, result, mode="direct"):
        status, evs, stderr = result
        path = first(evs, "path")
        self.assertIsNotNone(path, f"no path: {evs} {stderr[-3000:]}")
        self.assertEqual(path["mode"], mode)
        self.assertTrue(any(e.get("event") == "data" for e in evs), f"no echo: {evs}")
        self.assertEqual(status, 0, stderr[-3000:])

    def cluster(self, interfaces=(None, None)):
        n1, n2 = self.node("n1"), self.node("n2")
        alice = self.client("alice", n1, interfaces[0])
        bob = self.client("bob", n2, interfaces[1])
        # Each node has written its client list (sync interval 0.2 s).
        n2["daemon"].wait_for("connected to redis")
        time.sleep(0.5)
        return n1, n2, alice, bob

    def test_introduced_across_nodes(self):
        n1, n2, alice, bob = self.cluster()
        self.wait(bob, "bob-wait")
        self.assert_path(self.connect(alice, "bob"))
        n1["daemon"].wait_for(r"alice asks for bob \(on node n2\)")
        n2["daemon"].wait_for(r"alice \(on node n1\) asks for bob")
        n2["daemon"].wait_for(r"bob accepts alice")
        # What the refusals need comes from Redis in one round trip: an ID
        # no node knows, and one node 2 knows that is logged in nowhere.
        self.client("carol", n2)
        time.sleep(0.5)  # node 2's next sync writes its client list
        for peer, why in (("nobody", "no such client"), ("carol", "peer offline")):
            status, evs, stderr = self.connect(alice, peer)
            self.assertEqual((first(evs, "error") or {}).get("error"), why,
                             f"{evs} {stderr[-2000:]}")

    def test_redis_down_then_back(self):
        n1, n2, alice, bob = self.cluster()
        dave = self.client("dave", n1)
        self.wait(bob, "bob-wait")
        self.wait(dave, "dave-wait")
        self.redis.kill()
        n1["daemon"].wait_for("lost redis")
        started = time.monotonic()
        status, evs, stderr = self.connect(alice, "bob")
        refused = first(evs, "error")
        self.assertNotEqual(status, 0)
        self.assertIsNotNone(refused, f"{evs} {stderr[-2000:]}")
        self.assertIn("lobby cluster unavailable", refused["error"])
        self.assertLess(time.monotonic() - started, 8.0)  # at once, not at the timeout
        n1["daemon"].wait_for(r"request from alice for bob refused: cannot reach the cluster")
        # Clients of the same node are introduced as ever.
        self.assert_path(self.connect(alice, "dave"))
        # Redis back (empty): the nodes reconnect and rewrite presence and
        # client lists by themselves.
        self.redis.start()
        for node in (n1, n2):
            node["daemon"].wait_for(r"connected to redis(.|\n)*connected to redis", timeout=20)
        deadline = time.monotonic() + 20
        while True:
            result = self.connect(alice, "bob")
            if first(result[1], "path") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assert_path(result)

    def test_relayed_by_one_node(self):
        """
        Alice (node 1) and Bob (node 2) end relayed: node 1 relays both
        ways, node 2 relays nothing (Bob binds at node 1, proving his role).
        """
        n1, n2, alice, bob = self.cluster(interfaces=("127.0.0.2", "127.0.0.3"))
        self.wait(bob, "bob-wait", *RANDOM)
        self.assert_path(self.connect(alice, "bob", *RANDOM), mode="relayed")
        n1["daemon"].wait_for(r"relaying session \w+ for alice at 127\.0\.0\.2:")
        n1["daemon"].wait_for(r"relaying session \w+ for bob at 127\.0\.0\.3:")
        # The ping and its echo at least, each relayed once, by node 1.
        self.assertGreaterEqual(self.relayed(n1), 2)
        self.assertEqual(self.relayed(n2), 0)
        self.assertNotIn("relaying session", n2["daemon"].output())
