"""
The relay cluster's NAT lab (see ``tests/lab/test_cluster_lab.py``).

:class:`ClusterLab` is a :class:`~tests.support.lab.relay.RelayLab` with
three relay nodes (``n1``, ``n2``, ``n3``) instead of one, each a server of
its own on the internet segment, and a Redis they share on a fourth
(:class:`LabRedis`, a ``redis-server`` of the test's own run in that
server's namespace with its own config).  The nodes share the state files
``p2pnat relay init`` made for ``n1`` (CA, certificate, terminal secret),
copied before any device is added: devices are provisioned on ``n1`` only
and reach the other nodes through Redis.  Device agents get the three
nodes as their relay list, in an order of the test's choice, so the test
picks which node owns each device.
"""

import os
import re
import shutil
import time

from p2pnat.deployment.provision import terminal_secret
from tests.support import procs
from tests.support.lab.relay import (HTTPS_PORT, RELAY_HOSTNAME, TUNNEL_PORT, UDP_PORT,
                                     RelayLab, parse_curl)
from tests.support.lab.running import wait_for_log

NODES = ("n1", "n2", "n3")
REDIS_PORT = 6379


class LabRedis:
    """
    A ``redis-server`` in a lab server's namespace, listening on that
    server's address with a config file and data directory of its own
    (``workdir``) and a random password (``requirepass``: outside
    loopback, Redis refuses clients without one); the append-only file on
    (``appendfsync everysec``, as ``docs/cluster.rst`` recommends) unless
    ``appendonly`` is false.  The lab ends it with its other processes.
    """

    def __init__(self, node, workdir, port=REDIS_PORT, appendonly=True):
        self.node = node
        self.port = port
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "redis.conf")
        self.password = os.urandom(12).hex()
        with open(self.config, "w") as f:
            f.write(f"bind {node.ip}\nport {port}\ndir {self.dir}\n"
                    f"logfile {os.path.join(self.dir, 'redis.log')}\ndaemonize no\n"
                    f'requirepass {self.password}\nsave ""\n'
                    f"appendonly {'yes' if appendonly else 'no'}\nappendfsync everysec\n")
        self.proc = None

    @property
    def url(self):
        return f"redis://:{self.password}@{self.node.ip}:{self.port}/0"

    def start(self, timeout=10.0):
        """Start it (again, on the same data directory) and wait until it answers PING."""
        self.proc = self.node.popen(["redis-server", self.config], cwd=self.dir)
        deadline = time.monotonic() + timeout
        while self.cli("PING") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start: {self.proc.describe()}")
            time.sleep(0.05)

    def kill(self):
        """SIGKILL, a crash: what the append-only file has not got yet is lost."""
        self.proc.popen.kill()
        self.proc.wait(10)

    def wipe(self):
        """Forget everything on disk (only while it is not running): it comes back empty."""
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("wipe a stopped redis-server only")
        for name in os.listdir(self.dir):
            if name not in ("redis.conf", "redis.log"):
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)

    def cli(self, *args):
        """One command with ``redis-cli`` from the server's namespace: its output, stripped."""
        done = self.node.run(["redis-cli", "-h", self.node.ip, "-p", str(self.port),
                              "-a", self.password, "--no-auth-warning", *args],
                             timeout=10)
        return done.stdout.strip()


class ClusterLab(RelayLab):
    """
    A NAT lab with three relay nodes sharing a Redis; see the module.

    :attr:`nodes` maps a node's name to its server (a lab host);
    :attr:`daemons` to its running ``twistd relay`` (or None).  The
    inherited :attr:`state` and :attr:`relay_ip` are ``n1``'s, where
    :meth:`add_device` provisions devices.
    """

    def __init__(self, workdir, docroot, relay_args=()):
        self.daemons = {}
        self.nodes = {}
        self.states = {}
        super().__init__(workdir, docroot, relay_args)

    def setup(self):
        for name in NODES:
            self.nodes[name] = self.lab.add_server(name)
        self.redis_node = self.lab.add_server("redis")
        self.relay_node = self.nodes["n1"]
        self.relay_ip = self.relay_node.ip
        self.cli("relay", "init", "--state-dir", self.state, "--hostname", RELAY_HOSTNAME,
                 "--udp", f"{self.relay_ip}:{UDP_PORT}", "--tunnel-port", str(TUNNEL_PORT))
        # `p2pnat relay init` leaves terminal.secret to the relay's first
        # start, so a state directory copied right after it would give each
        # node a secret of its own, and nodes would refuse each other's
        # records and messages.  Make it now, with the relay's own function.
        terminal_secret(self.state)
        for name in NODES:
            self.states[name] = self.state if name == "n1" else os.path.join(
                self.workdir, f"state-{name}")
            if name != "n1":
                shutil.copytree(self.state, self.states[name])
        self.redis = LabRedis(self.redis_node, self.workdir)

    # -- nodes ----------------------------------------------------------------

    def node_argv(self, name):
        ip = self.nodes[name].ip
        return procs.twistd(
            "relay", "--relay-state-dir", self.states[name], "--relay-hostname", RELAY_HOSTNAME,
            "--udp-listen", f"{ip}:{UDP_PORT}",
            "--tunnel-listen", f"tcp:{TUNNEL_PORT}:interface={ip}",
            "--terminal-https", f"tcp:{HTTPS_PORT}:interface={ip}",
            "--cluster-redis", self.redis.url, "--cluster-node", name, *self.relay_args)

    def start_node(self, name, timeout=30):
        """Start node ``name``; return its process once it listens and has Redis."""
        proc = self.nodes[name].popen(self.node_argv(name), cwd=procs.REPO, env=procs.env())
        self.daemons[name] = proc
        wait_for_log(proc, rf"relay {re.escape(RELAY_HOSTNAME)}: \d+ devices registered",
                     timeout=timeout)
        wait_for_log(proc, r"connected to redis", timeout=timeout)
        return proc

    def kill_node(self, name):
        """SIGKILL node ``name`` (a crash: no goodbye to Redis or devices)."""
        proc = self.daemons.pop(name)
        proc.popen.kill()
        proc.wait(10)
        return proc

    def relay_address(self, name):
        return f"{self.nodes[name].ip}:{UDP_PORT}"

    def wait_registry(self, device_ids, timeout=15):
        """Wait until the registry in Redis has every one of ``device_ids``."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [d for d in device_ids
                       if self.redis.cli("HEXISTS", "p2pnat:registry", d) != "1"]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not in redis's registry after {timeout}s: {missing}")
            time.sleep(0.1)

    # -- devices --------------------------------------------------------------

    def add_cluster_device(self, device_id, host, order, *, dead_after=6.0, agent_args=(),
                           **kw):
        """
        Provision ``device_id`` on ``n1`` for a web server on ``host``; its
        agent (not started) gets the nodes in ``order`` (names), the first
        being the one it reports to, and ``dead_after`` (None: the default).
        """
        args = ["--agent-relay", ",".join(self.relay_address(n) for n in order)]
        if dead_after is not None:
            args += ["--agent-dead-after", str(dead_after)]
        device = self.add_device(device_id, host, agent_args=args + list(agent_args),
                                 start=False, **kw)
        device.order = list(order)
        return device

    def start_agents(self, devices, timeout=30):
        """Run the agents; return once each one's first node logged it online."""
        starts = {name: len(proc.stdout()) for name, proc in self.daemons.items()}
        self.relay = None  # RelayLab's single relay: none here
        for device in devices:
            self.spawn_agent(device)
        for device in devices:
            node = device.order[0]
            self.wait_online_at(node, device.id, starts[node], timeout)

    def wait_online_at(self, node, device_id, start=0, timeout=30):
        """Wait for node ``node``'s "device ID online at ADDR" line; return ADDR."""
        m = wait_for_log(self.daemons[node], rf"device {re.escape(device_id)} online at (\S+)",
                         start, timeout)
        return m.group(1)

    def owner(self, device_id):
        """The node named by the device's live entry in Redis (None: no entry)."""
        text = self.redis.cli("GET", f"p2pnat:live:{device_id}")
        m = re.search(r'"node":\s*"([^"]+)"', text)
        return m.group(1) if m else None

    def tunnels_to(self, host, node):
        """How many TCP connections ``host`` has open to ``node``'s tunnel port."""
        ip = self.nodes[node].ip
        done = host.run(["ss", "-Htn", "state", "established",
                         f"( dst {ip} and dport = :{TUNNEL_PORT} )"], timeout=10)
        return len(done.stdout.strip().splitlines())

    # -- terminals --------------------------------------------------------------

    def curl_argv(self, device_id, path="/", out=None, max_time=30, extra=(), node="n1"):
        """curl for the device's ``path`` through node ``node`` (RelayLab's, one node further)."""
        out, argv = super().curl_argv(device_id, path, out, max_time, extra)
        pinned = f"{device_id}.{RELAY_HOSTNAME}:{HTTPS_PORT}:{self.relay_ip}"
        argv[argv.index(pinned)] = pinned.rsplit(":", 1)[0] + ":" + self.nodes[node].ip
        return out, argv

    def fetch(self, terminal, device_id, path="/", *, max_time=30, extra=(), node="n1"):
        """Run curl in ``terminal`` for the device's ``path`` through ``node``; a Fetch."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra, node=node)
        done = terminal.run(argv, timeout=max_time + 15)
        return parse_curl(done.returncode, done.stdout, done.stderr, out, argv)

    def start_fetch(self, terminal, device_id, path="/", *, max_time=30, extra=(), node="n1"):
        """curl in the background through ``node``; finish it with ``finish_fetch``."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra, node=node)
        proc = terminal.popen(argv)
        proc.out_path = out
        return proc
