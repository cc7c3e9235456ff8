"""
Notifies at scale across relay nodes: 3 nodes sharing a Redis and 3·N
simulated devices (N reporting to each node) against 1 node with N devices
and no cluster, in one run: per-node CPU and memory per device, and Redis's
operations per second (``INFO commandstats``) against what
``docs/cluster.rst`` predicts.

- Devices are registered straight into the SQLite registry as in
  bench/notify_scale.py: N into the single node's, 3·N into the first
  node's, whose state directory (terminal secret included) is copied for the
  two others.  Each node merges its registry into Redis at start (one
  script per 200 records) and reads the others' records back.
- bench/notify_sim.py simulates the devices on loopback (127.0.0.2...): one
  simulator process per node, each sending its N devices' notify A (phase
  A), then notify B every ``--interval`` seconds and notify A every
  ``--period``/3 seconds, as agents do with an access-check period
  ``--period`` (the nodes are given it).  A node writes a device's live
  entry on every third notify A (once per period: ``3600 / period`` writes
  per device and hour) and never on a notify B whose address did not
  change.
- The phases run one after the other: the single node (its simulator), then
  the three nodes (three simulators).  Each is measured over ``--window``
  seconds (default one period: every device writes its entry once in it)
  after ``--warmup`` seconds of phase B (default period/2; more than
  period/6 is needed: a device's first notify A of phase B comes within
  period/3, its first rewrite 5·period/6 after its phase-A write, and from
  then on every device writes exactly once in any window of a period).
- CPU: utime + stime of each relay (and of redis-server, and of the
  simulators) from /proc over the window.  Memory: the node's RSS at the end
  of the window minus that of the same kind of node with 0 devices, per
  device it serves (N) and per device in its registry (N or 3·N).  Redis:
  calls per command over the window, ``used_memory`` per device.

    .venv/bin/python bench/cluster_notify.py                 # N = 20 000
    .venv/bin/python bench/cluster_notify.py --devices 50000

No root needed; loopback only.  Needs redis-server.  The simulators must
keep up (their worst lag is printed): on a machine shared with other work,
lower N.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402
from cluster_session import Node, Redis, cluster_states, in_workdir  # noqa: E402
from notify_scale import SIM, last_status, register, udp_drops  # noqa: E402

from p2pnat.cluster.redis import HEARTBEAT  # noqa: E402
from p2pnat.cluster.stats import INTERVAL as STATS_INTERVAL  # noqa: E402

NODES = ("n1", "n2", "n3")
#: The relays' defaults the Redis prediction counts with: relay.sync_interval.
SYNC_INTERVAL = 0.5


def start_sims(P, args, seed, total, ports, tag):
    """One simulator per node: devices i % len(ports) == k report to ports[k]."""
    parts = len(ports)
    a_limit = max(60.0, args.devices / args.a_rate * 4)
    duration = args.warmup + args.window + 20
    sims = [P.start(f"sim-{tag}{k}", [
        sys.executable, SIM, "--relay-port", port, "--devices", total, "--seed", seed.hex(),
        "--part", f"{k}/{parts}", "--interval", args.interval,
        "--a-rate", args.a_rate * parts, "--a-interval", args.period / 3,
        "--a-limit", a_limit, "--duration", duration], cwd=S.REPO, env=S.procs.env())
        for k, port in enumerate(ports)]
    S.wait_until(lambda: all(last_status(p).get("phase") in ("B", "end") for p in sims),
                 a_limit + 60, "the simulators' notify-B phase", sims[0], interval=0.5)
    return sims


def measure(args, nodes, sims, redis=None):
    """The window's figures: per node CPU and RSS, simulators, Redis calls."""
    time.sleep(args.warmup)

    def snap():
        return {"t": time.monotonic(), "machine": S.machine_cpu(),
                "cpu": {n.name: S.cpu_seconds(n.pid) for n in nodes},
                "drops": {n.name: udp_drops(n.udp_port)[0] or 0 for n in nodes},
                "received": {n.name: S.metric_sum(n.metrics(), "p2pnat_udp_received_total")
                             for n in nodes},
                "sim_cpu": sum(S.cpu_seconds(p.pid) for p in sims),
                "sim_sent": sum(last_status(p).get("sent_a", 0) + last_status(p).get("sent_b", 0)
                                for p in sims),
                "redis_cpu": S.cpu_seconds(redis.proc.pid) if redis else 0.0,
                "calls": redis.commandstats() if redis else {}}

    a = snap()
    time.sleep(args.window)
    b = snap()
    for n in nodes:
        if n.proc.poll() is not None:
            raise S.BenchError(f"{n.name} exited\n{n.proc.tail()}")
    secs = b["t"] - a["t"]
    return {
        "secs": secs,
        "cpu": {k: 100 * (b["cpu"][k] - a["cpu"][k]) / secs for k in a["cpu"]},
        "rss": {n.name: S.status_kb(n.pid, "VmRSS") for n in nodes},
        "drops": {k: b["drops"][k] - a["drops"][k] for k in a["drops"]},
        "received": {k: (b["received"][k] - a["received"][k]) / secs for k in a["received"]},
        "sent": (b["sim_sent"] - a["sim_sent"]) / secs,
        "sim_cpu": 100 * (b["sim_cpu"] - a["sim_cpu"]) / secs,
        "sim_lag": max(last_status(p).get("lag_max_ms", 0) for p in sims),
        "redis_cpu": 100 * (b["redis_cpu"] - a["redis_cpu"]) / secs,
        "calls": {k: (b["calls"].get(k, 0) - a["calls"].get(k, 0)) / secs
                  for k in b["calls"] if b["calls"].get(k, 0) - a["calls"].get(k, 0)},
        "busy": S.machine_split(a["machine"], b["machine"])["busy"],
        "load": os.getloadavg(),  # the machine's, other work included
    }


def baseline_rss(P, state, redis_url=None, name="base"):
    """RSS (kB) of a node with no device, 3 s after start."""
    node = Node(P, name, state, redis_url, ())
    time.sleep(3)
    rss = S.status_kb(node.pid, "VmRSS")
    node.proc.stop()
    return rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20_000, help="N, devices per node (20 000)")
    ap.add_argument("--interval", type=float, default=25.0, help="notify-B interval (25 s)")
    ap.add_argument("--period", type=int, default=60,
                    help="access-check period given to the nodes (60 s); the simulated"
                         " devices send notify A every period/3")
    ap.add_argument("--window", type=float, default=0.0,
                    help="seconds measured per phase (default: the period, in which every"
                         " device rewrites its entry once)")
    ap.add_argument("--warmup", type=float, default=-1.0,
                    help="seconds of phase B before the window (default: period / 2; at"
                         " least period / 6 for the steady state)")
    ap.add_argument("--a-rate", type=float, default=500.0,
                    help="notify A per second per simulator in phase A (500; each writes a"
                         " live entry: at 2000 a node on a busy machine fell behind its"
                         " command timeout, reconnected and started over)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    args.window = args.window or args.period
    if args.warmup < 0:
        args.warmup = args.period / 2
    if not 100 <= args.devices <= 300_000 or not 5 <= args.window <= 600:
        raise S.BenchError("--devices 100-300000 and --window 5-600 s, please")
    if not 30 <= args.period <= 3600:
        raise S.BenchError("--period 30-3600 s, please")
    in_workdir("cluster-notify", args, _run)


def _run(args, work, P):
    n, seed = args.devices, os.urandom(16)
    node_args = ("--relay-notify-b-interval", str(round(args.interval)),
                 "--relay-access-check-period", str(int(args.period)))
    S.need("redis-server")

    # -- one node, N devices, no cluster ------------------------------------
    state0 = os.path.join(work, "state0")
    single = os.path.join(work, "state-single")
    for d in (state0, single):
        S.run_cli(["relay", "init", "--state-dir", d, "--hostname", S.HOSTNAME])
    register(single, n, seed)
    rss0_single = baseline_rss(P, state0)
    t = time.monotonic()
    node = Node(P, "single", single, None, node_args)
    S.say(f"cluster_notify: single node with {n} devices up in {time.monotonic() - t:.1f}s")
    sims = start_sims(P, args, seed, n, [node.udp_port], "single")
    alone = measure(args, [node], sims)
    for p in sims + [node.proc]:
        p.stop()

    # -- three nodes, 3N devices, one Redis -----------------------------------
    redis = Redis(P, work, "cluster_notify.py")
    states, _ = cluster_states(work, list(NODES))
    register(states["n1"], 3 * n, seed)
    for name in NODES[1:]:  # the registry too: each node's SQLite has every device
        shutil.rmtree(states[name])
        shutil.copytree(states["n1"], states[name])
    # A cluster node with no device (Redis database 1: a cluster of its own).
    rss0_cluster = baseline_rss(P, state0, redis.url(1), "n0")
    t = time.monotonic()
    nodes = [Node(P, name, states[name], redis.url(), node_args) for name in NODES]
    S.wait_until(lambda: redis.command("HLEN", "p2pnat:registry") >= 3 * n, 300,
                 "the registry merged into redis", nodes[0].proc, interval=0.5)
    # Every node merges its (identical) registry at start: done when no
    # merge script has run for 3 s.
    evals = []
    S.wait_until(lambda: evals.append(redis.commandstats().get("eval", 0))
                 or (len(evals) > 6 and evals[-1] == evals[-7]), 300,
                 "the nodes' start-up merges done", nodes[0].proc, interval=0.5)
    S.say(f"cluster_notify: 3 nodes with {3 * n} devices up and merged in"
          f" {time.monotonic() - t:.1f}s")
    sims = start_sims(P, args, seed, 3 * n, [x.udp_port for x in nodes], "cluster")
    cluster = measure(args, nodes, sims, redis)
    memory = redis.info("memory")
    live = redis.command("EVAL", "return #redis.call('KEYS', ARGV[1])", 0, "p2pnat:live:*")
    _report(args, n, alone, cluster, rss0_single, rss0_cluster, memory, live)


def _load(figures):
    return ", ".join(f"{x:.1f}" for x in figures["load"])


def _report(args, n, alone, cluster, rss0_single, rss0_cluster, memory, live):
    print()
    print(f"N = {n} devices per node; notify B every {args.interval:g}s, notify A every"
          f" {args.period / 3:g}s (access-check period {args.period:g}s); windows of"
          f" {alone['secs']:.0f}s and {cluster['secs']:.0f}s")
    rows = [["1 node, N devices, no cluster", f"{alone['cpu']['single']:.1f}%",
             f"{alone['received']['single']:.0f}",
             f"{(alone['rss']['single'] - rss0_single) * 1024 / n:.0f} B", "-",
             str(alone["drops"]["single"])]]
    for name in NODES:
        grown = (cluster["rss"][name] - rss0_cluster) * 1024
        rows.append([f"cluster node {name}", f"{cluster['cpu'][name]:.1f}%",
                     f"{cluster['received'][name]:.0f}", f"{grown / n:.0f} B",
                     f"{grown / (3 * n):.0f} B", str(cluster["drops"][name])])
    S.table(["", "CPU (one core)", "datagrams/s", "RSS per device served",
             "per device registered", "kernel drops"], rows)
    mean = sum(cluster["cpu"].values()) / len(NODES)
    print(f"per-node CPU, cluster / single: {mean / max(alone['cpu']['single'], 1e-9):.2f}")
    print(f"simulators: {alone['sim_cpu']:.0f}% and {cluster['sim_cpu']:.0f}% CPU, worst lag"
          f" {alone['sim_lag']:.0f} / {cluster['sim_lag']:.0f} ms; sent {alone['sent']:.0f} /"
          f" {cluster['sent']:.0f} per s; machine busy {alone['busy']:.2f} /"
          f" {cluster['busy']:.2f} of {os.cpu_count()} cores; load average (1, 5, 15 min) at"
          f" the end of each window {_load(alone)} / {_load(cluster)}")

    # What docs/cluster.rst predicts, per second, for 3N devices and 3 nodes:
    # live entries; each node's round (relay.sync_interval) checks the epoch
    # (SET NX GET) and reads the version (GET); every 5 s a node writes its
    # heartbeat and its stats record (HSET each).
    devices = 3 * n
    rounds = len(NODES) / SYNC_INTERVAL
    predicted = {"set": devices * (3600 / args.period) / 3600 + rounds,
                 "get": rounds,
                 "hset": len(NODES) * (1 / HEARTBEAT + 1 / STATS_INTERVAL)}
    print()
    rows = []
    for cmd in sorted(set(cluster["calls"]) | set(predicted)):
        got = cluster["calls"].get(cmd, 0.0)
        want = predicted.get(cmd)
        rows.append([cmd.upper(), f"{got:.1f}", "-" if want is None else f"{want:.1f}"])
    total = sum(cluster["calls"].values())
    rows.append(["all", f"{total:.1f}", f"{sum(predicted.values()):.1f}"])
    S.table(["redis command", "calls/s measured", "predicted"], rows)
    if args.warmup <= args.period / 6 or abs(args.window - args.period) > 1e-6:
        print(f"note: the SET prediction is for a window of one period ({args.period:g}s)"
              f" starting more than {args.period / 6:g}s into phase B, when every device"
              " rewrites its entry exactly once in it")
    # Each connection a node makes selects its database once: connections
    # made in the window are nodes that lost Redis (nothing read from it for
    # the command timeout of the node's own running) and reconnected; the
    # figures above are then not a steady state.
    reconnects = round(cluster["calls"].get("select", 0.0) * cluster["secs"])
    merges = round(cluster["calls"].get("eval", 0.0) * cluster["secs"])
    if reconnects or merges:
        print(f"warning: in the window the nodes made {reconnects} connections to redis"
              f" again and ran {merges} registry merge scripts: a node was too slow to read"
              " a reply within the command timeout (a machine too busy for this N)")
    used = int(memory.get("used_memory", 0))
    print(f"redis: {cluster['redis_cpu']:.1f}% of one core; used_memory"
          f" {used / 1e6:.1f} MB for {devices} registry records and {live} live entries"
          f" ({used / devices:.0f} B per device)")


if __name__ == "__main__":
    S.main(main)
