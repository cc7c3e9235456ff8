"""
One relay process holding 100 000 registered devices that each send a
notify B every 25 s (4 000 packets/s): the relay's CPU and memory per
device, and how many notifies it lost.

- The devices are registered straight into the relay's SQLite registry
  (p2pnat.deployment.registry.Registry makes the schema; one batch INSERT adds the
  rows): IDs ``sim000000``..., MAC keys derived from a random seed, fake
  certificate fingerprints (no tunnel is opened).
- bench/notify_sim.py simulates them from a pool of UDP sockets on
  127.0.0.2...: one notify A each, then notify B on schedule, every packet
  sealed with p2pnat.protocol.wire.seal under the device's key and a fresh timestamp.
- CPU: utime + stime of the relay from /proc/PID/stat over a window of
  ``--window`` seconds (default 40) in the notify-B phase; also over a
  window with no traffic at all (what 100 000 idle entries cost).
- Memory: the relay's RSS minus the RSS of the same relay with 0 devices,
  divided by the number of devices.
- Losses: the relay's metrics (``p2pnat_udp_received_total``,
  ``p2pnat_udp_dropped_total`` by reason) against what the simulator sent,
  and the kernel's drop counter of the relay's socket (/proc/net/udp).

Targets (the relay path): < 50 % of one core; < 2 KB per device.

    sudo .venv/bin/python bench/notify_scale.py         # or /tmp/venv/bin/python
    bench/notify_scale.py --devices 20000 --window 30   # smaller
    bench/notify_scale.py --py-spy relay.svg            # flame graph of the window
                                                        # (relay.txt: collapsed stacks)

Root is not needed; loopback only.  ``--py-spy`` needs py-spy
(pip install py-spy, and root or ptrace permission).
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notify_sim.py")


def register(state, devices, seed):
    """Add C{devices} simulated devices to the registry of C{state}, in one transaction."""
    from p2pnat.deployment.registry import SCHEMA_VERSION, Registry

    sys.path.insert(0, os.path.dirname(SIM))
    from notify_sim import device_id, device_key

    with Registry.open_state_dir(state) as reg:
        if reg.schema_version() != 1 or SCHEMA_VERSION != 1:
            raise S.BenchError("the registry schema changed (version"
                               f" {reg.schema_version()}): update register() in this bench")
        path = reg.path
    now = time.time()
    rows = ((device_id(i), device_key(seed, i),
             hashlib.sha256(device_id(i).encode()).hexdigest(), "device", None, now)
            for i in range(devices))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO devices (id, mac_key, cert_fingerprint, access_mode,"
                       " access_credential_hash, created) VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    finally:
        db.close()


def py_spy():
    """py-spy beside this Python (a venv's bin) or on the PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else S.which("py-spy")


def udp_drops(port):
    """The kernel's drop counter and receive queue of the UDP socket on 127.0.0.1:C{port}."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            ip_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and ip_hex == "0100007F":
                return int(fields[-1]), int(fields[4].split(":")[1], 16)
    return None, None


def start_relay(P, name, state, udp_port, metrics_port):
    p = P.start(name, S.procs.twistd(
        "relay", "--relay-state-dir", state, "--relay-hostname", S.HOSTNAME,
        "--udp-listen", f"127.0.0.1:{udp_port}", "--tunnel-listen", "", "--terminal-https", "",
        "--relay-notify-b-interval", "25",
        "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1"),
        cwd=S.procs.REPO, env=S.procs.env())
    S.wait_until(lambda: S.port_open(metrics_port), 300, f"{name} metrics endpoint", p)
    return p


def last_status(proc):
    lines = [ln for ln in proc.output().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def snapshot(relay, metrics_port, udp_port, sims):
    m = S.metrics(metrics_port)
    drops, queue = udp_drops(udp_port)
    sim = [last_status(p) for p in sims]
    user, system = S.cpu_split(relay.pid)
    return {"t": time.monotonic(), "machine": S.machine_cpu(), "cpu": user + system,
            "user": user, "system": system,
            "sim_cpu": sum(S.cpu_seconds(p.pid) for p in sims),
            "received": S.metric_sum(m, "p2pnat_udp_received_total"),
            "received_a": m.get('p2pnat_udp_received_total{kind="NotifyA"}', 0),
            "dropped": {k.split('"')[1]: v for k, v in m.items()
                        if k.startswith("p2pnat_udp_dropped_total{")},
            "sent_out": S.metric_sum(m, "p2pnat_udp_sent_total"),
            "kernel_drops": drops or 0, "queue": queue,
            "sim_sent": sum(s.get("sent_a", 0) + s.get("sent_b", 0) for s in sim),
            "sim_acks": sum(s.get("acks", 0) for s in sim),
            "sim_errors": sum(s.get("send_errors", 0) for s in sim),
            "sim_lag": max((s.get("lag_max_ms", 0) for s in sim), default=0),
            "need_a": sum(s.get("need_a", 0) for s in sim)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--interval", type=float, default=25.0, help="notify-B interval (25 s)")
    ap.add_argument("--window", type=float, default=40.0, help="seconds measured (>= 30)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of notify B first")
    ap.add_argument("--idle-window", type=float, default=10.0,
                    help="seconds of CPU measured with no traffic (0: skip)")
    ap.add_argument("--a-rate", type=float, default=2000.0,
                    help="notify A per second in the first phase (one per device)")
    ap.add_argument("--a-interval", type=float, default=0.0,
                    help="also a notify A per device every so many seconds while measuring"
                         " (agents send one every access-check period / 3 = 100 s by"
                         " default; 0: none, notify B only)")
    ap.add_argument("--sim-procs", type=int, default=1, help="simulator processes")
    ap.add_argument("--py-spy", metavar="OUT.svg", help="record the relay during the window")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not 1 <= args.devices <= 1_000_000 or not 5 <= args.window <= 600:
        raise S.BenchError("--devices 1-1000000 and --window 5-600 s, please")
    if not 1 <= args.sim_procs <= 8:
        raise S.BenchError("--sim-procs 1-8")
    if args.py_spy and not py_spy():
        raise S.BenchError("--py-spy needs py-spy: pip install py-spy (into this venv)")
    work = S.workdir("notify")
    try:
        with S.Processes(work) as P:
            _run(args, work, P)
    finally:
        if args.keep:
            S.say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work, P):
    n = args.devices
    seed = os.urandom(16)
    state0, state = os.path.join(work, "state0"), os.path.join(work, "state")
    for d in (state0, state):
        S.run_cli(["relay", "init", "--state-dir", d, "--hostname", S.HOSTNAME])
    t = time.monotonic()
    register(state, n, seed)
    S.say(f"notify_scale: {n} devices registered in {time.monotonic() - t:.1f}s")

    # The same relay with no device: the memory baseline.
    udp0, m0 = S.free_port(socket.SOCK_DGRAM), S.free_port()
    relay0 = start_relay(P, "relay0", state0, udp0, m0)
    time.sleep(3)
    rss0 = S.status_kb(relay0.pid, "VmRSS")
    relay0.stop()
    S.say(f"  relay with 0 devices: RSS {rss0 / 1024:.1f} MB")

    udp_port, mport = S.free_port(socket.SOCK_DGRAM), S.free_port()
    t = time.monotonic()
    relay = start_relay(P, "relay", state, udp_port, mport)
    load_s = time.monotonic() - t
    time.sleep(2)
    rss_loaded = S.status_kb(relay.pid, "VmRSS")
    S.say(f"  relay with {n} devices: up in {load_s:.1f}s, RSS {rss_loaded / 1024:.1f} MB")
    idle_cpu = None
    if args.idle_window > 0:
        c0 = S.cpu_seconds(relay.pid)
        time.sleep(args.idle_window)
        idle_cpu = 100 * (S.cpu_seconds(relay.pid) - c0) / args.idle_window
        S.say(f"  idle (no traffic) CPU: {idle_cpu:.1f}% of one core")

    sims = []
    duration = args.warmup + args.window + 15
    a_limit = max(60.0, n / args.a_rate * 4)
    for j in range(args.sim_procs):
        sims.append(P.start(f"sim{j}", [sys.executable, SIM, "--relay-port", udp_port,
                                        "--devices", n, "--seed", seed.hex(),
                                        "--part", f"{j}/{args.sim_procs}",
                                        "--interval", args.interval, "--a-rate", args.a_rate,
                                        "--a-interval", args.a_interval, "--a-limit", a_limit,
                                        "--duration", duration],
                            cwd=S.REPO, env=S.procs.env()))
    S.wait_until(lambda: all(last_status(p).get("phase") in ("B", "end") for p in sims),
                 a_limit + 30, "the simulator's notify-B phase", sims[0], interval=0.5)
    got_a = S.metrics(mport).get('p2pnat_udp_received_total{kind="NotifyA"}', 0)
    S.say(f"  notify A phase done: relay received {got_a:.0f} notify A for {n} devices")
    time.sleep(args.warmup)

    spy = None
    if args.py_spy:
        fmt = {".txt": "raw", ".json": "speedscope"}.get(
            os.path.splitext(args.py_spy)[1], "flamegraph")
        spy = P.start("py-spy", [py_spy(), "record", "-p", relay.pid, "-d", int(args.window),
                                 "-r", "100", "--nonblocking", "-f", fmt,
                                 "-o", os.path.abspath(args.py_spy)])
    a = snapshot(relay, mport, udp_port, sims)
    peak_rss = 0
    end = time.monotonic() + args.window
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        peak_rss = max(peak_rss, S.status_kb(relay.pid, "VmRSS"))
        if relay.poll() is not None:
            raise S.BenchError(f"the relay exited\n{relay.tail()}")
    b = snapshot(relay, mport, udp_port, sims)
    rss = S.status_kb(relay.pid, "VmRSS")
    hwm = S.status_kb(relay.pid, "VmHWM")
    if spy is not None:
        try:
            spy.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass
    _report(args, n, a, b, rss0, rss_loaded, rss, max(peak_rss, rss), hwm, idle_cpu, load_s,
            got_a)


def _report(args, n, a, b, rss0, rss_loaded, rss, peak, hwm, idle_cpu, load_s, got_a):
    secs = b["t"] - a["t"]
    cpu = 100 * (b["cpu"] - a["cpu"]) / secs
    user, system = (100 * (b[k] - a[k]) / secs for k in ("user", "system"))
    split = S.machine_split(a["machine"], b["machine"])
    others = split["procs"] - (b["cpu"] - a["cpu"] + b["sim_cpu"] - a["sim_cpu"]) / secs
    sim_cpu = 100 * (b["sim_cpu"] - a["sim_cpu"]) / secs
    sent = b["sim_sent"] - a["sim_sent"]
    received = b["received"] - a["received"]
    dropped = {k: v - a["dropped"].get(k, 0) for k, v in b["dropped"].items()
               if v - a["dropped"].get(k, 0)}
    kernel = b["kernel_drops"] - a["kernel_drops"]
    acks = b["sim_acks"] - a["sim_acks"]
    per_dev = (peak - rss0) * 1024 / n
    print()
    a_extra = (f" and notify A every {args.a_interval:g}s ({n / args.a_interval:.0f}/s)"
               if args.a_interval else "")
    print(f"{n} devices, notify B every {args.interval:g}s ({n / args.interval:.0f}/s){a_extra};"
          f" window {secs:.1f}s after {args.warmup:g}s of warm-up; {args.sim_procs}"
          " simulator process(es)")
    rows = [
        ["relay CPU under the notify load", f"{cpu:.1f}%", "< 50% of one core",
         "met" if cpu < 50 else "MISSED"],
        ["  of which user / system", f"{user:.1f}% / {system:.1f}%", "", ""],
        ["relay CPU, no traffic", "-" if idle_cpu is None else f"{idle_cpu:.1f}%", "", ""],
        ["relay RSS, 0 devices", f"{rss0 / 1024:.1f} MB", "", ""],
        ["relay RSS, loaded, before traffic", f"{rss_loaded / 1024:.1f} MB", "", ""],
        ["relay RSS, end of window (peak)", f"{rss / 1024:.1f} MB ({peak / 1024:.1f} MB)",
         "", ""],
        ["memory per device (peak - 0-device RSS)", f"{per_dev:.0f} bytes", "< 2 KB",
         "met" if per_dev < 2048 else "MISSED"],
        ["relay VmHWM (whole run)", f"{hwm / 1024:.1f} MB", "", ""],
        ["start-up with the registry loaded", f"{load_s:.1f} s", "", ""],
        ["notifies sent in the window", f"{sent} ({sent / secs:.0f}/s)", "", ""],
        ["relay received (all kinds)", f"{received:.0f} ({received / secs:.0f}/s)", "", ""],
        ["  of which notify A", f"{b['received_a'] - a['received_a']:.0f}", "", ""],
        ["relay dropped (metrics)",
         ", ".join(f"{k} {v:.0f}" for k, v in sorted(dropped.items())) or "0", "", ""],
        ["kernel socket drops (/proc/net/udp)", str(kernel), "", ""],
        ["acks back at the simulator", f"{acks} ({100 * acks / max(1, sent):.1f}% of sent)",
         "", ""],
        ["notify A asked for (NEED_NOTIFY_A)", f"{b['need_a'] - a['need_a']}", "", ""],
        ["simulator CPU / send errors / worst lag",
         f"{sim_cpu:.0f}% / {b['sim_errors'] - a['sim_errors']} / {b['sim_lag']:.0f} ms",
         "", ""],
        ["machine busy / used by others", f"{split['busy']:.2f} / {others:.2f} of"
         f" {os.cpu_count()} cores", "", ""],
    ]
    S.table(["", "measured", "target", ""], rows)
    if got_a < n:
        print(f"note: the relay counted {got_a:.0f} notify A for {n} devices in phase A")
    if args.py_spy:
        print(f"py-spy flame graph of the relay during the window: {args.py_spy}")


if __name__ == "__main__":
    S.main(main)
