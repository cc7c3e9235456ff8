"""
``p2pnat forward``: the first byte, and each exchange after it, direct
vs relayed, at +20 ms on every round trip, in one run.

In the NAT lab: the relay on the internet segment; a device behind a cone
NAT and one behind a symmetric NAT with random ports, each running a TCP
echo on its 127.0.0.1 and the agent; the terminal a public host running
three forwards:

- ``direct``: ``p2pnat forward cone`` (the device is reachable: QUIC);
- ``relayed``: ``p2pnat forward cone --no-direct`` (today's path);
- ``fallback``: ``p2pnat forward rand`` (direct asked for, impossible
  through a random-port NAT: its first connection is relayed after the
  budget, max(0.5 s, 4 RTT); later ones skip the attempt for a while).

Each round, for each forward in turn, a client in the terminal's
namespace connects to the forward's local port, sends one byte and times
the echo's first byte (TCP connect to the local port included: that is
what ``ssh`` waits), then ten one-byte exchanges on the same connection.
Medians over the rounds.  The delay lines (bench/delayline.py, no netem
here) hold every packet the relay, the devices and the terminal send for
half the extra RTT, so each pair's round trip, the direct one included,
gets the same +20 ms.

    sudo .venv/bin/python bench/forward_direct.py [--rounds 15] [--delay-ms 20]

Needs root (namespaces), nftables, iproute2 and ping.
"""

import argparse
import json
import os
import re
import shutil
import sys

import _support as S  # noqa: E402

from tests.support.lab import relay as F  # noqa: E402

DELAYLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delayline.py")
ECHO_PORT = 7000

ECHO = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", %d)); s.listen(64)
print("echo ready", flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
""" % ECHO_PORT

CLIENT = """
import json, socket, sys, time
t0 = time.monotonic()
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(b"x")
assert c.recv(1) == b"x"
first = time.monotonic() - t0
rtts = []
for _ in range(10):
    t = time.monotonic()
    c.sendall(b"y")
    assert c.recv(1) == b"y"
    rtts.append(time.monotonic() - t)
c.close()
print(json.dumps({"first": first * 1000, "rtt": sorted(rtts)[5] * 1000}))
"""

FORWARDS = {  # name: (device, extra forward options)
    "direct": ("cone", ()),
    "relayed": ("cone", ("--no-direct",)),
    "fallback": ("rand", ()),
}


def ping_rtt(node, target):
    done = node.run([S.which("ping"), "-c", "10", "-i", "0.1", target], timeout=30)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    return S.median(times) if times else float("nan")


def run(args):
    work = S.workdir("forward-direct")
    rl = None
    try:
        os.makedirs(os.path.join(work, "www"))
        rl = F.RelayLab(work, os.path.join(work, "www"))
        lab = rl.lab
        hosts = {"cone": lab.add_host("dcone", behind=lab.add_router("rcone", kind="cone")),
                 "rand": lab.add_host("drand", behind=lab.add_router(
                     "rrand", kind="symmetric-random"))}
        term = lab.add_host("term")
        rl.start_relay()
        for host in hosts.values():
            host.popen([sys.executable, "-c", ECHO]).wait_for_output("echo ready", 10)
        rl.start_agents([rl.add_device(name, host, web_port=ECHO_PORT, start=False)
                         for name, host in hosts.items()])
        if args.delay_ms:
            half = args.delay_ms / 2
            for node in (rl.relay_node, term, *hosts.values()):
                p = node.popen(node.python(DELAYLINE, "--delay-ms", half,
                                           "--duration", 120 + args.rounds * 10))
                p.wait_for_output("delayline ready", 10)
        ports, procs = {}, {}
        for i, (name, (device, extra)) in enumerate(FORWARDS.items()):
            ports[name] = 2400 + i
            procs[name] = term.popen(S.procs.p2pnat(
                "forward", device, "--relay", f"{rl.relay_ip}:{F.HTTPS_PORT}",
                "--relay-hostname", F.RELAY_HOSTNAME, "--ca", rl.ca,
                "--listen", f"127.0.0.1:{ports[name]}", "--json", *extra),
                cwd=S.procs.REPO, env=S.procs.env())
            procs[name].wait_for_output('"event": "forwarding"', 20)
        rtt_relay = ping_rtt(term, rl.relay_ip)
        rtt_device = ping_rtt(term, hosts["cone"].ip) if hasattr(hosts["cone"], "ip") else None

        def once(name):
            done = term.run([sys.executable, "-c", CLIENT, str(ports[name])], timeout=60)
            if done.returncode != 0:
                raise S.BenchError(f"{name}: {done.stderr[-500:]}\n{procs[name].stderr()[-2000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        # Warm-up: imports, the agents' first TLS sessions.  The fallback's
        # first connection waits out the budget; later ones skip the direct
        # attempt for a while (p2pnat.peer.direct.History).
        warm = {name: once(name) for name in FORWARDS}
        first_fallback = warm["fallback"]
        results = {name: [] for name in FORWARDS}
        for _ in range(args.rounds):
            for name in FORWARDS:
                results[name].append(once(name))
        paths = {}
        for name, proc in procs.items():
            events = [json.loads(line) for line in proc.stdout().splitlines()
                      if '"event": "path"' in line]
            paths[name] = {p: sum(e["path"] == p for e in events) for p in ("direct", "relayed")}
        report(args, results, paths, rtt_relay, rtt_device)
        # Where each direct connection's time went (the forward's debug lines).
        marks = [line.split("] ", 1)[-1] for line in procs["direct"].stderr().splitlines()
                 if "direct after" in line]
        print(f"direct's first connection (a new QUIC connection, its handshake included):"
              f" first byte {warm['direct']['first']:.1f} ms; {marks[0] if marks else ''}")
        for line in marks[-3:]:
            print(f"a later one (the parked QUIC connection reused): {line}")
        print(f"fallback's first connection (direct attempted, the budget waited out): first"
              f" byte {first_fallback['first']:.1f} ms; later ones skip the attempt")
    finally:
        if rl is not None:
            rl.close()
        shutil.rmtree(work, ignore_errors=True)


def report(args, results, paths, rtt_relay, rtt_device):
    med, p90 = S.median, (lambda v: S.percentile(v, 90))
    print()
    print(f"forward_direct: +{args.delay_ms:g} ms on every round trip; terminal-relay RTT"
          f" {rtt_relay:.1f} ms (ping); {args.rounds} rounds, medians")
    rows = []
    base = med([r["first"] for r in results["relayed"]])
    for name, rounds in results.items():
        first = [r["first"] for r in rounds]
        rtt = [r["rtt"] for r in rounds]
        took = ", ".join(f"{n} {p}" for p, n in paths[name].items() if n)
        rows.append([name, f"{med(first):.1f} ms", f"{p90(first):.1f} ms",
                     f"{med(first) / base:.2f}", f"{med(rtt):.1f} ms", took])
    S.table(["forward", "first byte", "p90", "vs relayed", "exchange RTT", "paths taken"],
            rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="connections per forward (15)")
    ap.add_argument("--delay-ms", type=float, default=20.0,
                    help="extra RTT on every round trip, ms (20; 0: the lab's own)")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 200 or not 0 <= args.delay_ms <= 200:
        raise S.BenchError("--rounds 1-200 and --delay-ms 0-200, please")
    S.need_root("network namespaces for the NAT lab")
    S.need("ip", "nft", "ping")
    from p2pnat.lab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise S.BenchError(f"the NAT lab is unavailable: {reason}")
    run(args)


if __name__ == "__main__":
    S.main(main)
