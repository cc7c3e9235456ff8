"""
Bulk TCP between two hosts behind cone NATs in the NAT lab, three ways in
one run: through a direct p2pnat QUIC stream, as plain TCP over the same
lab path, and through a nebula tunnel over the same pair; and the lobby's
CPU while a direct session is up.

    sudo .venv/bin/python bench/nebula_bulk.py [--size-mb 20] [--rounds 3] [--hold 30]

The lab (``tests.support.lab.streams.StreamLab``): a lobby with two public
addresses, a host A behind a cone router, a host B behind another; a
nebula lighthouse on the public segment.  Set-up, once:

- p2pnat: B runs a sink on 127.0.0.1:9099 and ``p2pnat peer wait
  --service bulk=127.0.0.1:9099``; each QUIC round is a new ``p2pnat peer
  connect B --forward-tcp 127.0.0.1:0=bulk`` in A (a direct path: the
  cone pair punches) and the bytes through its port;
- plain TCP: a second sink on B's 0.0.0.0:9100 and a port forward on B's
  router (DNAT of its WAN port 9100 to B), which A connects to;
- nebula (Debian package; lighthouse, punchy, no relays, MTU 1300, the
  configuration ``bench/p2p_matrix.py --with-nebula`` uses, by its own
  code): a node in A and one in B, started once; A connects to B's overlay
  address, port 9100, once a ping crosses the tunnel.

Each round sends ``--size-mb`` MB each way in turn (QUIC, TCP, nebula), from
the same source tool to the same sink tool, both sha256-checked.  Per
transport: the median MB/s (TCP connect to the sink's answer) and CPU
seconds per MB of every process on both ends (source and sink tools, plus
p2pnat's two peer processes or nebula's two daemons; read from /proc, so
the kernel's work for plain TCP shows in the tools' system time).  The
target: QUIC at least 25 % of nebula's MB/s.

Last, the lobby's CPU: its process's CPU seconds over ``--hold`` seconds
with no session, then over ``--hold`` seconds of a direct session after
its set-up (one transfer of the same size inside the window, then idle).

``--py-spy DIR``: one more QUIC transfer before the rounds (not counted:
py-spy pauses a process at each sample) with ``py-spy record`` on both
``p2pnat`` processes; the raw stacks go to DIR, and the summary says which
package the innermost frame of the non-idle samples belongs to (a system
call shows as the Python frame that made it) and the top frames.

Needs root, iproute2, nftables, conntrack, ping, nebula and nebula-cert.
Every namespace is removed at the end (also on ^C).
"""

import argparse
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import _support as S  # noqa: E402

# bench/p2p_matrix.py (its nebula set-up) imports as a top-level module.
BENCH = os.path.join(REPO, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

TCP_PORT = 9100
TRANSPORTS = ("quic", "tcp", "nebula")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=20.0, help="MB per transfer (20)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are printed (3)")
    ap.add_argument("--hold", type=float, default=30.0,
                    help="seconds of the lobby CPU windows (30)")
    ap.add_argument("--skip-nebula", action="store_true", help="QUIC and TCP only")
    ap.add_argument("--py-spy", metavar="DIR",
                    help="record the two p2pnat processes with py-spy during an extra QUIC"
                         " transfer before the rounds (raw collapsed stacks in DIR) and print"
                         " where the time goes")
    args = ap.parse_args(argv)
    if not 0.001 <= args.size_mb <= 1000 or not 1 <= args.rounds <= 50 or \
            not 0 <= args.hold <= 600:
        raise S.BenchError("--size-mb 0.001-1000, --rounds 1-50, --hold 0-600")
    return args


class Nebula:
    """
    nebula over the lab's A and B hosts: ``bench/p2p_matrix.py``'s own
    set-up (``MatrixLab.start_nebula`` and ``nebula_config``, the same
    certificates, lighthouse and node configuration), run here on two
    hosts.
    """

    def __init__(self, work, lab, a, b):
        import p2p_matrix as M

        self._matrix = M
        self.work = work
        self.lab = lab
        self.lighthouse = lab.add_host("lh")
        self.endpoints = [M.Endpoint("a", a, None, f"{M.OVERLAY}.0.10"),
                          M.Endpoint("b", b, None, f"{M.OVERLAY}.0.11")]
        self.procs = []

    def start(self, timeout=30):
        """Lighthouse, then both nodes; return once A's ping crosses to B's overlay address."""
        M = self._matrix
        M.MatrixLab.start_nebula(self)
        for ep in self.endpoints:
            self.procs.append(ep.host.popen([self.nebula_bin, "-config",
                                             self.nebula_config(ep.name)]))
        a, b = self.endpoints
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = a.host.run([S.which("ping"), "-n", "-c", "1", "-W", "1", b.overlay_ip],
                              timeout=10)
            if done.returncode == 0:
                return b.overlay_ip
            time.sleep(0.1)
        raise S.BenchError(f"no nebula tunnel A -> B within {timeout}s:\n"
                           + "\n".join(p.describe(2000) for p in self.procs))

    def nebula_config(self, name, lighthouse=False):
        return self._matrix.MatrixLab.nebula_config(self, name, lighthouse)

    @property
    def pids(self):
        return [p.pid for p in self.procs]


def tcp_port_forward(router, host, port):
    """DNAT of ``router``'s WAN TCP ``port`` to ``host`` (let through its firewall)."""
    from p2pnat.lab import nft

    rules = (f"table ip benchfwd {{\n  chain prerouting {{\n"
             f"    type nat hook prerouting priority dstnat; policy accept;\n"
             f'    iifname "wan" tcp dport {port} dnat to {host.ip}:{port}\n  }}\n}}\n')
    for argv, stdin in (([S.which("nft"), "-f", "-"], rules),
                        # Ahead of the router's own "drop what is not established" rule.
                        ([S.which("nft"), "insert", "rule", "ip", nft.TABLE, "forward",
                          "iifname", "wan", "ct", "status", "dnat", "accept"], None)):
        done = router.run(argv, input=stdin, timeout=15)
        if done.returncode != 0:
            raise S.BenchError(f"port forward on {router.name}: {done.stderr.strip()}")


def py_spy(out_dir, pids):
    """
    Start ``py-spy record`` (raw collapsed stacks, 250 samples/s) on each
    of ``pids`` ({name: pid}); return a function that stops them and
    returns {name: path}.
    """
    import signal
    import subprocess

    os.makedirs(out_dir, exist_ok=True)
    spy = S.need("py-spy")
    running = {}
    for name, pid in pids.items():
        path = os.path.join(out_dir, f"{name}.txt")
        running[name] = (subprocess.Popen([spy, "record", "--format", "raw", "--rate", "250",
                                           "--pid", str(pid), "--output", path],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                         path)

    def stop():
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on ^C
        for proc, _ in running.values():
            proc.wait(30)
        return {name: path for name, (_, path) in running.items()}

    return stop


#: How the innermost frame names its owner, for py-spy's summary (first
#: match wins): the socket calls, Twisted's and p2pnat's own UDP send
#: (L{p2pnat.net.udp.SendTo}; the system call, with the kernel's path
#: through the lab, is most of their time), then by package.
OWNERS = (("Port.write (twisted/internet/udp.py", "socket calls"),
          ("SendTo.__call__ (p2pnat/net/udp.py", "socket calls"),
          ("Port.doRead (twisted/internet/udp.py", "socket calls"),
          ("Connection.doRead (twisted/internet/tcp.py", "socket calls"),
          ("untilConcludes (twisted/python/util.py", "socket calls"),
          ("aioquic/", "aioquic"), ("cryptography/", "cryptography"),
          ("p2pnat/", "p2pnat"), ("twisted/", "twisted (other)"))
#: Innermost frames that are a thread waiting, not working: left out.
IDLE = ("EPollReactor.doPoll", "Condition.wait")


def where_time_goes(path, top=12):
    """
    From a py-spy raw file, leaving out samples of a thread waiting (the
    reactor's epoll, the thread pool): each owner's share of the rest (the
    innermost frame's package; a system call shows as the Python frame
    that made it) and the innermost frames with the most samples.
    """
    owners, inner, total = {}, {}, 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frame = stack.split(";")[-1]
            if frame.startswith(IDLE):
                continue
            n = int(count)
            total += n
            owner = next((o for key, o in OWNERS if key in frame), "other")
            owners[owner] = owners.get(owner, 0) + n
            inner[frame] = inner.get(frame, 0) + n
    total = total or 1
    lines = [f"  {o:13} {100 * n / total:5.1f} %" for o, n in
             sorted(owners.items(), key=lambda x: -x[1])]
    ranked = sorted(inner.items(), key=lambda x: -x[1])[:top]
    lines += [f"  {100 * n / total:5.1f} % in  {frame[:110]}" for frame, n in ranked]
    return total, "\n".join(lines)


def run(args):
    S.need_lab("conntrack", "ping", *([] if args.skip_nebula else ["nebula", "nebula-cert"]))
    from tests.support.lab import p2p as P
    from tests.support.lab import streams as ST

    size = int(args.size_mb * 1_000_000)
    mb = size / 1e6
    work = S.workdir("nebula-bulk")
    sl = None
    results = {t: [] for t in TRANSPORTS}
    profiles = {}
    try:
        sl = ST.StreamLab(work)
        rb = sl.lab.add_router("rb", kind="cone")
        a = sl.lab.add_host("a", behind=sl.lab.add_router("ra", kind="cone"))
        b = sl.lab.add_host("b", behind=rb)
        sl.add_client("a", a)
        sl.add_client("b", b)
        S.say(f"nebula_bulk: cone -> cone, {args.size_mb:g} MB x {args.rounds} rounds"
              f" (load average {S.load_average()})")
        sl.start_lobby()
        lobby_idle = None
        if args.hold:
            c0 = ST.proc_cpu(sl.lobby.pid)
            time.sleep(args.hold)
            lobby_idle = ST.proc_cpu(sl.lobby.pid) - c0
        sl.serve("b", P.EXPECTED_NAT["cone"])
        ST.start_sink(b, "0.0.0.0", TCP_PORT)
        tcp_port_forward(rb, b, TCP_PORT)
        overlay = None
        nebula = None
        if not args.skip_nebula:
            nebula = Nebula(work, sl.lab, a, b)
            overlay = nebula.start()
            S.say(f"  nebula {nebula.nebula_version}: tunnel up")

        def record(kind, res, extra_cpu):
            sink = res.get("sink") or {}
            ok = (not res.get("error") and sink.get("received") == size
                  and sink.get("sha256") == res.get("sha256"))
            if not ok:
                raise S.BenchError(f"{kind}: transfer failed: {res}")
            cpu = res["cpu"] + sink["cpu"] + extra_cpu
            results[kind].append((mb / res["seconds"], cpu / mb))
            S.say(f"  {kind:6} {mb / res['seconds']:6.1f} MB/s  {cpu / mb:.4f} CPU s/MB"
                  f"  (tools {res['cpu'] + sink['cpu']:.2f} s, transport {extra_cpu:.2f} s)")

        if args.py_spy:
            # An extra transfer, not counted: py-spy pauses a process at each sample.
            def hook(proc):
                stop = py_spy(args.py_spy, {"a-connect": proc.pid,
                                            "b-wait": sl.clients["b"].waiter.pid})
                return lambda: profiles.update(stop())

            r = sl.transfer("a", "b", size, pair="cone -> cone", on_forward=hook)
            S.say(f"  profiled QUIC transfer (not counted): {r.mbps or 0:.1f} MB/s, ok {r.ok}")
        for i in range(args.rounds):
            S.say(f"round {i + 1}/{args.rounds}")
            r = sl.transfer("a", "b", size, pair="cone -> cone")
            if r.route != "direct":
                raise S.BenchError(f"the QUIC stream was not direct: {r.describe()}")
            record("quic", r.source, r.cpu["a"] + r.cpu["b"])
            record("tcp", ST.push(a, rb.public_ip, TCP_PORT, size), 0.0)
            if nebula:
                before = [ST.proc_cpu(p) for p in nebula.pids]
                res = ST.push(a, overlay, TCP_PORT, size)
                after = [ST.proc_cpu(p) for p in nebula.pids]
                record("nebula", res, sum(y - x for x, y in zip(before, after)))

        lobby_session = None
        if args.hold:
            proc = sl.start_connect("a", "b", "--forward-tcp", f"127.0.0.1:0={ST.SERVICE}")
            from tests.support.lab.running import wait_event

            forward = wait_event(proc, "forward-tcp", timeout=60)
            path = ST.first_path(proc)
            c0, t0 = ST.proc_cpu(sl.lobby.pid), time.monotonic()
            ST.push(a, "127.0.0.1", forward["port"], size)
            time.sleep(max(0.0, args.hold - (time.monotonic() - t0)))
            lobby_session = ST.proc_cpu(sl.lobby.pid) - c0
            proc.stop()
            if path["mode"] != "direct":
                raise S.BenchError(f"the session for the lobby window was {path['mode']}")
    finally:
        if sl is not None:
            sl.close()
        shutil.rmtree(work, ignore_errors=True)

    S.say("")
    rows, medians = [], {}
    for kind in TRANSPORTS:
        if not results[kind]:
            continue
        speed = S.median([x[0] for x in results[kind]])
        cpu = S.median([x[1] for x in results[kind]])
        medians[kind] = speed
        rows.append([kind, f"{speed:.1f} MB/s", f"{cpu:.4f}"])
    S.table(["transport", "MB/s (median)", "CPU s/MB (median, both ends)"], rows)
    if "nebula" in medians:
        share = medians["quic"] / medians["nebula"] * 100
        S.say(f"QUIC: {share:.1f} % of nebula's MB/s (target >= 25 %: "
              f"{'met' if share >= 25 else 'MISSED'}); {medians['quic'] / medians['tcp'] * 100:.0f}"
              " % of plain TCP's")
    if args.hold:
        S.say(f"lobby CPU over {args.hold:g} s: {lobby_idle:.2f} s with no session,"
              f" {lobby_session:.2f} s with a direct session up ({args.size_mb:g} MB through it)")
    for name, path in profiles.items():
        total, text = where_time_goes(path)
        S.say(f"py-spy, {name} during the profiled QUIC transfer ({total} samples not idle;"
              f" {path}):")
        S.say(text)
    S.say(f"(load average {S.load_average()})")


def main():
    args = parse_args()
    S.main(lambda: run(args))


if __name__ == "__main__":
    main()
