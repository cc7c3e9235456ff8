"""
The relay cluster across the Linux kernel's real NATs, in the NAT lab:
three relay nodes and one Redis on the internet segment, devices behind
cone, symmetric-sequential, symmetric-random and double NAT whose agents
know all three nodes, and terminals (``curl`` over HTTPS on a public lab
host) that reach any device through any node.

What :class:`ClusterLabTests` shows:

- every node reaches every device: the first node a device reports to
  owns its NAT mapping and sends the connect request for the others;
- a device's owning node SIGKILLed in the middle of a download through
  another node: the download never notices (SHA-256 intact), and the
  device is reachable through the third node again once its agent found
  the node dead and moved (``agent.dead_after`` 6 s, and the 30 s
  default), measured; the node restarted serves them at once through
  their new node;
- Redis killed and started again, with its append-only file and then
  empty: no device lost, every device reachable through every node again
  within one notify-B interval of Redis's return, measured;
- ``p2pnat device remove`` on node 1 cuts a download from a device owned
  by node 2 through node 3 within a second, measured;
- ``p2pnat forward`` on node 2 to the cone device, owned by node 1, goes
  direct: node 1 sends the device the direct request for node 2's terminal.

The nodes run with ``relay.sync_interval`` 0.2 s (how soon a node sees a
change of its SQLite registry; 1 s by default), agents with notify B every
2 s and idle tunnels closed after 0.3 s, so that each fetch needs a connect
request, sent by the device's owning node.  The tests need root, ``ip``,
``nft``, ``conntrack``, ``curl``, ``ss`` and ``redis-server``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import json
import os
import time

from tests.support import procs
from tests.support.lab import cluster as C
from tests.support.procs import provision
from tests.support.lab import relay as F
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import wait_for_log

#: The agents' notify-B interval: recovery after Redis returns is measured against it.
B_INTERVAL = 2.0
#: agent.dead_after of most agents here (the default, 30 s, for one).
DEAD_AFTER = 6.0
DEFAULT_DEAD_AFTER = 30.0
SYNC_INTERVAL = 0.2
#: The revoked device's download: long enough to be cut in the middle.
HUGE = 4 << 30
#: A fetch that needs a connect request, a TLS tunnel and the page: well under this.
FETCH_SLACK = 2.0


class ClusterLabTests(LabTestCase):
    """
    One lab for the class: nodes n1-n3, Redis (append-only file on), a
    public terminal, and devices that each belong to one test:

    ==========  =======================  ===========  ==============================
    device      NAT                      relay order  test
    ==========  =======================  ===========  ==============================
    cone        cone                     n1 n2 n3     every node reaches it; Redis
    seq         symmetric-sequential     n2 n3 n1     "
    rand        symmetric-random         n3 n1 n2     "
    double      cone behind CGN (seq)    n1 n3 n2     "
    victim      cone                     n1 n2 n3     n1 killed (dead_after 6 s)
    patient     cone                     n1 n2 n3     n1 killed (default 30 s)
    doomed      cone                     n2 n1 n3     revoked on n1, cut on n3
    ==========  =======================  ===========  ==============================
    """

    tools = ("curl", "ss", "redis-server")
    NAT = {"cone": "cone", "seq": "symmetric-sequential", "rand": "symmetric-random",
           "double": "double"}
    ORDER = {"cone": ("n1", "n2", "n3"), "seq": ("n2", "n3", "n1"), "rand": ("n3", "n1", "n2"),
             "double": ("n1", "n3", "n2"), "victim": ("n1", "n2", "n3"),
             "patient": ("n1", "n2", "n3"), "doomed": ("n2", "n1", "n3")}

    @classmethod
    def make_env(cls, workdir):
        env = C.ClusterLab.with_docroot(workdir, ("--relay-sync-interval", str(SYNC_INTERVAL)))
        cls.big_sha256 = env.big_sha256
        return env

    @classmethod
    def build(cls, cl):
        lab = cl.lab
        cls.terminal = lab.add_host("term")
        hosts = {}
        for name, kind in cls.NAT.items():
            hosts[name] = lab.add_host(f"d{name}", behind=lab.add_router(f"r{name}", kind=kind))
        home = lab.add_router("rhome", kind="cone")
        for name in ("victim", "patient", "doomed"):
            hosts[name] = lab.add_host(name[:6], behind=home)
        for host in hosts.values():
            cl.start_web(host)
        cl.redis.start()
        # Provisioned on n1 before the nodes start: n1 merges them into
        # Redis, where n2 and n3 read them at their start.
        devices = []
        for name, host in hosts.items():
            dead_after = None if name == "patient" else DEAD_AFTER
            devices.append(cl.add_cluster_device(
                name, host, cls.ORDER[name], dead_after=dead_after, b_interval=B_INTERVAL,
                agent_args=("--agent-idle-timeout", "0.3")))
        cl.start_node("n1")
        cl.wait_registry(list(hosts))
        cl.start_node("n2")
        cl.start_node("n3")
        cl.start_agents(devices)

    def setUp(self):
        super().setUp()
        self.cl = self.env

    # -- helpers ------------------------------------------------------------------

    def check_page(self, f, device_id, node):
        self.assertEqual((f.exit, f.status), (0, 200), f"{device_id} via {node}: {f.describe()}")
        self.assertEqual(f.body, F.INDEX, f"{device_id} via {node}: wrong content")
        os.unlink(f.path)

    def fetch_ok(self, node, device_id, max_time=15):
        f = self.cl.fetch(self.terminal, device_id, "/", node=node, max_time=max_time)
        self.check_page(f, device_id, node)
        return f

    def wait_tunnel(self, device_id, node, timeout=10):
        """Wait until the device has a tunnel open to ``node``."""
        host = self.cl.devices[device_id].host
        deadline = time.monotonic() + timeout
        while not self.cl.tunnels_to(host, node):
            self.assertLess(time.monotonic(), deadline, f"{device_id}: no tunnel to {node}")
            time.sleep(0.05)

    def reachable_everywhere(self, device_ids, since, bound):
        """
        Fetch every device through every node (all at once, again and again)
        until each pair succeeded; each must have by ``bound`` seconds after
        ``since``.  Return the seconds after ``since`` of the last success.
        """
        pending = {(d, n) for d in device_ids for n in C.NODES}
        last, answers = 0.0, {}
        while pending:
            started = time.monotonic()
            running = {p: self.cl.start_fetch(self.terminal, p[0], "/", node=p[1], max_time=8)
                       for p in sorted(pending)}
            for (device_id, node), proc in running.items():
                f = F.finish_fetch(proc, timeout=20)
                if (f.exit, f.status) == (0, 200):
                    self.check_page(f, device_id, node)
                    pending.discard((device_id, node))
                    last = max(last, started + f.seconds - since)
                elif f.status not in (503, 504, 0):
                    self.fail(f"{device_id} via {node}: {f.describe()}")
                else:
                    answers[device_id, node] = f.describe()
            if pending:
                self.assertLess(time.monotonic() - since, bound,
                                f"not reachable {bound:.1f}s after: " + "; ".join(
                                    f"{p}: {answers[p]}" for p in sorted(pending)))
                time.sleep(0.1)
        self.assertLess(last, bound, f"the last device was reachable only after {last:.2f}s")
        return last

    # -- the tests ----------------------------------------------------------------

    def test_cone_direct_through_another_node(self):
        """
        ``p2pnat forward`` on the public terminal, through n2, to the device
        behind the cone NAT, whose notifies reach n1: n1 sends the direct
        request, n2 offers it, and the page comes over the direct path.
        """
        self.assertEqual(self.cl.owner("cone"), "n1")
        n2 = self.cl.nodes["n2"].ip
        fwd = self.terminal.popen(procs.p2pnat(
            "forward", "cone", "--relay", f"{n2}:{F.HTTPS_PORT}", "--relay-hostname",
            F.RELAY_HOSTNAME, "--ca", self.cl.ca, "--listen", "127.0.0.1:2400", "--json"),
            cwd=procs.REPO, env=procs.env())
        self.addCleanup(fwd.stop)
        wait_for_log(fwd, '"event": "forwarding"', timeout=20)
        out = os.path.join(self.cl.workdir, "direct-cone.html")
        done = self.terminal.run(["curl", "-sS", "--max-time", "15", "-o", out,
                                  "http://127.0.0.1:2400/"], timeout=30)
        self.assertEqual(done.returncode, 0, f"{done.stderr} {fwd.stderr()[-2000:]}")
        with open(out, "rb") as f:
            self.assertEqual(f.read(), F.INDEX)
        os.unlink(out)
        paths = [json.loads(line)["path"] for line in fwd.stdout().splitlines()
                 if '"event": "path"' in line]
        self.assertEqual(paths, ["direct"], fwd.stderr()[-2000:])

    def test_every_node_reaches_every_device(self):
        """
        Terminals hitting n1, n2, n3 in turn each reach every device behind
        every kind of NAT; the device's notifies reach only its first node,
        which sends the connect requests for the other two.
        """
        times = {}
        for name in self.NAT:
            self.assertEqual(self.cl.owner(name), self.ORDER[name][0])
        for node in C.NODES:
            for name in self.NAT:
                times[name, node] = self.fetch_ok(node, name).seconds
        # Each cross-node fetch had its connect request sent by the owner.
        for name in self.NAT:
            agent = self.cl.devices[name].agent.stdout()
            self.assertGreaterEqual(agent.count("connect request for session"), 3, name)
        measured("first page, s: " + ", ".join(
            f"{name}@{node} {t:.2f}" for (name, node), t in sorted(times.items())))

    def test_owner_killed_mid_transfer(self):
        """
        The victim's and the patient's node, n1, is SIGKILLed while the
        victim's 20 MB download runs through n2.  The download completes
        intact (it never touched n1); through n3 both devices are refused
        with a quick 503 until their agents find n1 dead and move on (to n2,
        their next), then served again, within ``dead_after`` plus a
        notify and a fetch.
        """
        cl = self.cl
        self.addCleanup(self.restart_n1)
        for name in ("victim", "patient"):
            self.assertEqual(cl.owner(name), "n1")
        download = cl.start_fetch(self.terminal, "victim", "/big.bin", node="n2",
                                  extra=("--limit-rate", "4M"), max_time=60)
        self.wait_tunnel("victim", "n2")
        time.sleep(1.0)
        self.assertIsNone(download.poll(), "the download ended before the kill")
        cl.kill_node("n1")
        killed = time.monotonic()
        back = {}
        while len(back) < 2:
            for name, bound in (("victim", DEAD_AFTER), ("patient", DEFAULT_DEAD_AFTER)):
                if name in back:
                    continue
                f = cl.fetch(self.terminal, name, "/", node="n3", max_time=8)
                if f.status == 200:
                    self.check_page(f, name, "n3")
                    back[name] = time.monotonic() - killed
                else:
                    self.assertEqual(f.status, 503, f"{name} via n3: {f.describe()}")
                    self.assertLess(f.seconds, 1.0, f"{name}: 503 only after {f.seconds:.2f}s")
                    self.assertLess(time.monotonic() - killed, bound + B_INTERVAL + FETCH_SLACK,
                                    f"{name} not reachable again through n3")
            time.sleep(0.2)
        result = F.finish_fetch(download, timeout=60)
        self.assertEqual((result.exit, result.status), (0, 200), result.describe())
        self.assertEqual(F.sha256_file(result.path), self.big_sha256, "download corrupted")
        os.unlink(result.path)
        self.assertEqual(cl.owner("victim"), "n2")
        self.assertEqual(cl.owner("patient"), "n2")
        # n1 back: its store still has both devices' addresses and recent
        # notify A, but they report to n2 now, which must send the connect
        # requests for n1's terminals.
        cl.start_node("n1")
        for name in ("victim", "patient"):
            self.fetch_ok("n1", name, max_time=5)
        measured(f"n1 killed: victim (dead_after {DEAD_AFTER:.0f}s) back through n3 after"
                 f" {back['victim']:.2f}s, patient (default {DEFAULT_DEAD_AFTER:.0f}s) after"
                 f" {back['patient']:.2f}s; 20 MB through n2 intact in {result.seconds:.1f}s")

    def restart_n1(self):
        if "n1" not in self.cl.daemons:
            self.cl.start_node("n1")

    def test_redis_restarted(self):
        """
        Redis SIGKILLed and started again, first with its append-only file,
        then stopped and started empty: while it is away the nodes say so
        (``lost redis``); when it is back no device is missing from the
        registry and every device is reachable through every node within one
        notify-B interval of the nodes' reconnection (plus a fetch).
        """
        cl = self.cl
        devices = list(self.NAT)
        self.reachable_everywhere(devices, time.monotonic(), 30)
        for how in ("with its append-only file", "empty"):
            starts = {n: len(p.stdout()) for n, p in cl.daemons.items()}
            if how == "empty":
                cl.redis.kill()
                cl.redis.wipe()
            else:
                time.sleep(1.2)  # appendfsync everysec: the file has what was written
                cl.redis.kill()
            for n, p in cl.daemons.items():
                wait_for_log(p, "lost redis", starts[n], timeout=10)
            returned = time.monotonic()
            cl.redis.start()
            for n, p in cl.daemons.items():
                wait_for_log(p, "connected to redis", starts[n], timeout=15)
            reconnected = time.monotonic() - returned
            took = self.reachable_everywhere(devices, returned,
                                             reconnected + B_INTERVAL + FETCH_SLACK)
            for d in cl.devices:
                self.assertEqual(cl.redis.cli("HEXISTS", "p2pnat:registry", d), "1",
                                 f"{d} lost from the registry ({how})")
            measured(f"redis back {how}: nodes reconnected after {reconnected:.2f}s, every"
                     f" device through every node after {took:.2f}s")

    def test_revocation_on_n1_cuts_a_download_on_n3(self):
        """
        ``doomed`` reports to n2; its download runs through n3; ``p2pnat
        device remove`` runs on n1's registry.  Within a second the tunnel
        to n3 is closed and the terminal's download ends, short; then n3
        answers 403 at once.
        """
        cl = self.cl
        self.assertEqual(cl.owner("doomed"), "n2")
        # At full speed, so that what the terminal's kernel buffered before
        # the cut is read at once (curl reading slowly would show a cut
        # only seconds after it): 4 GiB of zeros, sparse, read fast.
        huge = os.path.join(cl.docroot, "huge.bin")
        with open(huge, "wb") as f:
            f.truncate(HUGE)
        self.addCleanup(os.unlink, huge)
        download = cl.start_fetch(self.terminal, "doomed", "/huge.bin", node="n3", max_time=60)
        host = cl.devices["doomed"].host
        self.wait_tunnel("doomed", "n3")
        time.sleep(0.5)
        self.assertIsNone(download.poll(), "the download ended early")
        # In this process (no interpreter to start): the clock starts as the
        # command starts, and its SQLite write is the revocation.
        removed = time.monotonic()
        provision("device", "remove", "doomed", "--state-dir", cl.states["n1"])
        closed = ended = None
        while closed is None or ended is None:
            now = time.monotonic() - removed
            if closed is None and not cl.tunnels_to(host, "n3"):
                closed = now
            if ended is None and download.poll() is not None:
                ended = now
            self.assertLess(now, 10.0, f"tunnel closed after {closed}, curl ended {ended}")
            time.sleep(0.02)
        result = F.finish_fetch(download)
        self.assertNotEqual(result.exit, 0, result.describe())
        got = os.path.getsize(result.path)
        self.assertLess(got, HUGE)
        os.unlink(result.path)
        f = cl.fetch(self.terminal, "doomed", "/", node="n3")
        self.assertEqual(f.status, 403, f.describe())
        self.assertLess(f.seconds, 0.5, f.describe())
        measured(f"revoked on n1: tunnel to n3 closed after {closed * 1000:.0f} ms, the"
                 f" terminal's download ended after {ended * 1000:.0f} ms at"
                 f" {got / 1e6:.0f} MB, from the start of `device remove` (node sync interval"
                 f" {SYNC_INTERVAL * 1000:.0f} ms included)")
        self.assertLess(closed, 1.0)
        self.assertLess(ended, 1.0)

