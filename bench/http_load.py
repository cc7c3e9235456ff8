"""
Warm HTTP load through the relay, against nginx directly.

nginx (Debian's) serves a small static file on 127.0.0.1 as the device's
web server; a relay and a device agent run on loopback from this source
tree.  ``wrk`` drives keep-alive connections (each wrk connection through
the relay is one tunnel) to:

- ``direct``       nginx itself (the baseline);
- ``direct-tls``   nginx with TLS (the relay's certificate): what TLS alone costs;
- ``relay-http``   the relay's plain HTTP terminal port;
- ``relay-https``  the relay's HTTPS terminal port;
- ``stock-http``, ``stock-https``: the same through a second relay and
  agent with ``--tls-fast-path false`` (Twisted's stock TLS and
  transports), to see what p2pnat.net.fastio still buys;
- ``nginx-2hop``   a reference, not p2pnat: the relay path's shape built
  from nginx (one worker each, like the relay and the agent), i.e. a plain
  HTTP proxy talking TLS to a second proxy in front of the same nginx, with
  keep-alive upstreams.  It shows what two proxy hops cost on this machine
  with a mature C proxy: when the two hops and wrk share two cores, even it
  cannot reach 50 % of direct.

Each round runs every mode once, in a rotating order (the machine is shared
and noisy), first loaded (``-c 16 -t 2``) for requests/s and latency under
load, then with one connection (``-c 1 -t 1``) for the latency a request
sees on an idle path: "added latency" is that p50 minus direct's p50 in the
same round.  Figures are medians over the rounds.

Targets (the relay path): relayed >= 50 % of direct requests/s;
p50 added latency <= 1 ms.

    sudo .venv/bin/python bench/http_load.py            # or /tmp/venv/bin/python
    bench/http_load.py --rounds 3 --duration 3          # quicker

Needs nginx and wrk (sudo apt-get install nginx wrk); root is not needed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

MODES = ["direct", "direct-tls", "relay-http", "relay-https", "stock-http", "stock-https",
         "nginx-2hop"]
RELAYED = ["relay-http", "relay-https", "stock-http", "stock-https"]

# The reference two-hop chain: "front" (plain HTTP in, TLS out to "back")
# and "back" (TLS in, plain HTTP out to the device's nginx), one process each.
NGINX_HOP = {
    "front": """\
    upstream next {{ server 127.0.0.1:{back}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{front};
        location / {{
            proxy_pass https://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify off;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;
        }}
    }}
""",
    "back": """\
    upstream next {{ server 127.0.0.1:{origin}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{back} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""}

NGINX_TLS = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
"""


def parse_wrk(text):
    """requests/s, latency percentiles (ms), errors from ``wrk --latency`` output."""
    def ms(value, unit):
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not rps:
        raise S.BenchError(f"cannot read wrk's output:\n{text[-1000:]}")
    pct = {int(p): ms(v, u) for p, v, u in
           re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
    requests = re.search(r"(\d+) requests in", text)
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    return {"rps": float(rps.group(1)), "p50": pct.get(50), "p99": pct.get(99),
            "requests": int(requests.group(1)) if requests else 0, "errors": errors}


def run_wrk(wrk, url, host, connections, threads, duration, timeout_s=None):
    argv = [wrk, "--latency", "-c", str(connections), "-t", str(threads),
            "-d", f"{int(duration)}s", "--timeout", "5s", "-H", f"Host: {host}", url]
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout_s or duration + 30)
    if done.returncode != 0:
        raise S.BenchError(f"{' '.join(argv)} failed ({done.returncode}):"
                           f" {(done.stdout + done.stderr).strip()[-500:]}")
    return parse_wrk(done.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every mode (default 5)")
    ap.add_argument("--duration", type=int, default=5, help="seconds of each loaded run")
    ap.add_argument("--connections", "-c", type=int, default=16,
                    help="wrk connections (= tunnels through the relay), default 16")
    ap.add_argument("--threads", "-t", type=int, default=2, help="wrk threads, default 2")
    ap.add_argument("--latency-duration", type=int, default=3,
                    help="seconds of each one-connection latency run (0: skip them)")
    ap.add_argument("--size", type=int, default=1024, help="bytes of the static file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 120:
        raise S.BenchError("--rounds 1-50 and --duration 1-120 s, please")
    if not 1 <= args.connections <= 64:
        raise S.BenchError("--connections 1-64 (the agent opens at most 64 tunnels)")
    wrk = S.need("wrk")
    S.need("nginx")

    work = S.workdir("http")
    try:
        with S.Processes(work) as P:
            _run(args, wrk, work, P)
    finally:
        if args.keep:
            S.say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, wrk, work, P):
    root = os.path.join(work, "www")
    os.makedirs(root)
    with open(os.path.join(root, "index.html"), "wb") as f:
        f.write(b"<!doctype html>" + b"x" * max(0, args.size - 15))
    os.chmod(root, 0o755)
    nginx_port, nginx_tls_port = S.free_port(), S.free_port()

    nginxes = [S.start_nginx(P, work, root, nginx_port, script="http_load.py")]
    # nginx's TLS server (direct-tls) uses the relay's certificate.
    rp = S.RelayPath(P, work, nginx_port)
    stock = S.RelayPath(P, work, nginx_port, fast_path=False, name="stock")
    tls_nginx = _start_tls_nginx(P, work, root, nginx_tls_port, rp.state)
    if tls_nginx is not None:
        nginxes.append(tls_nginx)

    urls = {
        "direct": (f"http://127.0.0.1:{nginx_port}/", f"127.0.0.1:{nginx_port}"),
        "direct-tls": (f"https://127.0.0.1:{nginx_tls_port}/", S.HOSTNAME),
        "relay-http": (f"http://127.0.0.1:{rp.http_port}/", f"{S.DEVICE}.{S.HOSTNAME}"),
        "relay-https": (f"https://127.0.0.1:{rp.https_port}/", f"{S.DEVICE}.{S.HOSTNAME}"),
        "stock-http": (f"http://127.0.0.1:{stock.http_port}/", f"{S.DEVICE}.{S.HOSTNAME}"),
        "stock-https": (f"https://127.0.0.1:{stock.https_port}/", f"{S.DEVICE}.{S.HOSTNAME}"),
        "nginx-2hop": None,
    }
    if tls_nginx is None:
        del urls["direct-tls"]
    front = _start_nginx_hops(P, work, root, nginx_port, rp.state)
    if front is None:
        del urls["nginx-2hop"]
    else:
        nginxes.extend(front[1])
        urls["nginx-2hop"] = (f"http://127.0.0.1:{front[0]}/", f"127.0.0.1:{front[0]}")
    modes = [m for m in MODES if m in urls]

    S.say(f"http_load: {args.size}-byte file, wrk -c {args.connections} -t {args.threads}"
          f" -d {args.duration:g}s (loaded) and -c 1 -t 1 -d {args.latency_duration:g}s"
          f" (latency), {args.rounds} rounds, modes interleaved")
    # Warm-up: open the tunnels, fill caches.
    for mode in modes:
        url, host = urls[mode]
        run_wrk(wrk, url, host, args.connections, args.threads, 1)

    loaded = {m: [] for m in modes}
    idle = {m: [] for m in modes}
    cpu = {m: {"relay": [], "agent": []} for m in RELAYED}
    errors = {m: 0 for m in modes}
    busy = {m: [] for m in modes}
    load = {m: [] for m in modes}
    other = {m: [] for m in modes}
    irq = {m: [] for m in modes}

    def nginx_cpu():
        return sum(S.tree_cpu_seconds(p.pid) for p in nginxes)

    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            url, host = urls[mode]
            path = stock if mode.startswith("stock") else rp
            before = (S.cpu_seconds(path.relay.pid), S.cpu_seconds(path.agent.pid))
            machine = S.machine_cpu()
            load0 = S.children_cpu_seconds() + nginx_cpu()
            res = run_wrk(wrk, url, host, args.connections, args.threads, args.duration)
            split = S.machine_split(machine, S.machine_cpu())
            busy[mode].append(split["busy"])
            after = (S.cpu_seconds(path.relay.pid), S.cpu_seconds(path.agent.pid))
            load_cpu = S.children_cpu_seconds() + nginx_cpu() - load0
            ours = load_cpu + sum(a - b for a, b in zip(after, before))
            load[mode].append(100 * load_cpu / args.duration)
            other[mode].append(split["procs"] - ours / args.duration)
            irq[mode].append(split["irq"] + split["steal"])
            if mode in cpu:
                cpu[mode]["relay"].append(100 * (after[0] - before[0]) / args.duration)
                cpu[mode]["agent"].append(100 * (after[1] - before[1]) / args.duration)
            loaded[mode].append(res)
            errors[mode] += res["errors"]
            if args.latency_duration > 0:
                res1 = run_wrk(wrk, url, host, 1, 1, args.latency_duration)
                idle[mode].append(res1)
                errors[mode] += res1["errors"]
        S.say(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m} {loaded[m][-1]['rps']:.0f}/s" for m in modes))
    sessions = rp.sessions()
    _report(args, modes, loaded, idle, cpu, errors, sessions, busy, load, other, irq)


def _start_tls_nginx(P, work, root, port, state):
    """A second nginx, with TLS (the relay's certificate), or None if it cannot start."""
    extra = NGINX_TLS.format(port=port, cert=os.path.join(state, "relay.crt"),
                             key=os.path.join(state, "relay.key"), root=root)
    try:
        return S.start_nginx(P, work, root, S.free_port(), script="http_load.py",
                             name="nginx-tls", extra=extra, ready_port=port)
    except S.BenchError as e:
        S.say(f"note: no direct-tls mode: {e}")
        return None


def _start_nginx_hops(P, work, root, origin, state):
    """
    The reference chain: two nginx processes of one worker each (front and
    back), TLS between them.  Returns (front port, processes), or None.
    """
    ports = {"front": S.free_port(), "back": S.free_port()}
    procs = []
    for name in ("back", "front"):
        extra = NGINX_HOP[name].format(
            front=ports["front"], back=ports["back"], origin=origin,
            cert=os.path.join(state, "relay.crt"), key=os.path.join(state, "relay.key"))
        try:
            procs.append(S.start_nginx(P, work, root, S.free_port(), script="http_load.py",
                                       name=f"nginx-{name}", extra=extra,
                                       ready_port=ports[name]))
        except S.BenchError as e:
            S.say(f"note: no nginx-2hop mode: {e}")
            return None
    return ports["front"], procs


def _fmt_ms(v):
    return "-" if v is None or v != v else f"{v:.3f} ms"


def _report(args, modes, loaded, idle, cpu, errors, sessions, busy, load, other, irq):
    med = S.median
    base = med([x["rps"] for x in loaded["direct"]])
    base_p50_idle = [x["p50"] for x in idle["direct"]]
    rows = []
    for mode in modes:
        rps = [x["rps"] for x in loaded[mode]]
        row = [mode, f"{med(rps):,.0f}", f"{min(rps):,.0f}-{max(rps):,.0f}",
               f"{100 * med(rps) / base:.0f}%",
               _fmt_ms(med([x["p50"] for x in loaded[mode]])),
               _fmt_ms(med([x["p99"] for x in loaded[mode]]))]
        if idle[mode]:
            p50s = [x["p50"] for x in idle[mode]]
            added = [a - b for a, b in zip(p50s, base_p50_idle)]
            row += [_fmt_ms(med(p50s)), _fmt_ms(med([x["p99"] for x in idle[mode]])),
                    "-" if mode == "direct" else f"{med(added) * 1000:+.0f} us"]
        else:
            row += ["-", "-", "-"]
        if mode in cpu:
            row += [f"{med(cpu[mode]['relay']):.0f}%", f"{med(cpu[mode]['agent']):.0f}%"]
        else:
            row += ["-", "-"]
        row += [f"{med(load[mode]):.0f}%", f"{med(busy[mode]):.2f}/{os.cpu_count()}",
                f"{med(irq[mode]):.2f}", f"{med(other[mode]):.2f}"]
        rows.append(row)
    print()
    print(f"wrk -c {args.connections} -t {args.threads} -d {args.duration:g}s (loaded) and"
          f" -c 1 -t 1 -d {args.latency_duration:g}s (idle path); medians of {args.rounds}"
          " rounds")
    S.table(["mode", "req/s", "range", "vs direct", "p50 loaded", "p99 loaded", "p50 1-conn",
             "p99 1-conn", "added p50", "relay CPU", "agent CPU", "wrk+nginx CPU",
             "machine busy", "irq+steal", "others"], rows)
    print(f"relay sessions: {', '.join(f'{k} {v:.0f}' for k, v in sorted(sessions.items()))}"
          " (each wrk connection is one tunnel).")
    print("CPU columns are for the loaded run, in % of one core; machine busy: cores in use"
          " (all of it); irq+steal: cores spent in interrupts and softirqs (loopback network"
          " work is counted there) or stolen by the hypervisor; others: cores used by"
          " processes not of this bench (the machine is shared)")
    bad = {m: n for m, n in errors.items() if n}
    if bad:
        print(f"WARNING: errors or non-2xx responses: {bad}")
    print()
    if "nginx-2hop" in loaded:
        ref = med([x["rps"] for x in loaded["nginx-2hop"]])
        print("reference nginx-2hop (two nginx proxy hops, TLS between them):"
              f" {100 * ref / base:.0f}% of direct; relay-http is"
              f" {100 * med([x['rps'] for x in loaded['relay-http']]) / ref:.0f}% of it,"
              f" relay-https {100 * med([x['rps'] for x in loaded['relay-https']]) / ref:.0f}%")
    for scheme in ("http", "https"):
        fast = med([x["rps"] for x in loaded[f"relay-{scheme}"]])
        stock = med([x["rps"] for x in loaded[f"stock-{scheme}"]])
        line = (f"fast path, {scheme}: {fast:,.0f} req/s against {stock:,.0f} with Twisted's"
                f" stock TLS ({fast / stock:.2f}x)")
        if idle[f"relay-{scheme}"]:
            gain = med([s["p50"] - f["p50"] for f, s in
                        zip(idle[f"relay-{scheme}"], idle[f"stock-{scheme}"])])
            line += f"; p50 on one connection {gain * 1000:.0f} us lower"
        print(line)
    for mode in RELAYED:
        rps = med([x["rps"] for x in loaded[mode]])
        ratio = rps / base
        line = f"target {mode}: req/s {100 * ratio:.0f}% of direct (>= 50%):" \
               f" {'met' if ratio >= 0.5 else 'MISSED'}"
        if idle[mode]:
            added = med([a["p50"] - b for a, b in zip(idle[mode], base_p50_idle)])
            line += f"; added p50 {added:.3f} ms (<= 1 ms): {'met' if added <= 1 else 'MISSED'}"
        print(line)


if __name__ == "__main__":
    S.main(main)
