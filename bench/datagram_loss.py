"""
The path's datagrams under loss, one NAT pair: how many ``p2pnat peer
connect B --send ping0 --send ping1 --send ping2 --wait 4`` trials get no
echo at all, and where the datagrams were lost.

    sudo .venv/bin/python bench/datagram_loss.py --trials 40 --loss 2
    sudo .venv/bin/python bench/datagram_loss.py --pair sym-rand:cone --loss 5 --clear

The NAT lab (``tests.support.lab.p2p.P2PLab``): a lobby, a host A behind
a router of the first kind of ``--pair`` and a host B behind a router of
the second (``cone:cone`` by default), ``--loss`` % of the
packets dropped each way on both routers' WAN links (so a packet between
A and B crosses two lossy links).  B runs ``p2pnat peer wait --echo`` for
the whole run; each trial is a new ``peer connect`` on A (discovery,
login, punch, the QUIC handshake, then the pings), exactly what the P2P
loss matrix (``tests/lab/test_p2p_lab.py``, ``LossMatrixTests``) runs.
With ``--clear`` both bundles lack certificates, so the datagrams travel
in the path's own frames instead of QUIC.

Per trial it reads A's ``data`` events (echoes back) and the line B's QUIC
endpoint logs when the trial's connection ends (UDP datagrams sent and
received, unauthenticated ones, RFC 9221 datagrams sent and received), so
the summary tells the pings that reached B from the echoes that came back,
and the trials with no echo from what a packet's loss explains.  Exit
status 1 if a trial connected but got no echo.

Needs root (namespaces), iproute2, nftables and conntrack; every namespace
is removed at the end (also on ^C).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import _support as S  # noqa: E402
from bench.stream_matrix import SHORT, kind_name  # noqa: E402
#: What B's QUIC endpoint logs when a connection ends (p2pnat.quic.endpoint).
CLOSED = re.compile(r"QUIC connection to client:a closed: .*\(packets sent (\d+), received"
                    r" (\d+), unauthenticated (\d+); datagrams sent (\d+), received (\d+)\)")

#: The log lines shown for a trial without an echo.
INTERESTING = re.compile(r"p2pnat\.(quic|streams|peer\.path|peer\.punch)|QUIC|dropped")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="cone:cone",
                    help="NAT kinds of A's and B's routers (cone:cone; public, cone, sym-seq,"
                         " sym-rand, double)")
    ap.add_argument("--trials", type=int, default=40, help="connects (40)")
    ap.add_argument("--loss", type=float, default=2.0,
                    help="loss %% each way on both WAN links (2)")
    ap.add_argument("--pings", type=int, default=3, help="datagrams each trial sends (3)")
    ap.add_argument("--wait", type=float, default=4.0, help="seconds A waits for echoes (4)")
    ap.add_argument("--clear", action="store_true",
                    help="bundles without certificates: datagrams in the path's own frames")
    ap.add_argument("--json", help="write every trial's figures to this file")
    ap.add_argument("--logs", help="write both sides' whole logs of each trial without an echo"
                                   " in this directory (trial-N-a.log, trial-N-b.log)")
    args = ap.parse_args(argv)
    kinds = [kind_name(k.strip()) for k in args.pair.split(":")]
    if len(kinds) != 2:
        raise S.BenchError("--pair takes A:B")
    args.kinds = dict(zip("ab", kinds))
    args.label = f"{SHORT[kinds[0]]} -> {SHORT[kinds[1]]}"
    if not (1 <= args.trials <= 10000 and 0 <= args.loss < 50 and 1 <= args.pings <= 30
            and 0.5 <= args.wait <= 60):
        raise S.BenchError("--trials 1-10000, --loss 0-50, --pings 1-30, --wait 0.5-60")
    return args


def b_counts(waiter, start, timeout=3.0):
    """The counts B logged for the connection that ended after C{start}, or None."""
    deadline = time.monotonic() + timeout
    while True:
        m = CLOSED.search(waiter.stderr()[start:])
        if m or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not m:
        return None
    keys = ("packets_sent", "packets_received", "unauthenticated", "datagrams_sent",
            "datagrams_received")
    return dict(zip(keys, map(int, m.groups())))


def run(args):
    S.need_lab("conntrack")
    from tests.support.lab import p2p as P

    work = S.workdir("datagram-loss")
    pl = P.P2PLab(work)
    trials = []
    try:
        options = {"loss_pct": args.loss} if args.loss else {}
        for side in ("a", "b"):
            router = pl.lab.add_router(f"r{side}", kind=args.kinds[side], **options)
            pl.add_client(side, pl.lab.add_host(f"h{side}", behind=router),
                          certificate=not args.clear)
        pl.start_lobby()
        wrong = pl.start_checked_wait("b", P.EXPECTED_NAT[args.kinds["b"]], "--echo")
        if wrong:
            S.say(f"B's discovery found {', '.join(map(str, wrong))} first; started again")
        waiter = pl.clients["b"].waiter
        sends = [a for i in range(args.pings) for a in ("--send", f"ping{i}")]
        S.say(f"datagram_loss: {args.label}, {args.loss:g} % loss"
              f" each way per WAN link, {args.pings} pings per trial,"
              f" {'clear frames' if args.clear else 'QUIC'} (load average {S.load_average()})")
        for i in range(args.trials):
            start = len(waiter.stderr())
            t = pl.connect("a", "b", *sends, "--wait", f"{args.wait:g}", pair="a -> b",
                           sent=args.pings)
            texts = {e.get("text") for e in t.echoes}
            echoes = len(texts & {f"ping{j}" for j in range(args.pings)})
            counts = None if args.clear or not t.connected else b_counts(waiter, start)
            trials.append({"mode": t.mode, "encrypted": (t.path or {}).get("encrypted"),
                           "seconds": (t.path or {}).get("seconds"), "echoes": echoes,
                           "b": counts, "exit": t.returncode})
            line = (f"  trial {i}: {t.mode}, {echoes}/{args.pings} echoes"
                    + (f", B got {counts['datagrams_received']} pings and sent"
                       f" {counts['datagrams_sent']} echoes; B's UDP: sent"
                       f" {counts['packets_sent']}, received {counts['packets_received']}"
                       f" ({counts['unauthenticated']} unauthenticated)" if counts else ""))
            S.say(line)
            if t.connected and not echoes:
                # What both sides said about the path and its QUIC connection.
                S.say("    " + t.describe(0))
                both = (("A", t.stderr), ("B", waiter.stderr()[start:]))
                if args.logs:
                    os.makedirs(args.logs, exist_ok=True)
                    for who, text in both:
                        with open(os.path.join(args.logs, f"trial-{i}-{who.lower()}.log"),
                                  "w") as f:
                            f.write(text)
                for who, text in both:
                    for row in text.splitlines():
                        if INTERESTING.search(row):
                            S.say(f"    {who}: {row[25:]}")
    finally:
        pl.close()
        shutil.rmtree(work, ignore_errors=True)
    connected = [t for t in trials if t["mode"] in ("direct", "relayed")]
    silent = [t for t in connected if not t["echoes"]]
    counted = [t for t in connected if t["b"]]
    pings = args.pings * len(counted)
    reached = sum(t["b"]["datagrams_received"] for t in counted)
    echoed = sum(t["b"]["datagrams_sent"] for t in counted)
    back = sum(t["echoes"] for t in counted)
    rows = [[args.label, f"{args.loss:g} %",
             "clear" if args.clear else "QUIC", len(trials), len(connected), len(silent),
             f"{reached}/{pings}" if counted else "-", f"{back}/{echoed}" if counted else "-"]]
    S.say("")
    S.table(["pair", "loss/link", "datagrams", "trials", "connected", "no echo",
             "pings at B", "echoes at A"], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pair": args.label, "loss": args.loss, "clear": args.clear,
                       "pings": args.pings, "trials": trials}, f, indent=1)
    if silent:
        raise SystemExit(1)


def main():
    S.main(lambda: run(parse_args()))


if __name__ == "__main__":
    main()
