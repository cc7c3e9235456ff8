"""
The relay path's NAT lab (see ``tests/lab/test_relay_lab.py``).

:class:`RelayLab` is a :class:`~tests.support.lab.cases.LabSetup`: a relay
server on the internet segment, run from this source tree with a state
directory made by ``p2pnat relay init``; devices provisioned with ``p2pnat
device add`` whose agents and web servers run as processes in their hosts'
namespaces; and ``curl`` run in a terminal host's namespace.
"""

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from tests.support import procs
from tests.support.lab.cases import LabSetup
from tests.support.lab.running import wait_for_log

RELAY_HOSTNAME = "relay.test"
UDP_PORT = 7478
TUNNEL_PORT = 7443
HTTPS_PORT = 8443
WEB_PORT = 8080

#: The device web server's pages: a small one checked byte for byte (with
#: bytes a text-mangling hop would change) and a 20 MB one checked by hash.
INDEX = ("<!doctype html><html><head><meta charset='utf-8'><title>p2pnat lab device</title>"
         "</head><body><h1>Device page</h1><p>caf\u00e9 \u2603 \u00fc\u00df \r\n"
         "line\tend</p></body></html>\n").encode("utf-8")
BIG_SIZE = 20 * 1024 * 1024


def make_docroot(path):
    """
    Write the device web server's directory: ``index.html`` (:data:`INDEX`)
    and ``big.bin`` (20 MB of random bytes).  Return the big file's SHA-256.
    """
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "index.html"), "wb") as f:
        f.write(INDEX)
    big = os.urandom(BIG_SIZE)
    with open(os.path.join(path, "big.bin"), "wb") as f:
        f.write(big)
    return hashlib.sha256(big).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Fetch:
    """What one curl run in a terminal got."""

    exit: int
    status: int
    seconds: float  # curl's time_total: connect, request and whole response
    path: str  # where the body was written
    stderr: str
    argv: list = field(default_factory=list)

    @property
    def body(self):
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def describe(self):
        return (f"curl exit {self.exit}, HTTP {self.status}, {self.seconds:.3f}s;"
                f" stderr {self.stderr.strip()!r}; body {self.body[:300]!r}")


@dataclass
class Device:
    """A provisioned device: its host, bundle, agent process and credential."""

    id: str
    host: object
    bundle: str
    web_port: int
    b_interval: float
    agent_args: list
    agent: object = None
    credential: str = None


class RelayLab(LabSetup):
    """
    A NAT lab with one relay (``relay.test`` on the internet segment) and
    helpers to add devices, run the relay and fetch pages from terminals.

    ``workdir`` holds the relay's state directory, device bundles and what
    terminals download; ``docroot`` is what the devices' web servers
    serve (:func:`make_docroot`); ``relay_args`` are extra ``twistd relay``
    options.  The caller closes it (:meth:`close`).
    """

    @classmethod
    def with_docroot(cls, workdir, relay_args=()):
        """
        One whose devices serve ``workdir/www``, made here
        (:func:`make_docroot`); its ``big_sha256`` is the big file's SHA-256.
        """
        docroot = os.path.join(workdir, "www")
        big_sha256 = make_docroot(docroot)
        env = cls(workdir, docroot, relay_args)
        env.big_sha256 = big_sha256
        return env

    def __init__(self, workdir, docroot, relay_args=()):
        self.docroot = docroot
        self.state = os.path.join(workdir, "state")
        self.ca = os.path.join(self.state, "ca.crt")
        self.relay_args = list(relay_args)
        self.devices = {}
        self.relay = None
        self._fetches = 0
        super().__init__(workdir)

    def setup(self):
        self.relay_node = self.lab.add_server("relay")
        self.relay_ip = self.relay_node.ip
        self.cli("relay", "init", "--state-dir", self.state, "--hostname", RELAY_HOSTNAME,
                 "--udp", f"{self.relay_ip}:{UDP_PORT}", "--tunnel-port", str(TUNNEL_PORT))

    # -- commands and daemons ---------------------------------------------

    def cli(self, *args, check=True):
        """Run ``p2pnat ARGS`` (outside the lab: it only touches files)."""
        done = subprocess.run(procs.p2pnat(*args), cwd=procs.REPO, env=procs.env(),
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"p2pnat {' '.join(args)} failed ({done.returncode}):"
                                 f" {done.stderr.strip()}")
        return done

    def relay_argv(self):
        ip = self.relay_ip
        return procs.twistd(
            "relay", "--relay-state-dir", self.state, "--relay-hostname", RELAY_HOSTNAME,
            "--udp-listen", f"{ip}:{UDP_PORT}",
            "--tunnel-listen", f"tcp:{TUNNEL_PORT}:interface={ip}",
            "--terminal-https", f"tcp:{HTTPS_PORT}:interface={ip}",
            *self.relay_args)

    def start_relay(self, timeout=30):
        """Start the relay and wait until it listens; return its process."""
        proc = self.relay_node.popen(self.relay_argv(), cwd=procs.REPO, env=procs.env())
        wait_for_log(proc, rf"relay {re.escape(RELAY_HOSTNAME)}: \d+ devices registered",
                     timeout=timeout)
        self.relay = proc
        return proc

    def stop_relay(self):
        self.relay.stop(grace=5)

    def start_web(self, host, port=WEB_PORT, timeout=20):
        """Serve the docroot from ``host`` on 127.0.0.1:``port``."""
        proc = host.popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                           "--directory", self.docroot], env=procs.env())
        wait_for_log(proc, "Serving HTTP", timeout=timeout)
        return proc

    def add_device(self, device_id, host, *, web_port=WEB_PORT, access="device",
                   b_interval=2.0, agent_args=(), start=True):
        """
        Provision ``device_id`` (``p2pnat device add``) for a web server on
        ``host`` and, with ``start``, run its agent and wait until the relay
        has its notify A.  With ``access="relay"`` a credential is generated
        and kept in :attr:`Device.credential`.
        """
        bundle = os.path.join(self.workdir, f"dev-{device_id}")
        args = ["device", "add", device_id, "--state-dir", self.state,
                "--relay", f"{self.relay_ip}:{UDP_PORT}", "--service", f"127.0.0.1:{web_port}",
                "--out", bundle, "--access", access]
        if access == "relay":
            args.append("--generate-credential")
        done = self.cli(*args)
        device = Device(device_id, host, bundle, web_port, b_interval, list(agent_args))
        m = re.search(r"access credential \(shown only now; stored hashed\): (\S+)", done.stdout)
        if m:
            device.credential = m.group(1)
        self.devices[device_id] = device
        if start:
            self.start_agent(device)
        return device

    def start_agent(self, device, timeout=30):
        """Run ``device``'s agent; return once the relay logged it online."""
        self.start_agents([device], timeout)
        return device.agent

    def start_agents(self, devices, timeout=30):
        """Run several devices' agents at once; return once all are online."""
        start = len(self.relay.stdout())
        for device in devices:
            self.spawn_agent(device)
        for device in devices:
            self.wait_online(device.id, start, timeout)

    def spawn_agent(self, device):
        """Start ``device``'s agent in its host (not waiting for anything)."""
        device.agent = device.host.popen(
            procs.twistd("device-agent", "--config", os.path.join(device.bundle, "agent.toml"),
                         "--agent-notify-b-interval", str(device.b_interval),
                         *device.agent_args),
            cwd=procs.REPO, env=procs.env())

    def wait_online(self, device_id, start=0, timeout=30):
        """Wait for the relay's "device ID online at ADDR" line; return ADDR."""
        m = wait_for_log(self.relay, rf"device {re.escape(device_id)} online at (\S+)", start,
                         timeout)
        return m.group(1)

    def tunnels(self, host):
        """How many TCP connections ``host`` has open to the relay's tunnel port."""
        done = host.run(["ss", "-Htn", "state", "established", f"( dport = :{TUNNEL_PORT} )"],
                        timeout=10)
        return len(done.stdout.strip().splitlines())

    # -- terminals ----------------------------------------------------------

    def url(self, device_id, path="/"):
        return f"https://{device_id}.{RELAY_HOSTNAME}:{HTTPS_PORT}{path}"

    def curl_argv(self, device_id, path="/", out=None, max_time=30, extra=()):
        if out is None:
            self._fetches += 1
            out = os.path.join(self.workdir, f"fetch-{self._fetches}")
        return out, ["curl", "-sS", "--max-time", str(max_time), "-o", out,
                     "-w", "%{http_code} %{time_total}",
                     "--resolve", f"{device_id}.{RELAY_HOSTNAME}:{HTTPS_PORT}:{self.relay_ip}",
                     "--cacert", self.ca, *extra, self.url(device_id, path)]

    def fetch(self, terminal, device_id, path="/", *, max_time=30, extra=()):
        """Run curl in ``terminal`` for the device's ``path``; a :class:`Fetch`."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra)
        done = terminal.run(argv, timeout=max_time + 15)
        return parse_curl(done.returncode, done.stdout, done.stderr, out, argv)

    def start_fetch(self, terminal, device_id, path="/", *, max_time=30, extra=()):
        """Start curl in the background; finish it with :func:`finish_fetch`."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra)
        proc = terminal.popen(argv)
        proc.out_path = out
        return proc


def finish_fetch(proc, timeout=60):
    """Wait for a curl started by :meth:`RelayLab.start_fetch`; a :class:`Fetch`."""
    code = proc.wait(timeout)
    return parse_curl(code, proc.stdout(), proc.stderr(), proc.out_path, proc.argv)


def parse_curl(code, stdout, stderr, out, argv):
    status, seconds = 0, -1.0
    parts = stdout.strip().split()
    if len(parts) == 2:
        status, seconds = int(parts[0]), float(parts[1])
    return Fetch(code, status, seconds, out, stderr, argv)
