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
Medians over the rounds.  A direct connection after the first reuses the
QUIC connection the previous one left (kept 10 s).

First connections are measured apart (``--firsts``, 10): each one from a
fresh ``p2pnat forward`` process (direct, then relayed, then fallback, in
turn), so the direct one needs its QUIC handshake (a new connection to the
device, through a NAT that the device's punch opens at about the time the
terminal's first packet reaches it) and the relayed one its first TLS
connection to the relay, both as a user's first ``ssh`` after starting the
forward.

The relay keeps a device's tunnel idle for a minute after its stream
ended, and the next relayed connection takes it at once: so in this run
every relayed connection finds one (the relayed path's best case).  With
``--cold-tunnels`` the relay keeps none (``--tunnel-idle-timeout
0.001``): each relayed connection waits for the device's new tunnel, as
a device's first connection in a minute does; the direct path does not
wait for it.

With ``--lose-first`` the device's router drops the terminal's first
QUIC datagram of each direct first connection, as it does when that
datagram comes just before the device's punch opened the NAT (a race the
relay starts by sending the device its request and the terminal its
offer at once): then the first byte shows how soon the terminal sends it
again.  The delay lines (bench/delayline.py, no netem
here) hold every packet the relay, the devices and the terminal send for
half the extra RTT, so each pair's round trip, the direct one included,
gets the same +20 ms.

    sudo .venv/bin/python bench/forward_direct.py [--rounds 15] [--firsts 10] [--delay-ms 20]
        [--cold-tunnels] [--lose-first]

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
        cold = ("--tunnel-idle-timeout", "0.001") if args.cold_tunnels else ()
        rl = F.RelayLab(work, os.path.join(work, "www"), relay_args=cold)
        lab = rl.lab
        rcone = lab.add_router("rcone", kind="cone")
        hosts = {"cone": lab.add_host("dcone", behind=rcone),
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
                                           "--duration", 120 + args.rounds * 10 + args.firsts * 15))
                p.wait_for_output("delayline ready", 10)
        ports, procs = {}, {}

        def forward(name, port):
            device, extra = FORWARDS[name]
            proc = term.popen(S.procs.p2pnat(
                "forward", device, "--relay", f"{rl.relay_ip}:{F.HTTPS_PORT}",
                "--relay-hostname", F.RELAY_HOSTNAME, "--ca", rl.ca,
                "--listen", f"127.0.0.1:{port}", "--json", "--verbose", *extra),
                cwd=S.procs.REPO, env=S.procs.env())
            proc.wait_for_output('"event": "forwarding"', 20)
            return proc

        def once(name, proc=None):
            proc = proc or procs[name]
            done = term.run([sys.executable, "-c", CLIENT, str(ports[name])], timeout=60)
            if done.returncode != 0:
                raise S.BenchError(f"{name}: {done.stderr[-500:]}\n{proc.stderr()[-2000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        rtt_relay = ping_rtt(term, rl.relay_ip)
        # Warm-up: the agents' first TLS sessions, the relay's first tunnels.
        for i, name in enumerate(FORWARDS):
            ports[name] = 2400 + i
        for name in FORWARDS:
            proc = forward(name, ports[name])
            once(name, proc)
            proc.stop()
        firsts = {name: [] for name in FORWARDS}
        first_paths = {name: {} for name in FORWARDS}
        first_marks = []
        for _ in range(args.firsts):
            for name in FORWARDS:
                proc = forward(name, ports[name])
                if args.lose_first and name == "direct":
                    lose_first(rcone, term.ip)
                firsts[name].append(once(name, proc))
                for path in paths_of(proc):
                    first_paths[name][path] = first_paths[name].get(path, 0) + 1
                if name == "direct":
                    first_marks.extend(marks_of(proc)[:1])
                proc.stop()
        for name in FORWARDS:
            procs[name] = forward(name, ports[name])

        # The first connection of each (the fallback's waits out the budget;
        # later ones skip the direct attempt for a while, History) is not
        # counted here: the first connections were measured above.
        for name in FORWARDS:
            once(name)
        results = {name: [] for name in FORWARDS}
        for _ in range(args.rounds):
            for name in FORWARDS:
                results[name].append(once(name))
        paths = {}
        for name, proc in procs.items():
            counted = paths_of(proc)[1:]
            paths[name] = {p: counted.count(p) for p in ("direct", "relayed")}
        report(args, f"{args.rounds} rounds on one forward process each", results, paths,
               rtt_relay)
        report(args, f"first connections: {args.firsts} fresh forward processes each", firsts,
               first_paths, rtt_relay)
        # Where the time went (the forward's debug lines).
        for line in first_marks[:3]:
            print(f"a direct first connection (its QUIC handshake included): {line}")
        for line in marks_of(procs["direct"])[-2:]:
            print(f"a later one (the parked QUIC connection reused): {line}")
    finally:
        if rl is not None:
            rl.close()
        shutil.rmtree(work, ignore_errors=True)


#: nftables table on the device's router: drops the terminal's first big UDP datagram.
LOSE_TABLE = "fwdbench_lose"


def lose_first(router, terminal_ip):
    """
    Make C{router} drop the next UDP datagram of more than 1000 bytes from
    C{terminal_ip} (a QUIC Initial; STUN and punches are small), once: a
    quota that the first such datagram uses up.
    """
    router.run(["nft", "delete", "table", "ip", LOSE_TABLE])  # the last one, if any
    ruleset = (f"table ip {LOSE_TABLE} {{\n"
               "  chain pre {\n"
               "    type filter hook prerouting priority -300; policy accept;\n"
               f"    ip saddr {terminal_ip} udp length > 1000 quota until 1300 bytes drop\n"
               "  }\n"
               "}\n")
    done = router.run(["nft", "-f", "-"], input=ruleset)
    if done.returncode != 0:
        raise S.BenchError(f"nft on {router.name}: {done.stderr.strip()}")


def paths_of(proc):
    """The path each connection of forward C{proc} took, in order (its JSON lines)."""
    return [json.loads(line)["path"] for line in proc.stdout().splitlines()
            if '"event": "path"' in line]


def marks_of(proc):
    """Where each direct connection's time went (the forward's --verbose lines)."""
    return [line.split("] ", 1)[-1] for line in proc.stderr().splitlines()
            if "direct after" in line]


def report(args, what, results, paths, rtt_relay):
    med, p90 = S.median, (lambda v: S.percentile(v, 90))
    print()
    tunnels = "no idle tunnels" if args.cold_tunnels else "idle tunnels reused"
    if args.lose_first:
        tunnels += "; each direct first connection's first QUIC datagram lost"
    print(f"forward_direct: +{args.delay_ms:g} ms on every round trip; terminal-relay RTT"
          f" {rtt_relay:.1f} ms (ping); {tunnels}; {what}, medians")
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
    ap.add_argument("--firsts", type=int, default=10,
                    help="first connections per forward, each from a fresh process (10)")
    ap.add_argument("--cold-tunnels", action="store_true",
                    help="the relay keeps no idle tunnel (each relayed connection waits for"
                         " the device's new one)")
    ap.add_argument("--lose-first", action="store_true",
                    help="the device's router drops the first QUIC datagram of each direct"
                         " first connection (as when it comes just before the punch)")
    ap.add_argument("--delay-ms", type=float, default=20.0,
                    help="extra RTT on every round trip, ms (20; 0: the lab's own)")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 200 or not 1 <= args.firsts <= 100 \
            or not 0 <= args.delay_ms <= 200:
        raise S.BenchError("--rounds 1-200, --firsts 1-100 and --delay-ms 0-200, please")
    S.need_lab("ping")
    run(args)


if __name__ == "__main__":
    S.main(main)
