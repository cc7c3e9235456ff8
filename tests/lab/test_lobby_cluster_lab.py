"""
Lobby nodes sharing a Redis, across the Linux kernel's real NATs in the
NAT lab: one Redis and two lobby nodes (``twistd lobby`` with ``[cluster]``),
each node a server on the lab's public segment with two addresses and two
ports each (so that discovery runs all of RFC 5780 against its own node),
Redis on a server of its own with its own config.  Every A client logs into
node 1 and every B client into node 2; B runs ``p2pnat peer wait --echo``
and A ``p2pnat peer connect B --send ping`` (``--no-portmap``).

- two hosts behind symmetric NATs with sequential ports get a direct path
  (the port prediction, as with one lobby), and an echo;
- two hosts behind symmetric NATs with random ports get a relayed path,
  and an echo, as the single-node matrix says
  (L{tests.support.lab.p2p.expect_direct}); node 1 (A's) relays it alone:
  B binds there through his NAT's mapping towards node 1, node 1's metrics
  count the relayed datagrams and node 2's none;
- the introductions crossed nodes (both nodes' logs say so).

It needs root, ``ip``, ``nft``, ``conntrack`` and ``redis-server``; it
skips otherwise, and fails instead when the environment variable ``CI`` is
set.
"""

import os
import re
import shutil

from tests.support import procs
from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import wait_output

REDIS_PORT = 6379
PAIRS = (("symmetric-sequential", "symmetric-sequential"),
         ("symmetric-random", "symmetric-random"))
#: Connects per pair (each must give the expected path and an echo).
TRIALS = int(os.environ.get("P2PLAB_TRIALS", "2"))
#: Each node serves its metrics on its own namespace's loopback.
METRICS_PORT = 9100


class LobbyClusterLab(P.P2PLab):
    """
    A L{P.P2PLab} with two lobby nodes (``n1``, ``n2``) and a Redis in
    place of its one lobby; a client is provisioned on the node it logs
    into, with that node's addresses for discovery.
    """

    def setup(self):
        self.redis_host = self.lab.add_server("redis")
        self.nodes = {}
        for name in ("n1", "n2"):
            server = self.lab.add_server(f"lobby{name}", addresses=self.addresses)
            state = os.path.join(self.workdir, f"{name}-state")
            self.nodes[name] = {"server": server, "state": state, "proc": None,
                                "addr": f"{server.ips[0]}:{P.LOBBY_PORTS[0]}"}
        self.secret = os.urandom(32).hex()
        self.redis = None

    def add_client(self, cid, host, node):
        from p2pnat.deployment import provision

        n = self.nodes[node]
        out = os.path.join(self.workdir, f"client-{cid}")
        provision.add_client(n["state"], cid, out, lobby=n["addr"])
        config = os.path.join(out, "client.toml")
        discovery = ", ".join(f'"{ip}:{port}"' for ip in n["server"].ips
                              for port in P.LOBBY_PORTS)
        with open(config, "a") as f:
            f.write(f"discovery = [{discovery}]\n")
        self.clients[cid] = P.LobbyClientBundle(cid, host, config)
        return self.clients[cid]

    def start_redis(self, timeout=15):
        """redis-server on the Redis server's lab address, its config and data in the workdir."""
        directory = os.path.join(self.workdir, "redis")
        os.makedirs(directory, exist_ok=True)
        conf = os.path.join(directory, "redis.conf")
        with open(conf, "w") as f:
            f.write(f"bind {self.redis_host.ips[0]}\nport {REDIS_PORT}\ndir {directory}\n"
                    'daemonize no\nprotected-mode no\nsave ""\nappendonly no\n'
                    "logfile \"\"\n")
        self.redis = self.redis_host.popen([shutil.which("redis-server"), conf])
        wait_output(self.redis, lambda out: "Ready to accept connections" in out,
                    "redis-server ready", timeout)
        return f"redis://{self.redis_host.ips[0]}:{REDIS_PORT}/0"

    def start_nodes(self, url, timeout=30):
        for name, n in self.nodes.items():
            os.makedirs(n["state"], exist_ok=True)
            with open(os.path.join(n["state"], "cluster.secret"), "w") as f:
                f.write(self.secret)
            listen = [f"{ip}:{port}" for ip in n["server"].ips for port in P.LOBBY_PORTS]
            n["proc"] = n["server"].popen(
                procs.twistd("lobby", "--lobby-state-dir", n["state"], "--udp-listen",
                             ",".join(listen), "--lobby-sync-interval", "0.2",
                             "--cluster-redis", url, "--cluster-node", name,
                             "--metrics-listen", f"tcp:{METRICS_PORT}:interface=127.0.0.1"),
                cwd=procs.REPO, env=procs.env())
        for name, n in self.nodes.items():
            wait_output(n["proc"], lambda out: "connected to redis" in out,
                        f"lobby node {name} connected to redis", timeout)

    def relayed(self, name):
        """Datagrams lobby node C{name} relayed, from its metrics (read inside its namespace)."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        done = self.nodes[name]["server"].run(self.nodes[name]["server"].python(
            "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"))
        if done.returncode != 0:
            raise AssertionError(f"cannot read node {name}'s metrics: {done.stderr[-2000:]}")
        m = re.search(r'^p2pnat_udp_sent_total\{kind="relayed"\} (\S+)$', done.stdout, re.M)
        return float(m.group(1)) if m else 0.0


class LobbyClusterLabTests(LabTestCase):
    """Clients on different lobby nodes, behind the NAT pairs of L{PAIRS}."""

    tools = ("redis-server",)

    @classmethod
    def make_env(cls, workdir):
        return LobbyClusterLab(workdir)

    @classmethod
    def build(cls, cl):
        lab = cl.lab
        for a_kind, b_kind in PAIRS:
            for side, kind, node in (("a", a_kind, "n1"), ("b", b_kind, "n2")):
                s = P.SHORT[kind]
                router = lab.add_router(f"r{side}{s}", kind=kind)
                cl.add_client(f"{side}-{s}", lab.add_host(f"{side}{s}", behind=router), node)
        cl.start_nodes(cl.start_redis())
        for a_kind, b_kind in PAIRS:
            cid = f"b-{P.SHORT[b_kind]}"
            cl.start_checked_wait(cid, P.EXPECTED_NAT[b_kind], "--echo", "--no-portmap")

    def setUp(self):
        super().setUp()
        self.cl = self.env

    def trials(self, a_kind, b_kind):
        a, b = f"a-{P.SHORT[a_kind]}", f"b-{P.SHORT[b_kind]}"
        want = "direct" if P.expect_direct(a_kind, b_kind) else "relayed"
        results = []
        for _ in range(TRIALS):
            t = self.cl.connect(a, b, "--send", "ping", "--wait", "4", "--no-portmap",
                                "--no-stdin", pair=f"{a_kind} -> {b_kind}")
            self.assertEqual(t.mode, want, t.describe())
            self.assertTrue(t.echoes, t.describe())
            results.append(t)
        measured(f"{a_kind} -> {b_kind} across nodes: {want}, "
                 + ", ".join(f"{t.path['seconds']:.3f}s" for t in results))
        out1 = self.cl.nodes["n1"]["proc"].stdout()
        out2 = self.cl.nodes["n2"]["proc"].stdout()
        self.assertIn(f"{a} asks for {b} (on node n2)", out1)
        self.assertIn(f"{a} (on node n1) asks for {b}", out2)
        return results

    def test_sequential_pair_direct(self):
        """Two symmetric NATs with sequential ports, clients on two nodes: direct."""
        self.trials("symmetric-sequential", "symmetric-sequential")

    def test_random_pair_relayed(self):
        """
        Two symmetric NATs with random ports, clients on two nodes: relayed,
        by node 1 alone (B binds there directly: no hop between the nodes).
        """
        self.trials("symmetric-random", "symmetric-random")
        out1 = self.cl.nodes["n1"]["proc"].stdout()
        out2 = self.cl.nodes["n2"]["proc"].stdout()
        b_public = self.cl.clients["b-rand"].host.public_ip
        self.assertRegex(out1, r"relaying session \w+ for b-rand at " + re.escape(b_public))
        self.assertNotIn("relaying session", out2)
        # The ping and its echo of each trial at least, relayed by node 1.
        self.assertGreaterEqual(self.cl.relayed("n1"), 2 * TRIALS)
        self.assertEqual(self.cl.relayed("n2"), 0)
