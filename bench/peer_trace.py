"""
Where one ``p2pnat peer connect``'s start-up time goes: every datagram A,
B and the lobby send and receive during one trial, on one time line.

The lab of bench/peer_start.py (one lobby, A behind its router, B behind
another, ``--rtt-ms`` more by bench/delayline.py), B waiting with
``peer wait --echo``, a few warm-up trials (so that A has a NAT hint, as
after any earlier run), then one traced trial: tcpdump runs in A's, B's
and the lobby's namespaces, which share the kernel's clock, and the
datagrams each process sent (as they enter the delay line) and received
(as they arrive) are printed in order, in milliseconds since the
command's start, with what each one is (a p2pnat frame's type, STUN, a
QUIC packet's type), then the command's own JSON events.

    sudo /tmp/venv/bin/python bench/peer_trace.py --pair cone:public --rtt-ms 20

NAT discovery's STUN exchanges are left out unless ``--stun``.  Needs
root (namespaces), iproute2, nftables, ping, ss and tcpdump.  Every
namespace is removed at the end (also on ^C).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402
import p2p_matrix as PM  # noqa: E402
import peer_start as PS  # noqa: E402

from p2pnat.protocol import p2p, stun, wire  # noqa: E402,F401  (p2p: its frames' names)


def describe(payload):
    """What a UDP payload is: a frame's type, STUN, a QUIC packet's type."""
    kind = stun.demux(payload)
    if kind is stun.Kind.STUN:
        return "STUN"
    if kind is stun.Kind.QUIC:
        if not payload[0] & 0x80:
            return "QUIC 1-RTT"
        return "QUIC " + ("Initial", "0-RTT", "Handshake", "Retry")[(payload[0] >> 4) & 3]
    try:
        return wire.MESSAGES[wire.parse(payload).type].__name__
    except (wire.WireError, KeyError):
        return "?"


def start_capture(node, path):
    """tcpdump in C{node}'s namespace, every UDP datagram with its payload, into C{path}."""
    out = open(path, "wb")
    try:
        return subprocess.Popen(
            ["ip", "netns", "exec", node.ns, S.which("tcpdump"), "-i", "any", "-n", "-tt",
             "-l", "-x", "-s", "256", "udp"],
            stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def read_capture(path, who):
    """(time, who, "out"/"in", source, destination, what, length) of each datagram the process saw."""
    rows, head, hexes = [], None, []

    def flush():
        if head is None:
            return
        t, dev, direction, src, dst, length = head
        raw = bytes.fromhex("".join(hexes))
        ihl = (raw[0] & 0x0F) * 4 if raw else 0
        payload = raw[ihl + 8:]
        # What the process sent enters the delay line (dly0); what it
        # received arrives on the real interface.
        if (direction == "Out" and dev == "dly0") or (direction == "In" and dev != "dly0"):
            rows.append((t, who, direction.lower(), src, dst, describe(payload) if payload
                         else "?", length))

    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("\t"):
                hexes.extend(line.split(":", 1)[1].split())
                continue
            flush()
            head, hexes = None, []
            parts = line.split()
            if len(parts) > 8 and parts[5] == ">" and "UDP," in parts:
                length = parts[-1]
                head = (float(parts[0]), parts[1], parts[2], parts[4], parts[6].rstrip(":"),
                        int(length) if length.isdigit() else 0)
    flush()
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="cone:public", help="A:B kinds (public, cone, sym-seq)")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="extra RTT (default 20; 0: none)")
    ap.add_argument("--warmup", type=int, default=2, help="untraced trials first (default 2)")
    ap.add_argument("--stun", action="store_true", help="show NAT discovery's STUN too")
    ap.add_argument("--timeout", type=float, default=12.0)
    args = ap.parse_args()
    kinds = tuple(PM.kind_name(k) for k in args.pair.split(":"))
    if len(kinds) != 2 or any(k not in PS.KINDS for k in kinds):
        raise S.BenchError("--pair A:B of public, cone, sym-seq")
    if not 0 <= args.rtt_ms <= 400 or not 0 <= args.warmup <= 20 or not 1 <= args.timeout <= 60:
        raise S.BenchError("--rtt-ms 0-400, --warmup 0-20, --timeout 1-60")
    # What StartLab (the matrix's lab) reads of its arguments.
    args.pairs, args.kinds = [kinds], sorted(set(kinds), key=PS.KINDS.index)
    args.same_nat, args.loss, args.background, args.with_nebula = [], 0, 0, False
    args.max_duration = 600
    args.no_hint = False  # the warm-up trials leave A its NAT hint (StartLab.trial)
    return args


def main():
    args = parse_args()
    S.need_lab("ping", "ss", "tcpdump")
    work = S.workdir("peer-trace")
    captures = []
    try:
        ml = PS.StartLab(args, work)
        try:
            ml.start_delay()
            ml.start_lobby()
            rtt = ml.ping_rtt(ml.pairs[0].a.host, ml.server.ip)
            ml.start_waiters(S.REPO)
            pair = ml.pairs[0]
            for _ in range(args.warmup):
                ml.trial(pair, S.REPO)
            for name, node in (("A", pair.a.host), ("B", pair.b.host), ("lobby", ml.server)):
                path = os.path.join(work, f"{name}.pcap.txt")
                captures.append((name, path, start_capture(node, path)))
            time.sleep(1.0)  # tcpdump listening
            start = time.time()
            result = ml.trial(pair, S.REPO)
            time.sleep(0.3)
        finally:
            for _, _, proc in captures:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
            ml.close()
        rows = sorted(row for name, path, _ in captures for row in read_capture(path, name))
        if not args.stun:
            rows = [r for r in rows if r[5] != "STUN"]
        report(args, pair, rtt, start, rows, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args, pair, rtt, start, rows, result):
    print(f"p2pnat peer connect {pair.label}, +{args.rtt_ms:g} ms (A-lobby RTT {rtt:.2f} ms):"
          f" first echo at {PS.fmt(result['data'])} s since the command began"
          f" ({result['mode']}, {result['strategy']})")
    # The command's clock begins after Python's imports: place it by its
    # first datagram, which leaves a moment after its "t" starts counting.
    t0 = rows[0][0] if rows else start
    print(f"\n{'ms':>8}  {'who':<5} {'':<3} {'from':>22}    {'to':<22} {'what':<16} bytes")
    for t, who, direction, src, dst, what, length in rows:
        print(f"{(t - t0) * 1000:8.1f}  {who:<5} {direction:<3} {src:>22} -> {dst:<22}"
              f" {what:<16} {length}")
    print("\nms: since A's first datagram; out: as the process sent it (before its delay line),"
          " in: as it arrived.")
    print("A's events (t: seconds since the command began):")
    for key in ("nat", "login", "path", "data"):
        if result.get(key) is not None:
            print(f"  {key}: {result[key]:.4f}")
    print(json.dumps({k: v for k, v in result.items() if k in ("ok", "mode", "strategy")}))


if __name__ == "__main__":
    S.main(main)
