"""
Cross-node session time in a relay cluster: a terminal's request to a
device whose notifies reach another node, until the first response byte,
against the same request on the device's own node, in one run.

On loopback, all real processes: a redis-server of the benchmark's own
(its own config, port and directory), two relay nodes sharing it (``n1``
and ``n2``, the same state files), a device agent reporting to ``n1`` and
nginx as the device's web server.  The nodes close idle tunnels 1 ms after
their stream (``--tunnel-idle-timeout 0.001``), so every request is a cold
session: on ``n1`` a connect request from its own socket; on ``n2`` a
``GET`` of the live entry in Redis, a ``PUBLISH`` to ``n1``, and ``n1``'s
connect request naming ``n2``'s tunnel address.  The relays' session
counters check it: no tunnel reused, every ``n2`` session forwarded.

A round is one request to each node, in alternating order; the terminal
speaks plain HTTP to the node's terminal port (the terminal's own TLS is
the same on both nodes).  The time is from the request's last byte sent to
the answer's first byte received, the connection already open.  Target:
the cross-node case adds <= 2 ms (medians).

The relays' ``tunnel-half-rtt`` counters tell how many tunnels resumed the
agent's TLS session (a resumed tunnel carries the request with the relay's
first flight); a tunnel that cannot resume does a full handshake.

    .venv/bin/python bench/cluster_session.py               # 200 rounds
    .venv/bin/python bench/cluster_session.py --rounds 50

No root needed; loopback only.  Needs redis-server and nginx.
"""

import argparse
import os
import shutil
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

REDIS_CONF = """\
# Written by bench/{script}: a throwaway redis-server on 127.0.0.1.
bind 127.0.0.1
port {port}
dir {dir}
daemonize no
save ""
appendonly no
"""


class Redis:
    """A redis-server on 127.0.0.1 with a config and directory of its own under C{work}."""

    def __init__(self, processes, work, script):
        S.need("redis-server")
        self.port = S.free_port()
        d = os.path.join(work, "redis")
        os.makedirs(d)
        conf = os.path.join(d, "redis.conf")
        with open(conf, "w") as f:
            f.write(REDIS_CONF.format(script=script, port=self.port, dir=d))
        self.proc = processes.start("redis", [S.which("redis-server"), conf], cwd=d)
        S.wait_until(lambda: self.ping(), 15, "redis-server answering PING", self.proc)

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self):
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def command(self, *args):
        """One command; its reply (str, int, list or None)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            s.sendall(out)
            return _Reply(s).read()

    def info(self, section):
        """INFO C{section} as {key: value}."""
        out = {}
        for line in self.command("INFO", section).splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out

    def commandstats(self):
        """Calls per command so far: {"set": 123, ...}."""
        return {k[len("cmdstat_"):]: int(v.split("calls=")[1].split(",")[0])
                for k, v in self.info("commandstats").items() if k.startswith("cmdstat_")}


class _Reply:
    """Reads one RESP reply from a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise S.BenchError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise S.BenchError(f"redis: unexpected reply {line[:80]!r}")


def cluster_states(work, names, service_port=None, udp_port=9):
    """
    ``p2pnat relay init`` for the first node (and ``device add`` of
    L{S.DEVICE} if C{service_port}, its bundle naming C{udp_port}: the
    agent is given its relay on the command line), the terminal secret
    made, the state
    directory copied for the other nodes (as docs/cluster.rst says); their
    paths by node name, and the device's bundle.
    """
    from p2pnat.deployment.provision import terminal_secret

    first = os.path.join(work, f"state-{names[0]}")
    S.run_cli(["relay", "init", "--state-dir", first, "--hostname", S.HOSTNAME,
               "--udp", f"127.0.0.1:{udp_port}"])
    # `relay init` leaves the secret to the relay's first start; the nodes
    # must share it (login cookies and the cluster's keys derive from it).
    terminal_secret(first)
    bundle = None
    if service_port is not None:
        bundle = os.path.join(work, S.DEVICE)
        S.run_cli(["device", "add", S.DEVICE, "--state-dir", first,
                   "--service", f"127.0.0.1:{service_port}", "--out", bundle])
    states = {names[0]: first}
    for name in names[1:]:
        states[name] = os.path.join(work, f"state-{name}")
        shutil.copytree(first, states[name])
    return states, bundle


class Node:
    """One relay node on loopback, in the cluster of C{redis_url}, with free ports."""

    def __init__(self, processes, name, state, redis_url, args=(), udp_port=None):
        self.name = name
        self.udp_port = udp_port or S.free_port(socket.SOCK_DGRAM)
        self.http_port = S.free_port()
        self.tunnel_port = S.free_port()
        self.metrics_port = S.free_port()
        self.proc = processes.start(name, S.procs.twistd(
            "relay", "--relay-state-dir", state, "--relay-hostname", S.HOSTNAME,
            "--udp-listen", f"127.0.0.1:{self.udp_port}",
            "--tunnel-listen", f"tcp:{self.tunnel_port}:interface=127.0.0.1",
            "--terminal-https", "", "--terminal-http", f"tcp:{self.http_port}:interface=127.0.0.1",
            "--metrics-listen", f"tcp:{self.metrics_port}:interface=127.0.0.1",
            *(("--cluster-redis", redis_url, "--cluster-node", name) if redis_url else ()),
            "--log-level", "warn", *args), cwd=S.procs.REPO, env=S.procs.env())
        self.pid = self.proc.pid
        S.wait_until(lambda: S.port_open(self.metrics_port), 300, f"{name} listening", self.proc)
        if redis_url:
            S.wait_until(lambda: self.metrics().get("p2pnat_cluster_available", 0) == 1
                         or "connected to redis" in self.proc.output(), 30,
                         f"{name} connected to redis", self.proc)

    def metrics(self):
        return S.metrics(self.metrics_port)

    def sessions(self):
        return {k.split('"')[1]: v for k, v in self.metrics().items()
                if k.startswith("p2pnat_sessions_total{")}


def first_byte_ms(port):
    """One plain-HTTP request for the device through the node at C{port}: ms to first byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (f"GET / HTTP/1.1\r\nHost: {S.DEVICE}.{S.HOSTNAME}\r\n"
                   "Connection: close\r\n\r\n").encode()
        t0 = time.perf_counter()
        s.sendall(request)
        first = s.recv(65536)
        t1 = time.perf_counter()
        data = first
        while chunk := s.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise S.BenchError(f"not a 200 through port {port}: {data[:300]!r}")
    return (t1 - t0) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="requests per case (200)")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between requests")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not 5 <= args.rounds <= 5000:
        raise S.BenchError("--rounds 5-5000, please")
    in_workdir("cluster-session", args, _run)


def in_workdir(name, args, run):
    """C{run(args, work, processes)} in a new work directory, removed after unless --keep."""
    work = S.workdir(name)
    try:
        with S.Processes(work) as P:
            run(args, work, P)
    finally:
        if args.keep:
            S.say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work, P):
    web_port = S.free_port()
    root = os.path.join(work, "www")
    os.makedirs(root)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("<!doctype html><title>device</title><p>cluster session bench</p>\n")
    S.start_nginx(P, work, root, web_port, script="cluster_session.py")
    redis = Redis(P, work, "cluster_session.py")
    states, bundle = cluster_states(work, ["n1", "n2"], service_port=web_port)
    cold = ("--tunnel-idle-timeout", "0.001")
    nodes = {name: Node(P, name, states[name], redis.url(), cold) for name in ("n1", "n2")}
    agent = P.start("agent", S.procs.twistd(
        "device-agent", "--config", os.path.join(bundle, "agent.toml"),
        "--agent-relay", f"127.0.0.1:{nodes['n1'].udp_port}", "--log-level", "warn"),
        cwd=S.procs.REPO, env=S.procs.env())
    S.wait_until(lambda: redis.command("EXISTS", f"p2pnat:live:{S.DEVICE}") == 1, 30,
                 "the device's live entry in redis", agent)
    S.say(f"cluster_session: redis on {redis.port}, n1 (the device's) and n2;"
          f" {args.rounds} rounds")
    for _ in range(5):  # warm-up: imports, caches, the agent's first TLS session
        for node in nodes.values():
            first_byte_ms(node.http_port)
            time.sleep(args.pause)
    before = {n: node.sessions() for n, node in nodes.items()}
    machine = S.machine_cpu()
    times = {"n1": [], "n2": []}
    for i in range(args.rounds):
        order = ("n1", "n2") if i % 2 == 0 else ("n2", "n1")
        for name in order:
            times[name].append(first_byte_ms(nodes[name].http_port))
            time.sleep(args.pause)
    split = S.machine_split(machine, S.machine_cpu())
    after = {n: node.sessions() for n, node in nodes.items()}
    counts = {n: {k: after[n].get(k, 0) - before[n].get(k, 0) for k in after[n]}
              for n in nodes}
    _report(args, times, counts, split)


def _report(args, times, counts, split):
    same, cross = times["n1"], times["n2"]
    added = S.median(cross) - S.median(same)
    print()
    rows = []
    for label, values, node in (("same node (n1, the owner)", same, "n1"),
                                ("other node (n2, via redis)", cross, "n2")):
        c = counts[node]
        rows.append([label, f"{S.median(values):.2f} ms", f"{S.percentile(values, 90):.2f} ms",
                     f"{min(values):.2f} ms", f"{c.get('connect-request', 0):.0f}",
                     f"{c.get('connect-forwarded', 0):.0f}", f"{c.get('reused', 0):.0f}",
                     f"{c.get('tunnel-half-rtt', 0):.0f}"])
    S.table(["request -> first byte", "median", "p90", "min", "sessions", "forwarded",
             "reused", "resumed"], rows)
    print()
    verdict = "met" if added <= 2.0 else "MISSED"
    print(f"added by the other node: {added:+.2f} ms (median minus median); target <= 2 ms:"
          f" {verdict}")
    print(f"machine busy {split['busy']:.2f} of {os.cpu_count()} cores during the rounds")
    if counts["n1"].get("reused", 0) or counts["n2"].get("reused", 0):
        print("note: some tunnels were reused: those requests were not cold sessions")
    if counts["n2"].get("connect-forwarded", 0) < args.rounds:
        print("note: n2 forwarded fewer connect requests than it had requests")


if __name__ == "__main__":
    S.main(main)
