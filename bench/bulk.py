"""
Bulk transfer through the relay, against nginx directly and a plain socat
TCP relay, in the same run.

nginx (Debian's) sendfile()s a large generated file (default 1 GiB, sparse:
the bytes are zeros, which costs TLS and the relay exactly what any bytes
cost) on 127.0.0.1; ``curl -o /dev/null`` downloads it:

- ``direct``       from nginx itself;
- ``socat``        through ``socat TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:NGINX``
                   (the reference: a relay written in C, no TLS);
- ``relay-http``   through the relay's plain HTTP terminal port (device leg TLS);
- ``relay-https``  through the relay's HTTPS terminal port (both legs TLS);
- ``stock-http``, ``stock-https``: the same through a second relay and agent
                   with ``--tls-fast-path false`` (Twisted's stock TLS and
                   transports), to see what p2pnat.net.fastio still buys.

Modes are interleaved round by round (the machine is shared and noisy);
figures are medians.  While each relayed transfer runs, the relay's and the
agent's RSS is sampled every 20 ms: the peak shows whether memory stays
bounded (back-pressure) or grows with the file.

Target (the relay path): relayed >= 50 % of socat's MB/s.

    sudo .venv/bin/python bench/bulk.py                 # or /tmp/venv/bin/python
    bench/bulk.py --size-mb 256 --rounds 2              # quicker

Needs nginx, socat and curl (sudo apt-get install nginx socat curl); root is
not needed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

MODES = ["direct", "socat", "relay-http", "relay-https", "stock-http", "stock-https"]
RELAYED = ["relay-http", "relay-https", "stock-http", "stock-https"]
MB = 1e6


class RSSSampler(threading.Thread):
    """Samples the RSS (kB) of some processes every C{interval} s until stopped."""

    def __init__(self, pids, interval=0.02):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.peak = {pid: 0 for pid in pids}
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], S.status_kb(pid, "VmRSS"))
                except (FileNotFoundError, ProcessLookupError, S.BenchError):
                    pass
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join(5)
        return self.peak


def curl(curl_bin, url, extra, size, max_time):
    argv = [curl_bin, "-sS", "-o", "/dev/null", "--max-time", str(max_time),
            "-w", "%{http_code} %{size_download} %{speed_download}", *extra, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 10)
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) != 3:
        raise S.BenchError(f"{' '.join(argv)}: status {done.returncode}:"
                           f" {done.stderr.strip()[-300:]} {done.stdout[-200:]}")
    code, got, speed = parts
    if code != "200" or int(got) != size:
        raise S.BenchError(f"{url}: HTTP {code}, {got} of {size} bytes")
    return float(speed) / MB


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every mode (default 3)")
    ap.add_argument("--max-time", type=int, default=120, help="seconds allowed per transfer")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not 1 <= args.size_mb <= 8192 or not 1 <= args.rounds <= 20:
        raise S.BenchError("--size-mb 1-8192 and --rounds 1-20, please")
    curl_bin, socat = S.need("curl", "socat")
    S.need("nginx")
    work = S.workdir("bulk")
    try:
        with S.Processes(work) as P:
            _run(args, curl_bin, socat, work, P)
    finally:
        if args.keep:
            S.say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, curl_bin, socat, work, P):
    root = os.path.join(work, "www")
    os.makedirs(root)
    size = args.size_mb * 1024 * 1024
    path = os.path.join(root, "big.bin")
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: no disk, no time
    os.chmod(path, 0o644)
    nginx_port, socat_port = S.free_port(), S.free_port()
    helpers = [S.start_nginx(P, work, root, nginx_port, script="bulk.py")]
    helpers.append(P.start("socat", [socat,
                                     f"TCP-LISTEN:{socat_port},fork,reuseaddr,bind=127.0.0.1",
                                     f"TCP:127.0.0.1:{nginx_port}"]))
    S.wait_until(lambda: S.port_open(socat_port), 10, "socat listening")
    rp = S.RelayPath(P, work, nginx_port)
    stock = S.RelayPath(P, work, nginx_port, fast_path=False, name="stock")
    paths = {"relay": rp, "stock": stock}
    idle_rss = {k: S.status_kb(pid, "VmRSS")
                for k, pid in {"relay": rp.relay.pid, "agent": rp.agent.pid}.items()}

    targets = {
        "direct": (f"http://127.0.0.1:{nginx_port}/big.bin", []),
        "socat": (f"http://127.0.0.1:{socat_port}/big.bin", []),
        "relay-http": (rp.url(False, "/big.bin"), rp.curl_args(False)),
        "relay-https": (rp.url(True, "/big.bin"), rp.curl_args(True)),
        "stock-http": (stock.url(False, "/big.bin"), stock.curl_args(False)),
        "stock-https": (stock.url(True, "/big.bin"), stock.curl_args(True)),
    }
    S.say(f"bulk: {args.size_mb} MiB file, {args.rounds} rounds, modes interleaved;"
          f" relay RSS idle {idle_rss['relay'] / 1024:.0f} MB,"
          f" agent {idle_rss['agent'] / 1024:.0f} MB")
    # Warm-up: the first read of the file fills the page cache (4x slower).
    curl(curl_bin, targets["direct"][0], [], size, args.max_time)
    speeds = {m: [] for m in MODES}
    peaks = {m: {"relay": [], "agent": []} for m in RELAYED}
    cpu = {m: {"relay": [], "agent": []} for m in RELAYED}
    busy = {m: [] for m in MODES}
    load = {m: [] for m in MODES}
    other = {m: [] for m in MODES}
    irq = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            url, extra = targets[mode]
            path = paths["stock" if mode.startswith("stock") else "relay"]
            pids = {"relay": path.relay.pid, "agent": path.agent.pid}
            sampler = RSSSampler(list(pids.values()))
            sampler.start()
            before = {k: S.cpu_seconds(pid) for k, pid in pids.items()}
            machine = S.machine_cpu()
            load0 = S.children_cpu_seconds() + sum(S.tree_cpu_seconds(p.pid) for p in helpers)
            t0 = time.monotonic()
            try:
                speeds[mode].append(curl(curl_bin, url, extra, size, args.max_time))
            finally:
                peak = sampler.stop()
            elapsed = time.monotonic() - t0
            split = S.machine_split(machine, S.machine_cpu())
            busy[mode].append(split["busy"])
            irq[mode].append(split["irq"] + split["steal"])
            load_cpu = (S.children_cpu_seconds() + sum(S.tree_cpu_seconds(p.pid) for p in helpers)
                        - load0)
            ours = load_cpu + sum(S.cpu_seconds(pid) - before[k] for k, pid in pids.items())
            load[mode].append(100 * load_cpu / elapsed)
            other[mode].append(split["procs"] - ours / elapsed)
            if mode in peaks:
                for k, pid in pids.items():
                    peaks[mode][k].append(peak[pid])
                    cpu[mode][k].append(100 * (S.cpu_seconds(pid) - before[k]) / elapsed)
        S.say(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m} {speeds[m][-1]:.0f} MB/s" for m in MODES))

    med = S.median
    socat_speed = med(speeds["socat"])
    rows = []
    for mode in MODES:
        v = speeds[mode]
        row = [mode, f"{med(v):.0f}", f"{min(v):.0f}-{max(v):.0f}",
               f"{100 * med(v) / socat_speed:.0f}%"]
        if mode in peaks:
            row += [f"{max(peaks[mode]['relay']) / 1024:.0f} MB",
                    f"{max(peaks[mode]['agent']) / 1024:.0f} MB",
                    f"{med(cpu[mode]['relay']):.0f}%", f"{med(cpu[mode]['agent']):.0f}%"]
        else:
            row += ["-", "-", "-", "-"]
        row += [f"{med(load[mode]):.0f}%", f"{med(busy[mode]):.2f}/{os.cpu_count()}",
                f"{med(irq[mode]):.2f}", f"{med(other[mode]):.2f}"]
        rows.append(row)
    print()
    print(f"curl -o /dev/null of a {args.size_mb} MiB file (MB = 10^6 bytes);"
          f" medians of {args.rounds} rounds; RSS idle: relay"
          f" {idle_rss['relay'] / 1024:.0f} MB, agent {idle_rss['agent'] / 1024:.0f} MB")
    S.table(["mode", "MB/s", "range", "vs socat", "relay peak RSS", "agent peak RSS",
             "relay CPU", "agent CPU", "curl+nginx+socat CPU", "machine busy", "irq+steal",
             "others"], rows)
    print("CPU columns in % of one core; machine busy: cores in use (all of it); irq+steal:"
          " cores spent in interrupts and softirqs (loopback network work is counted there)"
          " or stolen by the hypervisor; others: cores used by processes not of this bench"
          " (the machine is shared)")
    print()
    for scheme in ("http", "https"):
        fast, base = med(speeds[f"relay-{scheme}"]), med(speeds[f"stock-{scheme}"])
        print(f"fast path, {scheme}: {fast:.0f} MB/s against {base:.0f} MB/s with Twisted's"
              f" stock TLS ({fast / base:.2f}x)")
    for mode in RELAYED:
        ratio = med(speeds[mode]) / socat_speed
        print(f"target {mode}: {100 * ratio:.0f}% of socat (>= 50%):"
              f" {'met' if ratio >= 0.5 else 'MISSED'}; peak RSS relay"
              f" {max(peaks[mode]['relay']) / 1024:.0f} MB, agent"
              f" {max(peaks[mode]['agent']) / 1024:.0f} MB for a {args.size_mb} MiB file")


if __name__ == "__main__":
    S.main(main)
