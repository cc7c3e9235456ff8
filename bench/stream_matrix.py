"""
TCP over p2pnat's QUIC streams between every pair of NAT kinds in the NAT
lab, with and without loss: route, MB/s, sha256.

    sudo .venv/bin/python bench/stream_matrix.py [--pairs cone:sym-seq,...] [--size-mb 20]
                                                 [--loss 0,2] [--json FILE]

One lab (``tests.support.lab.streams.StreamLab``): a lobby with two public
addresses, for each NAT kind in {public, cone, sym-seq, sym-rand, double}
a host A behind its own router of that kind and a host B behind another
one (B's discovery checked, as in the datagram matrix).  Every B runs a
sink and ``p2pnat peer wait --service bulk=127.0.0.1:9099``; for each
ordered pair (A -> B) a ``p2pnat peer connect B --forward-tcp
127.0.0.1:0=bulk`` process starts in A's namespace and ``--size-mb`` MB
go through its port, then it stops.  Pairs run one at a time, so each
transfer has the machine to itself (as much as others' work allows).

Per pair and loss condition it prints the route (``direct``, ``relayed``,
``relayed, then direct``), what the datagram matrix expects
(``tests.support.lab.p2p.expect_direct``: direct unless a side is
symmetric-random, and random against public or cone is direct too; a
relayed path that a later punch made direct during the transfer counts as
"upgraded", not as a miss), MB/s
(TCP connect to the sink's answer, 10^6 bytes), whether both sha256 agree,
and the CPU seconds of A's and B's processes and of the lobby during the
transfer.  ``--loss 2`` drops 2 % of packets each way on every WAN link
(nftables on the lab's internet switch, matching each host's public
address), so a packet between two NATs crosses two lossy links.  The lobby
relays at ``--relay-rate`` bytes/s per session (64 MiB/s here; the
daemon's default of 512 KiB/s would hold a relayed 20 MB for 40 s).

Exit status 1 if any transfer failed or took another route than expected.
Needs root (namespaces), iproute2, nftables and conntrack; every namespace
is removed at the end (also on ^C).
"""

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import _support as S  # noqa: E402

SHORT = {"public": "public", "cone": "cone", "symmetric-sequential": "sym-seq",
         "symmetric-random": "sym-rand", "double": "double"}
LONG = {v: k for k, v in SHORT.items()}


def kind_name(text):
    if text in SHORT:
        return text
    if text in LONG:
        return LONG[text]
    raise S.BenchError(f"unknown NAT kind {text!r}: use {', '.join(SHORT.values())}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="",
                    help="only these A:B pairs, e.g. cone:sym-seq,sym-rand:sym-rand (default:"
                         " all 25)")
    ap.add_argument("--size-mb", type=float, default=20.0, help="MB per transfer (20)")
    ap.add_argument("--loss", default="0,2",
                    help="loss %% on every WAN link, each way; a comma list runs the matrix"
                         " once per value (default 0,2)")
    ap.add_argument("--relay-rate", type=int, default=64 << 20,
                    help="the lobby's --lobby-relay-rate, bytes/s per session (64 MiB)")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds one transfer may take, connect included (300)")
    ap.add_argument("--json", help="write every transfer's figures to this file")
    args = ap.parse_args(argv)
    kinds = list(SHORT)
    if args.pairs:
        args.pairs = [tuple(kind_name(k.strip()) for k in item.split(":", 1))
                      for item in args.pairs.split(",") if item.strip()]
        if any(len(p) != 2 for p in args.pairs):
            raise S.BenchError("--pairs takes A:B items")
    else:
        args.pairs = [(a, b) for a in kinds for b in kinds]
    try:
        args.loss = [float(x) for x in args.loss.split(",") if x.strip()]
    except ValueError:
        raise S.BenchError("--loss takes percentages, e.g. 0,2")
    if not 0.001 <= args.size_mb <= 1000 or any(not 0 <= x < 50 for x in args.loss) \
            or not args.loss or not 10 <= args.timeout <= 3600 or args.relay_rate < 1024:
        raise S.BenchError("--size-mb 0.001-1000, --loss 0-50 each, --timeout 10-3600,"
                           " --relay-rate at least 1024")
    return args


def build(work, args):
    """The lab, lobby up, every B served; returns (lab, {kind: (a_id, b_id)})."""
    from tests.support.lab import p2p as P
    from tests.support.lab import streams as ST

    sl = ST.StreamLab(work, relay_rate=args.relay_rate)
    try:
        kinds = sorted({k for p in args.pairs for k in p}, key=list(SHORT).index)
        ids = {}
        for kind in kinds:
            s = P.SHORT[kind]
            ids[kind] = (f"a-{s}", f"b-{s}")
            for side in ("a", "b"):
                router = sl.lab.add_router(f"r{side}{s}", kind=kind)
                sl.add_client(f"{side}-{s}", sl.lab.add_host(f"{side}{s}", behind=router))
        sl.start_lobby()
        needed_b = {b for _, b in args.pairs}
        for kind in needed_b:
            wrong = sl.serve(ids[kind][1], P.EXPECTED_NAT[kind])
            if wrong:
                S.say(f"  {ids[kind][1]}: discovery found {', '.join(map(str, wrong))} first;"
                      " started again")
    except BaseException:
        sl.close()
        raise
    return sl, ids


def run(args):
    S.need_lab("conntrack")
    from tests.support.lab import p2p as P
    from tests.support.lab import streams as ST

    size = int(args.size_mb * 1_000_000)
    work = S.workdir("stream-matrix")
    t0 = time.monotonic()
    S.say(f"stream_matrix: {len(args.pairs)} pairs x loss {args.loss} %, {args.size_mb:g} MB"
          f" each (load average {S.load_average()}); building the lab")
    sl, ids = build(work, args)
    records, bad = [], 0
    try:
        S.say(f"  lab up in {time.monotonic() - t0:.0f} s")
        wans = [ST.wan_ip(c.host) for c in sl.clients.values()]
        for loss_pct in args.loss:
            loss = ST.Loss(sl.lab, "matrixloss", wans, loss_pct).start() if loss_pct else None
            rows = []
            try:
                for ka, kb in args.pairs:
                    label = f"{SHORT[ka]} -> {SHORT[kb]}"
                    expected = "direct" if P.expect_direct(ka, kb) else "relayed"
                    r = sl.transfer(ids[ka][0], ids[kb][1], size, timeout=args.timeout,
                                    pair=label)
                    # A relayed path upgrades by itself when a later punch
                    # works (every --upgrade-interval, 20 s): that is the
                    # expected start, and better.
                    upgraded = expected == "relayed" and r.route == "relayed, then direct"
                    match = r.route == expected or upgraded
                    bad += not (r.ok and match)
                    p = r.path or {}
                    rows.append([label, r.route or "-", expected,
                                 "upgraded" if upgraded else "yes" if match else "NO",
                                 f"{r.mbps:.1f}" if r.mbps else "-",
                                 f"{r.seconds:.1f}" if r.seconds else "-",
                                 "ok" if r.ok else "FAILED", p.get("strategy") or "-",
                                 r.cpu.get("a", "-"), r.cpu.get("b", "-"),
                                 r.cpu.get("lobby", "-")])
                    S.say("  " + "  ".join(map(str, rows[-1])))
                    if not r.ok:
                        S.say(f"    {r.describe()[:3000]}")
                    records.append({"pair": label, "loss_pct": loss_pct, "route": r.route,
                                    "expected": expected, "ok": r.ok, "mbps": r.mbps,
                                    "seconds": r.seconds, "path": r.path, "modes": r.modes,
                                    "cpu": r.cpu, "error": r.error})
            finally:
                if loss is not None:
                    loss.stop()
            S.say("")
            S.say(f"{args.size_mb:g} MB per pair, {loss_pct:g} % loss each way on every WAN"
                  f" link, lobby relay rate {args.relay_rate} B/s")
            S.table(["pair (A -> B)", "route", "datagram matrix", "same", "MB/s", "s",
                     "sha256", "strategy", "CPU A s", "CPU B s", "CPU lobby s"], rows)
            S.say("")
    finally:
        sl.close()
        shutil.rmtree(work, ignore_errors=True)
    S.say(f"{len(records) - bad}/{len(records)} transfers whole and on the expected route"
          f" (run took {time.monotonic() - t0:.0f} s, load average {S.load_average()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "relay_rate": args.relay_rate, "transfers": records},
                      f, indent=1, default=str)
    if bad:
        raise SystemExit(1)


def main():
    args = parse_args()
    S.main(lambda: run(args))


if __name__ == "__main__":
    main()
