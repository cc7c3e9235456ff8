"""
Cold session time: a terminal's request to a device whose relay has no
idle tunnel, until the first response byte.  It includes the connect
request (UDP, through the device's NAT), the device's TCP connection and
TLS handshake to the relay, the hello, the stream's OPEN and the device's
web server answering, besides the terminal's own TCP and TLS handshakes.

In the NAT lab (network namespaces, kernel NAT): the relay on the
internet segment, the device (agent + nginx on its 127.0.0.1) behind a cone
NAT, the terminal (curl) a public host.  The relay runs with
``--tunnel-idle-timeout 0.001`` so that no tunnel outlives its stream: every
round is a fresh curl and a fresh tunnel (checked: the relay's "reused"
session counter must stay 0).

curl's clock gives the breakdown: ``time_connect`` (terminal TCP),
``time_appconnect`` (terminal TLS done), ``time_starttransfer`` (first
response byte); "session" is starttransfer - pretransfer: from the request
leaving the terminal to the answer's first byte.  The target, "<= 3 RTT +
the TLS handshake" for the relay's part (session - 1 terminal RTT), is 4
device RTTs with TLS 1.3: connect request 0.5, TCP 1, TLS 1, hello 0.5,
OPEN and request 0.5, answer 0.5.  A tunnel that resumes the agent's TLS
session and names its session in ALPN gets the OPEN and the request with
the relay's handshake flight (0.5-RTT data, see p2pnat.relay.tunnel):
connect request 0.5, TCP 1, ClientHello 0.5, the relay's flight with the
request 0.5, answer 0.5 = 3 device RTTs.  The relay's ``tunnel-half-rtt``
session counter says how many rounds went that way (the first tunnel an
agent opens does a full handshake; the warm-up round takes it).

This kernel has no sch_netem, so ``tc netem delay`` cannot model the
target's 20 ms RTT.  Instead, with ``--delay-ms`` (default: 0 and 20), a
delay line (bench/delayline.py: a TUN device and policy routing inside the
device's and the terminal's namespaces only) holds every packet they send
for that long; ping shows the RTT actually obtained.

    sudo .venv/bin/python bench/cold_session.py           # or /tmp/venv/bin/python
    sudo bench/cold_session.py --rounds 20 --delay-ms 0   # lab RTT only

Needs root (namespaces), nftables, iproute2, curl, ping and nginx.
"""

import argparse
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

HOSTNAME = "relay.test"
UDP_PORT, TUNNEL_PORT, HTTPS_PORT, METRICS_PORT, WEB_PORT = 7478, 7443, 8443, 9100, 8080
CURL_FORMAT = ("%{http_code} %{time_connect} %{time_appconnect} %{time_pretransfer}"
               " %{time_starttransfer} %{time_total}")
DELAYLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delayline.py")


def ping_rtt(node, target, count=20):
    """Median ping RTT in ms from C{node} to C{target} (the median: the machine is noisy)."""
    done = node.run([S.which("ping"), "-c", str(count), "-i", "0.1", target], timeout=60)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    if done.returncode != 0 or not times:
        raise S.BenchError(f"ping {target} from {node.name} failed: {done.stdout[-300:]}"
                           f" {done.stderr[-300:]}")
    return S.median(times)


class ColdLab:
    """The lab: relay, device behind a cone NAT, terminal; daemons running."""

    def __init__(self, work, fast_path=True):
        from p2pnat.lab import Lab

        self.work = work
        # --tls-fast-path false: Twisted's stock TLS on both daemons (no
        # session resumption, no 0.5-RTT data), the baseline for fastio.
        self.flags = () if fast_path else ("--tls-fast-path", "false")
        self.lab = Lab()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        lab, work = self.lab, self.work
        self.relay_node = lab.add_server("relay")
        self.router = lab.add_router("nat", kind="cone")
        self.device = lab.add_host("device", behind=self.router)
        self.term = lab.add_host("term")
        ip = self.relay_node.ip
        self.state, self.bundle = S.provision(work, UDP_PORT, TUNNEL_PORT, WEB_PORT,
                                              hostname=HOSTNAME, relay_ip=ip)
        self.ca = os.path.join(self.state, "ca.crt")
        root = os.path.join(work, "www")
        os.makedirs(root)
        with open(os.path.join(root, "index.html"), "w") as f:
            f.write("<!doctype html><title>device</title><p>cold session bench</p>\n")
        self.nginx = self.device.popen(S.nginx_argv(work, root, WEB_PORT, script="cold_session.py"))
        S.wait_until(lambda: self.device.run(
            ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{WEB_PORT}/"]).returncode == 0,
            15, "nginx in the device's namespace", self.nginx)
        self.relay = self.relay_node.popen(S.procs.twistd(
            "relay", "--relay-state-dir", self.state, "--relay-hostname", HOSTNAME,
            "--udp-listen", f"{ip}:{UDP_PORT}",
            "--tunnel-listen", f"tcp:{TUNNEL_PORT}:interface={ip}",
            "--terminal-https", f"tcp:{HTTPS_PORT}:interface={ip}",
            "--metrics-listen", f"tcp:{METRICS_PORT}:interface=127.0.0.1",
            "--tunnel-idle-timeout", "0.001", *self.flags), cwd=S.procs.REPO, env=S.procs.env())
        S.wait_until(lambda: self.metrics() is not None, 30, "relay metrics", self.relay)
        self.agent = self.device.popen(S.procs.twistd(
            "device-agent", "--config", os.path.join(self.bundle, "agent.toml"),
            "--agent-relay", f"{ip}:{UDP_PORT}", *self.flags), cwd=S.procs.REPO,
            env=S.procs.env())
        S.wait_until(lambda: (self.metrics() or {}).get(
            'p2pnat_udp_received_total{kind="NotifyA"}', 0) > 0, 30,
            "the device's notify A at the relay", self.agent)

    def netem(self):
        """Whether tc netem works here (tried on the terminal namespace's loopback)."""
        tc = S.which("tc") or "tc"
        done = self.term.run([tc, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        if done.returncode != 0:
            return False
        self.term.run([tc, "qdisc", "del", "dev", "lo", "root"])
        return True

    def cpu(self):
        """CPU seconds of the lab's daemons (relay, agent, nginx)."""
        return sum(S.tree_cpu_seconds(p.pid) for p in (self.relay, self.agent, self.nginx))

    def metrics(self):
        done = self.relay_node.run(["curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics"])
        return S.parse_metrics(done.stdout) if done.returncode == 0 and done.stdout else None

    def sessions(self):
        m = self.metrics() or {}
        return {k.split('"')[1]: v for k, v in m.items() if k.startswith("p2pnat_sessions_total{")}

    def fetch(self):
        """One terminal request; curl's times in ms."""
        url = f"https://cam1.{HOSTNAME}:{HTTPS_PORT}/"
        done = self.term.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "15",
                              "--cacert", self.ca,
                              "--resolve", f"cam1.{HOSTNAME}:{HTTPS_PORT}:{self.relay_node.ip}",
                              "-w", CURL_FORMAT, url], timeout=30)
        parts = done.stdout.split()
        if done.returncode != 0 or len(parts) != 6 or parts[0] != "200":
            raise S.BenchError(f"curl through the relay: exit {done.returncode},"
                               f" {done.stdout!r} {done.stderr.strip()[-300:]}\n"
                               f"{self.lab.report()[-3000:]}")
        connect, appconnect, pretransfer, start, total = (float(x) * 1000 for x in parts[1:])
        return {"tcp": connect, "tls": appconnect - connect, "appconnect": appconnect,
                "session": start - pretransfer, "first_byte": start, "total": total}

    def close(self):
        self.lab.close()


def run_condition(cl, delay_ms, rounds, pause):
    """Rounds at one delay; returns (figures per round, RTTs, session counters)."""
    lines = []
    machine = S.machine_cpu()
    ours0 = cl.cpu() + S.children_cpu_seconds()
    t0 = time.monotonic()
    if delay_ms:
        for node in (cl.device, cl.term):
            p = node.popen(node.python(DELAYLINE, "--delay-ms", delay_ms,
                                       "--duration", 60 + rounds * (pause + 2)))
            p.wait_for_output("delayline ready", 10)
            lines.append(p)
    try:
        rtt_dev = ping_rtt(cl.device, cl.relay_node.ip)
        rtt_term = ping_rtt(cl.term, cl.relay_node.ip)
        cl.fetch()  # warm-up: imports, caches
        time.sleep(pause)
        before = cl.sessions()
        results = []
        for i in range(rounds):
            results.append(cl.fetch())
            time.sleep(pause)  # the tunnel closes 1 ms after its stream
        after = cl.sessions()
    finally:
        for p in lines:
            p.stop()
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    split = S.machine_split(machine, S.machine_cpu())
    ours = (cl.cpu() + S.children_cpu_seconds() - ours0) / (time.monotonic() - t0)
    counts["machine"] = (split["busy"], split["procs"] - ours)
    return results, rtt_dev, rtt_term, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="cold sessions per delay (40)")
    ap.add_argument("--delay-ms", default="0,20",
                    help="comma-separated extra RTTs in ms to model with the delay line"
                         " (0: the lab's own RTT); default 0,20")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between rounds")
    ap.add_argument("--fast-path", choices=["on", "off", "both"], default="both",
                    help="the daemons' tls.fast_path: on, off (Twisted's stock TLS), or both,"
                         " one lab after the other (default)")
    args = ap.parse_args()
    delays = [float(d) for d in args.delay_ms.split(",") if d.strip()]
    if not 1 <= args.rounds <= 500 or any(not 0 <= d <= 200 for d in delays):
        raise S.BenchError("--rounds 1-500 and delays 0-200 ms, please")
    S.need_lab("curl", "ping", "nginx")
    for fast_path in {"on": [True], "off": [False], "both": [True, False]}[args.fast_path]:
        _run_lab(args, delays, fast_path)


def _run_lab(args, delays, fast_path):
    work = S.workdir("cold")
    cl = None
    try:
        cl = ColdLab(work, fast_path)
        S.say("cold_session: relay on the internet segment, device behind a cone NAT,"
              f" terminal public; {args.rounds} cold rounds per delay; fast path"
              f" {'on' if fast_path else 'off (Twisted stock TLS)'}")
        netem = cl.netem()
        S.say("  tc netem: " + ("available (delays still come from bench/delayline.py)" if netem
                                else "not available in this kernel (no sch_netem); delays come"
                                     " from bench/delayline.py"))
        table = []
        for d in delays:
            results, rtt_dev, rtt_term, counts = run_condition(cl, d, args.rounds, args.pause)
            S.say(f"  delay {d:g} ms: device RTT {rtt_dev:.3f} ms, terminal RTT"
                  f" {rtt_term:.3f} ms; relay sessions"
                  f" {({k: v for k, v in counts.items() if k != 'machine'})}")
            if counts.get("reused", 0) or counts.get("connect-request", 0) < args.rounds:
                S.say("  WARNING: not every round was cold (an idle tunnel was reused)")
            table.append((d, results, rtt_dev, rtt_term, counts))
        _report(args, table)
    finally:
        if cl is not None:
            cl.close()
        shutil.rmtree(work, ignore_errors=True)


def _report(args, table):
    med, p90 = S.median, (lambda v: S.percentile(v, 90))
    keys = [("tcp", "terminal TCP (time_connect)"),
            ("tls", "terminal TLS (appconnect - connect)"),
            ("appconnect", "time_appconnect"),
            ("session", "session (starttransfer - pretransfer)"),
            ("first_byte", "first byte (time_starttransfer)")]
    for d, results, rtt_dev, rtt_term, counts in table:
        print()
        print(f"delay line {d:g} ms{' (none)' if not d else ''}: device-relay RTT"
              f" {rtt_dev:.3f} ms, terminal-relay RTT {rtt_term:.3f} ms (ping);"
              f" {len(results)} cold rounds, {counts.get('connect-request', 0):.0f} connect"
              f" requests, {counts.get('reused', 0):.0f} reused tunnels; machine busy"
              f" {counts['machine'][0]:.2f}/{os.cpu_count()} cores, of which"
              f" {counts['machine'][1]:.2f} by processes not of this bench")
        rows = []
        for key, label in keys:
            v = [r[key] for r in results]
            rows.append([label, f"{med(v):.2f} ms", f"{p90(v):.2f} ms",
                         f"{min(v):.2f}-{max(v):.2f}", f"{med(v) / rtt_dev:.1f}"])
        S.table(["", "median", "p90", "range (ms)", "in device RTTs"], rows)
        relay_part = [r["session"] - rtt_term for r in results]
        target = 4 * rtt_dev
        # A resumed tunnel gets the request with the relay's handshake
        # flight (0.5-RTT data): 3 round trips are its floor, else 4.
        half = counts.get("tunnel-half-rtt", 0)
        floor_rtts = 3 if half >= len(results) else 4
        floor = floor_rtts * rtt_dev
        print(f"relay's part (session - 1 terminal RTT): median {med(relay_part):.2f} ms ="
              f" {med(relay_part) / rtt_dev:.2f} device RTTs; {half:.0f} of"
              f" {len(results)} tunnels resumed TLS and got the request with the relay's"
              f" handshake flight, so the round trips' floor is {floor_rtts} RTT ="
              f" {floor:.2f} ms; beyond it: {med(relay_part) - floor:.2f} ms of processing")
        if d == 20 or (d and abs(rtt_dev - 20) < 2):
            ok = med(relay_part) <= target
            print(f"target at ~20 ms RTT: relay's part <= 3 RTT + TLS handshake (4 RTT ="
                  f" {target:.1f} ms): {'met' if ok else 'MISSED'}"
                  f" ({med(relay_part) / rtt_dev:.2f} RTT)")
    if not any(d for d, *_ in table):
        print("\n20 ms RTT not modelled (--delay-ms 0 only); bench/delayline.py can model it"
              " without netem.")


if __name__ == "__main__":
    S.main(main)
