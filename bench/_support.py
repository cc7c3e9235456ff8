"""
What the relay benchmarks share: finding tools and free ports, running the
relay, the device agent, nginx and socat as processes from this source
tree (see tests/procs.py), reading their metrics and /proc figures, and
printing small tables.

Every process a benchmark starts leads its own process group and is ended
by that group's id (never by name); every wait here is bounded.
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support import procs  # noqa: E402  (needs REPO on the path)

HOSTNAME = "relay.localhost"
DEVICE = "cam1"
_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])


class BenchError(Exception):
    """A benchmark cannot run or went wrong: printed as one line, exit 2."""


def main(run):
    """Run C{run()}; a L{BenchError} or ^C ends it with a one-line message."""
    try:
        run()
    except BenchError as e:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {e}\n")
        raise SystemExit(2)
    except KeyboardInterrupt:
        raise SystemExit(130)


def which(tool):
    return shutil.which(tool) or shutil.which(tool, path=_SBIN)


def need(*tools):
    """
    The paths of C{tools} (Debian package names are the tool names here);
    fail with how to install them if one is missing.
    """
    paths, missing = [], []
    for tool in tools:
        path = which(tool)
        (paths if path else missing).append(path or tool)
    if missing:
        raise BenchError(
            f"needs {', '.join(missing)}, not found: sudo apt-get install {' '.join(missing)}"
            " (or sudo scripts/install-system-packages bench/packages.txt, which installs"
            " what the benchmarks need)")
    return paths if len(paths) > 1 else paths[0]


def need_root(why):
    if os.geteuid() != 0:
        raise BenchError(f"needs root ({why}): run it with sudo")


def need_lab(*tools):
    """
    What a NAT-lab benchmark needs before it starts: root, ``ip`` and
    ``nft`` and C{tools} (see L{need}), and a kernel the lab runs on
    (L{p2pnat.lab.unavailable_reason}); else a L{BenchError} saying which.
    """
    need_root("network namespaces for the NAT lab")
    need("ip", "nft", *tools)
    from p2pnat.lab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BenchError(f"the NAT lab is unavailable: {reason}")


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    """A port free right now on C{host} (TCP, or UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, proc=None, interval=0.05):
    """Poll C{predicate} until true; fail after C{timeout} seconds or if C{proc} exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.name} exited (status {proc.poll()}) while waiting for"
                             f" {what}\n{proc.tail()}")
        if time.monotonic() > deadline:
            detail = f"\n{proc.tail()}" if proc is not None else ""
            raise BenchError(f"no {what} after {timeout:g}s{detail}")
        time.sleep(interval)


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """
    A process of the benchmark: own process group, output to a file in
    C{workdir}; L{stop} ends the group (TERM, then KILL).
    """

    def __init__(self, name, argv, workdir, cwd=None, env=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    def output(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self, n=1500):
        return f"--- {self.name} ({' '.join(self.argv)[:200]}):\n{self.output()[-n:]}"

    def stop(self, grace=3.0):
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        # Children left in the group (nginx workers) go with it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Processes:
    """The benchmark's processes, all ended on exit (also on failure)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, argv, **kw):
        p = Proc(name, argv, self.workdir, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            p.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        return False


def workdir(name):
    """A private temporary directory (removed by the caller's cleanup)."""
    d = tempfile.mkdtemp(prefix=f"p2pnat-bench-{name}-")
    os.chmod(d, 0o755)  # nginx workers (www-data) read the files under it
    return d


# -- /proc -------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of C{pid}, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid):
    """(utime, stime) of C{pid}, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def tree_cpu_seconds(pid):
    """
    CPU seconds of C{pid}, of its children that ended (cutime, cstime) and
    of those still running (nginx workers, socat's forks), recursively.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    own = sum(int(v) for v in fields[11:15]) / _TICK
    return own + sum(tree_cpu_seconds(k) for k in kids)


def children_cpu_seconds():
    """CPU seconds of this process's children that ended (wrk, curl runs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_cpu():
    """The first line of /proc/stat: jiffies by kind (user, system, softirq, steal...)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return dict(zip(names, values), total=sum(values))


def machine_split(before, after):
    """
    How the machine's CPUs were used between two L{machine_cpu} readings,
    in cores: C{busy} (everything but idle), C{procs} (user and system time
    of processes), C{irq} (interrupts and softirqs: much of the loopback
    network work is counted there, not in any process) and C{steal}.
    """
    d = {k: after[k] - before[k] for k in after}
    cores = os.cpu_count() / d["total"] if d["total"] else float("nan")
    return {"busy": (d["total"] - d["idle"] - d["iowait"]) * cores,
            "procs": (d["user"] + d["nice"] + d["system"]) * cores,
            "irq": (d["irq"] + d["softirq"]) * cores, "steal": d["steal"] * cores}


def machine_busy(before, after):
    """How busy the machine's CPUs were between two L{machine_cpu} readings, in cores."""
    return machine_split(before, after)["busy"]


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def status_kb(pid, key):
    """A C{kB} field of /proc/PID/status (VmRSS, VmHWM...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} for pid {pid}")


def children_rss_kb(pid):
    """RSS of C{pid} plus its direct children (nginx master and workers)."""
    total = status_kb(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:
        kids = []
    for k in kids:
        try:
            total += status_kb(k, "VmRSS")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


# -- metrics -------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def metrics(port):
    """The samples of a daemon's /metrics: {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text):
    """Prometheus text format to {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(samples, name):
    """Sum of every sample of C{name} (all labels)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# -- the relay path on loopback --------------------------------------------------

def provision(work, udp_port, tunnel_port, service_port, device=DEVICE, hostname=HOSTNAME,
              relay_ip="127.0.0.1"):
    """
    ``p2pnat relay init`` and ``p2pnat device add`` (as a person would run
    them); returns (state dir, agent bundle dir).
    """
    state = os.path.join(work, "state")
    bundle = os.path.join(work, device)
    run_cli(["relay", "init", "--state-dir", state, "--hostname", hostname,
             "--udp", f"{relay_ip}:{udp_port}", "--tunnel-port", str(tunnel_port)])
    run_cli(["device", "add", device, "--state-dir", state,
             "--service", f"127.0.0.1:{service_port}", "--out", bundle])
    return state, bundle


def run_cli(args, timeout=60):
    done = subprocess.run(procs.p2pnat(*args), cwd=procs.REPO, env=procs.env(),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"p2pnat {' '.join(args[:2])} failed ({done.returncode}):"
                         f" {done.stderr.strip()[-800:]}")
    return done.stdout


class RelayPath:
    """
    A relay and one device agent on loopback, the agent forwarding to
    C{service_port}: ports are picked free, terminals are reached at
    ``https://cam1.relay.localhost:https_port/`` (resolve to 127.0.0.1) and
    plain ``http`` on C{http_port}.  With C{fast_path} false both run
    Twisted's stock TLS (``--tls-fast-path false``); C{name} keeps a second
    path's files apart.
    """

    def __init__(self, processes, work, service_port, relay_args=(), agent_args=(),
                 fast_path=True, name=""):
        self.processes = processes
        if not fast_path:
            # Twisted's stock TLS and transports on both daemons
            # (tls.fast_path = false): the baseline for p2pnat.net.fastio.
            relay_args = ("--tls-fast-path", "false", *relay_args)
            agent_args = ("--tls-fast-path", "false", *agent_args)
        if name:
            work = os.path.join(work, name)
            os.makedirs(work)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tunnel_port = free_port()
        self.https_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.state, self.bundle = provision(work, self.udp_port, self.tunnel_port, service_port)
        self.ca = os.path.join(self.state, "ca.crt")
        self.relay = processes.start(f"relay{name and '-' + name}", procs.twistd(
            "relay", "--relay-state-dir", self.state, "--relay-hostname", HOSTNAME,
            "--udp-listen", f"127.0.0.1:{self.udp_port}",
            "--tunnel-listen", f"tcp:{self.tunnel_port}:interface=127.0.0.1",
            "--terminal-https", f"tcp:{self.https_port}:interface=127.0.0.1",
            "--terminal-http", f"tcp:{self.http_port}:interface=127.0.0.1",
            "--metrics-listen", f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--log-level", "warn", *relay_args), cwd=procs.REPO, env=procs.env())
        wait_until(lambda: port_open(self.http_port) and port_open(self.metrics_port), 30,
                   "relay listening", self.relay)
        self.agent = processes.start(f"agent{name and '-' + name}", procs.twistd(
            "device-agent", "--config", os.path.join(self.bundle, "agent.toml"),
            "--agent-relay", f"127.0.0.1:{self.udp_port}", "--log-level", "warn",
            *agent_args), cwd=procs.REPO, env=procs.env())
        wait_until(self._device_online, 30, "notify A from the agent at the relay", self.agent)

    def _device_online(self):
        if self.relay.poll() is not None:
            raise BenchError(f"relay exited\n{self.relay.tail()}")
        return metrics(self.metrics_port).get('p2pnat_udp_received_total{kind="NotifyA"}', 0) > 0

    def url(self, secure, path="/"):
        port = self.https_port if secure else self.http_port
        return f"{'https' if secure else 'http'}://{DEVICE}.{HOSTNAME}:{port}{path}"

    def curl_args(self, secure):
        """curl options to reach the device through the relay."""
        port = self.https_port if secure else self.http_port
        args = ["--resolve", f"{DEVICE}.{HOSTNAME}:{port}:127.0.0.1"]
        if secure:
            args += ["--cacert", self.ca]
        return args

    def sessions(self):
        """The relay's session counters by outcome."""
        m = metrics(self.metrics_port)
        return {k.split('"')[1]: v for k, v in m.items()
                if k.startswith("p2pnat_sessions_total{")}


# -- nginx ---------------------------------------------------------------------

NGINX_CONF = """\
# Written by bench/{script}: a throwaway nginx serving {root} on 127.0.0.1.
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
{extra}}}
"""


def nginx_argv(work, root, port, workers=1, script="bench", name="nginx", extra=""):
    """
    Write an nginx config serving C{root} on 127.0.0.1:C{port} under
    C{work}/C{name} and return the argv running it in the foreground.
    C{extra}: more of the http block (server and upstream blocks).
    """
    nginx = need("nginx")
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    # As root, workers would be www-data: keep them root so they can read
    # the temporary files whatever the umask (the server is on loopback only).
    user = "user root;" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(script=script, root=root, dir=d, port=port, workers=workers,
                                  user=user, extra=extra))
    return [nginx, "-e", os.path.join(d, "error.log"), "-p", d, "-c", conf]


def start_nginx(processes, work, root, port, workers=1, script="bench", name="nginx", extra="",
                ready_port=None):
    """
    nginx (Debian's) serving C{root} on 127.0.0.1:C{port}, plus C{extra}
    (see L{nginx_argv}); returns the L{Proc} once C{ready_port} (default
    C{port}) accepts connections.
    """
    p = processes.start(name, nginx_argv(work, root, port, workers, script, name, extra))
    ready = ready_port or port
    wait_until(lambda: port_open(ready), 15, f"{name} listening", p)
    return p


# -- figures --------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, q):
    """The C{q}-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def table(headers, rows, out=None):
    """Print C{rows} under C{headers}, columns aligned (numbers to the right)."""
    out = out or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                        for c, w in zip(r, widths)).rstrip(), file=out)
    out.flush()


def _numeric(text):
    return bool(re.match(r"^[-+]?[\d.,]+\s*(%|x|ms|us|µs|MB/s|KB|MB|s)?$", text))


def say(text):
    print(text, flush=True)
