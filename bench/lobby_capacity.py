"""
One lobby process's capacity on loopback: the logins, keepalives and P2P
introductions per second it answers, its CPU, its memory per client, and
what it drops.

- Clients: ``--clients N`` (default 50 000) registered with
  p2pnat.deployment.registry.Registry.add_client (IDs ``lc000000``..., MAC keys
  derived from a random seed), one call each, before the measured lobby
  starts.
- The lobby: ``twistd lobby`` from this tree on 127.0.0.1 (two ports, as
  deployed), ``--lobby-keepalive 600`` so that no presence expires while the
  phases run (the default 20 s would end a client's presence after 60 s
  without a keepalive), metrics on ``--metrics-listen tcp:PORT``.
- The load: bench/lobby_load.py, one process with a pool of UDP sockets on
  127.0.0.1, every frame sealed with p2pnat.protocol.wire.seal under the client's key.
  Open loop: each step offers a fixed rate for ``--step-seconds`` and counts
  the answers (Welcome for Login and Keepalive; the Introduce reaching A for
  an introduction: A's ConnectRequest, the lobby's Invite to B, B's Answer,
  the lobby's AnswerAck to B and Introduce to A).  Rates go up until fewer
  than 90 % are answered.
- CPU: utime + stime of the lobby (and of the load generator, which shares
  the machine's two cores) from /proc over each step.  Drops: the kernel's
  drop counter of the lobby's socket (/proc/net/udp: its receive buffer
  overflowed) and the lobby's own ``p2pnat_udp_dropped_total``.
- Memory: the lobby's RSS with an empty registry (a first, separate lobby
  process), with N clients registered, with the N logged in, and after a
  keepalive from each (the replay guard remembers a timestamp per client);
  per client = difference / N.
- Session cap (``--cap-seconds``, default 90): introductions go on at the
  highest rate answered in full until the lobby holds more sessions than
  its max_sessions (100 000 by default, kept 600 s): what a busy lobby
  reaches after a few minutes.

"Sustained" below is the highest answered rate of a step that got at least
99 % of what it offered.  The generator is one Python process: when its own
CPU is near 100 %, the lobby's capacity may be higher than shown.

    /tmp/venv/bin/python bench/lobby_capacity.py                  # 50 000 clients
    /tmp/venv/bin/python bench/lobby_capacity.py --clients 10000 --step-seconds 3 --cap-seconds 0

Root is not needed; loopback only.
"""

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lobby_load.py")
MAX_SESSIONS = 100_000  # p2pnat.lobby.server.Lobby's default


def register(state, clients, seed):
    """Register the simulated clients through Registry.add_client; seconds taken."""
    from p2pnat.deployment.registry import Registry

    sys.path.insert(0, os.path.dirname(LOAD))
    from lobby_load import client_id, client_key

    t0 = time.monotonic()
    with Registry.open_state_dir(state) as reg:
        for i in range(clients):
            reg.add_client(client_id(i), client_key(seed, i))
    return time.monotonic() - t0


def udp_drops(port):
    """The kernel's drop counter of the UDP socket bound to 127.0.0.1:C{port}."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want:
                return int(fields[-1])
    return 0


class LobbyProc:
    def __init__(self, processes, work, state, name, keepalive=600):
        self.ports = [S.free_port(socket.SOCK_DGRAM), S.free_port(socket.SOCK_DGRAM)]
        self.metrics_port = S.free_port()
        self.proc = processes.start(name, S.procs.twistd(
            "lobby", "--lobby-state-dir", state, "--log-level", "warn",
            "--lobby-keepalive", str(keepalive),
            "--udp-listen", ",".join(f"127.0.0.1:{p}" for p in self.ports),
            "--metrics-listen", f"tcp:{self.metrics_port}:interface=127.0.0.1"),
            cwd=S.procs.REPO, env=S.procs.env())
        S.wait_until(lambda: S.port_open(self.metrics_port), 60, f"{name} metrics", self.proc)

    @property
    def pid(self):
        return self.proc.pid

    def metrics(self):
        """The lobby's metrics, or {} if it does not answer within 10 s (busy reactor)."""
        try:
            return S.metrics(self.metrics_port)
        except OSError:  # URLError and timeouts are OSErrors
            return {}

    def rss_kb(self):
        return S.status_kb(self.pid, "VmRSS")

    def settle_rss(self, seconds=3.0):
        """RSS after C{seconds} of quiet (the last reading)."""
        time.sleep(seconds)
        return self.rss_kb()


class Generator:
    def __init__(self, work, port, lobby_pid, clients, seed, sockets, max_seconds):
        # Not through Processes.start: this one talks over pipes.
        self.popen = subprocess.Popen(
            [sys.executable, LOAD, "--port", str(port), "--lobby-pid", str(lobby_pid),
             "--clients", str(clients), "--seed", seed.hex(), "--sockets", str(sockets),
             "--max-seconds", str(int(max_seconds))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(
                os.path.join(work, "load.err"), "wb"), cwd=S.procs.REPO, env=S.procs.env(),
            start_new_session=True)
        self.pid = self.popen.pid
        self.err_path = os.path.join(work, "load.err")
        first = self._read(120)
        if not first.get("ready"):
            raise S.BenchError(f"load generator did not start: {first}")

    def _read(self, timeout):
        fd = self.popen.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        line = self.popen.stdout.readline() if ready else b""
        if not line:
            with open(self.err_path, errors="replace") as f:
                err = f.read()[-1500:]
            raise S.BenchError(f"load generator gave no answer in {timeout:g}s"
                               f" (status {self.popen.poll()}): {err}")
        return json.loads(line)

    def step(self, timeout, **cmd):
        self.popen.stdin.write((json.dumps(cmd) + "\n").encode())
        self.popen.stdin.flush()
        out = self._read(timeout)
        if "error" in out:
            raise S.BenchError(f"load generator: {out['error']}")
        return out

    def stop(self):
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, 9)
            self.popen.wait(5)


def drops_by_reason(before, after):
    out = {}
    for k, v in after.items():
        if k.startswith("p2pnat_udp_dropped_total{"):
            d = v - before.get(k, 0)
            if d:
                out[k.split('"')[1]] = int(d)
    return out


def measured_step(lobby, gen, kind, rate, seconds, start=0):
    m0, d0 = lobby.metrics(), udp_drops(lobby.ports[0])
    w0 = time.monotonic()
    r = gen.step(seconds * 3 + 60, step=kind, rate=rate, seconds=seconds, start=start)
    wall = time.monotonic() - w0
    m1, d1 = lobby.metrics(), udp_drops(lobby.ports[0])
    # CPU over the sending window, read by the generator itself.
    r["metrics_ok"] = bool(m1)
    r.update(lobby_cpu=r["lobby_cpu_send"], gen_cpu=r["gen_cpu_send"],
             others=max(0.0, r["machine_busy_send"] - r["lobby_cpu_send"] - r["gen_cpu_send"]),
             kernel_drops=d1 - d0,
             lobby_drops=drops_by_reason(m0, m1), wall=wall,
             sessions=m1.get("p2pnat_sessions_active", float("nan")))
    expected = r["sent"]
    r["answered_pct"] = 100 * r["answered"] / expected if expected else 0.0
    return r


def phase(lobby, gen, kind, rates, seconds, say_label):
    rows = []
    start = 0
    for rate in rates:
        r = measured_step(lobby, gen, kind, rate, seconds, start)
        start += int(rate * seconds)
        rows.append(r)
        S.say(f"  {say_label} {rate:>7g}/s: answered {r['answered_per_s']:>8.0f}/s"
              f" ({r['answered_pct']:.1f} %), lobby CPU {100 * r['lobby_cpu']:.0f} %,"
              f" generator {100 * r['gen_cpu']:.0f} %, others {100 * r['others']:.0f} %,"
              f" kernel drops {r['kernel_drops']},"
              f" lobby drops {r['lobby_drops'] or 0}")
        if r["answered_pct"] < 90:
            break
    return rows


def sustained(rows):
    full = [r["answered_per_s"] for r in rows if r["answered_pct"] >= 99]
    return max(full) if full else 0.0


def row_cells(label, r):
    lat = r.get("latency_ms_median")
    return [label, f"{r['rate']:g}", f"{r['answered_per_s']:.0f}", f"{r['answered_pct']:.1f} %",
            f"{100 * r['lobby_cpu']:.0f} %", f"{100 * r['gen_cpu']:.0f} %",
            f"{100 * r['others']:.0f} %", str(r["kernel_drops"]),
            ",".join(f"{k}={v}" for k, v in r["lobby_drops"].items()) or "0",
            "-" if lat is None else f"{lat:.2f}/{r['latency_ms_p99']:.2f}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50_000, help="registered clients (50 000)")
    ap.add_argument("--login-rates", default="2000,5000,10000,15000,20000,30000")
    ap.add_argument("--keepalive-rates", default="2000,5000,10000,15000,20000,30000")
    ap.add_argument("--introduce-rates", default="500,1000,2000,3000,4000,6000")
    ap.add_argument("--step-seconds", type=float, default=5.0, help="seconds per step (5)")
    ap.add_argument("--sockets", type=int, default=256, help="generator's UDP sockets (256)")
    ap.add_argument("--cap-seconds", type=float, default=90.0,
                    help="seconds of introductions past the session cap (0: skip)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    def rates(text):
        return [float(x) for x in text.split(",") if x.strip()]

    login_rates, ka_rates, intro_rates = (rates(args.login_rates), rates(args.keepalive_rates),
                                          rates(args.introduce_rates))
    if not 100 <= args.clients <= 500_000 or not 1 <= args.step_seconds <= 60 or \
            not 0 <= args.cap_seconds <= 900 or \
            any(not 1 <= r <= 200_000 for r in login_rates + ka_rates + intro_rates):
        raise S.BenchError("--clients 100-500000, --step-seconds 1-60, --cap-seconds 0-900,"
                           " rates 1-200000")
    work = S.workdir("lobby-capacity")
    seed = os.urandom(16)
    out = {"clients": args.clients}
    try:
        with S.Processes(work) as processes:
            # 1. The same lobby with no client at all: the baseline RSS.
            empty = LobbyProc(processes, work, os.path.join(work, "empty"), "lobby-empty")
            out["rss_empty_kb"] = empty.settle_rss()
            empty.proc.stop()
            # 2. N clients registered.
            state = os.path.join(work, "state")
            took = register(state, args.clients, seed)
            S.say(f"lobby_capacity: {args.clients} clients registered with Registry.add_client"
                  f" in {took:.1f} s ({args.clients / took:.0f}/s)")
            lobby = LobbyProc(processes, work, state, "lobby")
            out["rss_registered_kb"] = lobby.settle_rss()
            # Generous: the whole run, bounded.
            budget = 600 + args.cap_seconds + 3 * args.step_seconds * (
                len(login_rates) + len(ka_rates) + len(intro_rates))
            gen = Generator(work, lobby.ports[0], lobby.pid, args.clients, seed, args.sockets,
                            budget)
            try:
                # 3. Everyone logs in once.
                r = gen.step(600, step="login-all", rate=5000)
                online = lobby.metrics().get("p2pnat_online", 0)
                S.say(f"  all logged in: {r['answered']} welcomes for {r['sent']} logins,"
                      f" {r['passes']} pass(es); lobby reports {online:.0f} online")
                if online < args.clients:
                    raise S.BenchError(f"only {online:.0f} of {args.clients} clients online")
                out["rss_logged_in_kb"] = lobby.settle_rss()
                c0, w0 = S.cpu_seconds(lobby.pid), time.monotonic()
                time.sleep(5)
                out["idle_cpu"] = (S.cpu_seconds(lobby.pid) - c0) / (time.monotonic() - w0)
                # 4. The phases.
                out["login"] = phase(lobby, gen, "login", login_rates, args.step_seconds, "login")
                out["keepalive"] = phase(lobby, gen, "keepalive", ka_rates, args.step_seconds,
                                         "keepalive")
                # Every client has sent a keepalive by now (if the steps covered N).
                covered = sum(r["sent"] for r in out["keepalive"])
                if covered < args.clients:
                    gen.step(600, step="keepalive", rate=5000,
                             seconds=(args.clients - covered) / 5000 + 1, start=covered)
                out["rss_keepalive_kb"] = lobby.settle_rss()
                out["introduce"] = phase(lobby, gen, "introduce", intro_rates,
                                         args.step_seconds, "introduce")
                if args.cap_seconds:
                    out["cap"] = session_cap(lobby, gen, out["introduce"], args)
            finally:
                gen.stop()
            # A lobby past its session cap may need a while before it answers again.
            final = S.wait_until(lobby.metrics, 120, "the lobby's metrics after the load",
                                 lobby.proc, interval=1)
            out["rss_end_kb"] = lobby.rss_kb()
            out["final_metrics"] = {k: v for k, v in final.items()
                                    if k.startswith(("p2pnat_udp_dropped", "p2pnat_sessions",
                                                     "p2pnat_online"))}
        report(out, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def session_cap(lobby, gen, intro_rows, args):
    """Introductions at the highest fully answered rate until past the session cap."""
    rate = sustained(intro_rows) or 500
    rate = max(100, min(rate, 3000))
    have = lobby.metrics().get("p2pnat_sessions_active", 0)
    S.say(f"  session cap: introductions at {rate:.0f}/s for up to {args.cap_seconds:g} s"
          f" ({have:.0f} sessions held; the lobby's max_sessions is {MAX_SESSIONS})")
    rows = []
    t0 = time.monotonic()
    start = 0
    step = 5.0
    while time.monotonic() - t0 < args.cap_seconds:
        r = measured_step(lobby, gen, "introduce", rate, step, start)
        start += int(rate * step)
        r["t"] = time.monotonic() - t0
        rows.append(r)
        if r["metrics_ok"]:
            # The lobby's count of sessions: the introductions it made (none expire in 600 s).
            made = r["sessions"]
        else:
            made = (rows[-2]["made"] if len(rows) > 1 else have) + r["answered"]
        r["made"] = made
        S.say(f"    t={r['t']:5.0f} s sessions {made:>7.0f}"
              f"{'' if r['metrics_ok'] else ' (metrics: no answer in 10 s)'}: answered"
              f" {r['answered_per_s']:>6.0f}/s ({r['answered_pct']:.1f} %), lobby CPU"
              f" {100 * r['lobby_cpu']:.0f} %, latency median {r.get('latency_ms_median', '-')}"
              f" ms, kernel drops {r['kernel_drops']}")
    return rows


def report(out, args):
    n = args.clients
    print()
    print(f"lobby capacity on loopback: one twistd lobby process, {n} registered clients,"
          f" {args.step_seconds:g} s per step, open-loop offered rates ({os.cpu_count()} CPUs,"
          " the load generator shares them)")
    headers = ["step", "offered/s", "answered/s", "answered", "lobby CPU", "gen CPU", "others",
               "kernel drops", "lobby drops", "latency ms med/p99"]
    rows = []
    for kind in ("login", "keepalive", "introduce"):
        for r in out[kind]:
            rows.append(row_cells(kind, r))
    S.table(headers, rows)
    print("CPU: share of one core over the sending window (others: the rest of the machine's"
          " load, not this benchmark's); kernel drops: the lobby socket's receive-buffer"
          " overflows (/proc/net/udp); latency: A's ConnectRequest -> Introduce at A.")
    print()
    summary = []
    for kind, label in (("login", "logins/s"), ("keepalive", "keepalives/s"),
                        ("introduce", "introductions/s")):
        rs = out[kind]
        peak = max(r["answered_per_s"] for r in rs)
        best = max(rs, key=lambda r: r["answered_per_s"])
        summary.append([label, f"{sustained(rs):.0f}", f"{peak:.0f}",
                        f"{100 * best['lobby_cpu']:.0f} %"])
    S.table(["", "sustained (>= 99 % answered)", "peak answered", "lobby CPU at peak"], summary)
    print()
    kb = lambda k: out[k]  # noqa: E731
    sessions = out["final_metrics"].get("p2pnat_sessions_active", 0)
    mem = [
        ["empty registry (separate process)", f"{kb('rss_empty_kb') / 1024:.1f} MB", ""],
        [f"{n} registered", f"{kb('rss_registered_kb') / 1024:.1f} MB",
         f"{(kb('rss_registered_kb') - kb('rss_empty_kb')) * 1024 / n:.0f} B per registered"
         " client"],
        [f"{n} logged in", f"{kb('rss_logged_in_kb') / 1024:.1f} MB",
         f"{(kb('rss_logged_in_kb') - kb('rss_registered_kb')) * 1024 / n:.0f} B per logged-in"
         " client"],
        ["after a keepalive from each", f"{kb('rss_keepalive_kb') / 1024:.1f} MB",
         f"{(kb('rss_keepalive_kb') - kb('rss_registered_kb')) * 1024 / n:.0f} B per client"
         " (presence + replay state)"],
        [f"at the end ({sessions:.0f} sessions held)", f"{kb('rss_end_kb') / 1024:.1f} MB",
         f"{(kb('rss_end_kb') - kb('rss_keepalive_kb')) * 1024 / max(1, sessions):.0f} B per"
         " introduced session (held 600 s)"],
    ]
    S.table(["lobby RSS", "", "per client"], mem)
    print(f"idle CPU with {n} clients online (housekeeping each second):"
          f" {100 * out['idle_cpu']:.1f} % of a core")
    if out.get("cap"):
        print()
        cap = out["cap"]
        S.table(["t s", "sessions held", "offered/s", "answered/s", "answered", "lobby CPU",
                 "latency ms med"],
                [[f"{r['t']:.0f}", f"{r['made']:.0f}" + ("" if r["metrics_ok"] else " (est.)"),
                  f"{r['rate']:g}",
                  f"{r['answered_per_s']:.0f}", f"{r['answered_pct']:.1f} %",
                  f"{100 * r['lobby_cpu']:.0f} %", str(r.get("latency_ms_median", "-"))]
                 for r in cap])
        print(f"(session cap: Lobby max_sessions = {MAX_SESSIONS}, session_ttl 600 s)")
    drops = {k.split('"')[1]: int(v) for k, v in out["final_metrics"].items()
             if k.startswith("p2pnat_udp_dropped_total{")}
    print(f"lobby drops at the end (p2pnat_udp_dropped_total by reason): {drops or 'none'}")


if __name__ == "__main__":
    S.main(main)
