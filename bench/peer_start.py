"""
Start-up latency of ``p2pnat peer connect``: from the start of the
command to the first echo back through the path, for every pair of
{public, cone, symmetric-sequential} (A connects, B waits with
``--echo``; no pair of these needs a birthday punch), at the lab's own
RTT and with ``--rtt-ms`` more (bench/delayline.py), with the code of
this tree ("after") and, with ``--baseline REF``, with the code of git
revision REF ("before", e.g. ``main``) in the same run and the same lab.

A trial is one new ``p2pnat peer connect B --send ping --json`` process
in A's namespace, with the NAT hint the trials before it left (the first
trial of a pair has none); ``--no-hint`` removes it before every trial, as
on A's first run on its machine.  Its JSON events carry ``t``, seconds since the command
began (after Python's imports, before NAT discovery); the figures are:

- ``echo``: ``t`` of the first ``data`` event (the echo came back): the
  start-up latency the benchmark is about;
- ``nat``, ``login``, ``path``: ``t`` of those events, which show where
  the time goes (discovery, the lobby's welcome, the punch);
- ``wall``: from starting the process to the echo (Python start-up
  included).

Medians over the trials that echoed, per pair and per code; ``ratio`` is
after/before of the echo medians; ``RTTs`` is the echo median in units of
the measured A-lobby RTT (ping), the "<= 6 RTT at +20 ms" target's unit.

    sudo /tmp/venv/bin/python bench/peer_start.py --trials 5 --baseline main
    sudo /tmp/venv/bin/python bench/peer_start.py --rtts 0,20 --pairs cone:cone

Needs root (namespaces), iproute2, nftables, ping, ss, git (--baseline).
Every namespace is removed at the end (also on ^C).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S
import p2p_matrix as PM

from p2pnat.lab import LabError  # (_support put this tree on the path)
from p2pnat.cli.peer import NAT_HINT_FILE

KINDS = ["public", "cone", "symmetric-sequential"]


class StartLab(PM.MatrixLab):
    """The matrix's lab (one lobby, an A and a B router per kind), clients of any code tree."""

    def start_lobby(self):
        """The lobby and the client bundles (the matrix's own start, whose waiters then stop)."""
        self.start_p2pnat()
        self.stop_waiters()

    def start_waiters(self, tree):
        """Every B runs ``peer wait --echo`` with the code of C{tree}."""
        for pair in self.pairs:
            b = pair.b
            if b.waiter is None:
                b.waiter = b.host.popen(
                    [sys.executable, "-m", "p2pnat.cli", "peer", "wait", "--config", b.config,
                     "--echo", "--json", "-v"], cwd=tree, env=tree_env(tree))
        for pair in self.pairs:
            try:
                pair.b.waiter.wait_for_output('"event": "login"', 40)
            except LabError as e:
                raise S.BenchError(f"B ({pair.b.name}) did not log in: {e}") from None

    def stop_waiters(self):
        for pair in self.pairs:
            if pair.b.waiter is not None:
                pair.b.waiter.stop()
                if pair.b.waiter in self.lab.processes:
                    self.lab.processes.remove(pair.b.waiter)
                    pair.b.waiter._finish()
                pair.b.waiter = None

    def trial(self, pair, tree):
        """One ``peer connect`` with the code of C{tree}: its figures as a dict."""
        if self.args.no_hint:
            # A's first run on its machine: no NAT an earlier run measured.
            hint = os.path.join(os.path.dirname(os.path.abspath(pair.a.config)), NAT_HINT_FILE)
            if os.path.exists(hint):
                os.remove(hint)
        argv = [sys.executable, "-m", "p2pnat.cli", "peer", "connect", pair.b.name,
                "--config", pair.a.config, "--json", "--send", "ping", "--wait", "2",
                "--timeout", str(self.args.timeout)]
        t0 = time.monotonic()
        proc = pair.a.host.popen(argv, cwd=tree, env=tree_env(tree))
        try:
            # Polled every 10 ms: "wall" is that coarse, the events' own "t" is not.
            proc.wait_for_output('"event": "data"', self.args.timeout + 10)
            wall = time.monotonic() - t0
        except LabError:
            wall = None
        finally:
            proc.stop()
        events = {}
        for line in proc.stdout().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            events.setdefault(ev.get("event"), ev)
        if proc in self.lab.processes:
            self.lab.processes.remove(proc)
            proc._finish()
        path = events.get("path", {})
        return {"ok": "data" in events, "wall": wall,
                **{k: events[k]["t"] if k in events else None
                   for k in ("nat", "login", "path", "data")},
                "mode": path.get("mode"), "strategy": path.get("strategy"),
                "error": events.get("error", {}).get("error")}


def tree_env(tree):
    e = S.procs.env()
    e["PYTHONPATH"] = tree + os.pathsep + e["PYTHONPATH"]
    return e


def baseline_tree(ref, work):
    """The code of git revision C{ref} of this repository, exported to a directory."""
    dest = os.path.join(work, "baseline")
    os.makedirs(dest)
    archive = subprocess.run([S.which("git"), "-C", S.REPO, "archive", ref], capture_output=True,
                             timeout=120, check=False)
    if archive.returncode != 0:
        raise S.BenchError(f"git archive {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True, timeout=120)
    return dest


def fmt(v):
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def med(rows, key):
    return S.median([r[key] for r in rows if r["ok"] and r[key] is not None])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="trials per pair and code (5)")
    ap.add_argument("--pairs", default="",
                    help="only these A:B pairs, e.g. cone:sym-seq (default: every pair of"
                         " public, cone, sym-seq)")
    ap.add_argument("--rtts", default="0,20",
                    help="extra RTTs in ms, one lab each (default 0,20; 0: the lab's own)")
    ap.add_argument("--baseline", help="git revision whose code runs as 'before' (e.g. main)")
    ap.add_argument("--timeout", type=float, default=12.0, help="peer connect --timeout (12)")
    ap.add_argument("--json", help="write every trial's figures to this file")
    ap.add_argument("--no-hint", action="store_true",
                    help="every trial without the NAT hint an earlier run leaves (A's first"
                         " run on its machine: the connect request waits for discovery)")
    args = ap.parse_args()
    if args.pairs:
        args.pairs = [tuple(PM.kind_name(k) for k in item.strip().split(":"))
                      for item in args.pairs.split(",")]
    else:
        args.pairs = [(a, b) for a in KINDS for b in KINDS]
    if any(k not in KINDS for p in args.pairs for k in p):
        raise S.BenchError("--pairs: kinds public, cone, sym-seq only (no birthday punch)")
    args.kinds = sorted({k for p in args.pairs for k in p}, key=KINDS.index)
    args.rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    if not 1 <= args.trials <= 200 or not all(0 <= r <= 400 for r in args.rtts) or \
            not 1 <= args.timeout <= 60:
        raise S.BenchError("--trials 1-200, --rtts 0-400 each, --timeout 1-60")
    # What MatrixLab reads of its arguments.
    args.same_nat, args.loss, args.background, args.with_nebula = [], 0, 0, False
    args.max_duration = int(600 + len(args.rtts) * len(args.pairs) * args.trials * 2 * 30)
    return args


def main():
    args = parse_args()
    S.need_lab("ping", "ss", *(["git"] if args.baseline else []))
    work = S.workdir("peer-start")
    t0 = time.monotonic()
    results = []  # (rtt extra, measured rtt ms, code, pair label, [trials])
    try:
        codes = [("after", S.REPO)]
        if args.baseline:
            codes.insert(0, ("before", baseline_tree(args.baseline, work)))
        for extra in args.rtts:
            args.rtt_ms = extra
            lab_work = os.path.join(work, f"rtt{extra:g}")
            os.makedirs(lab_work)
            ml = StartLab(args, lab_work)
            try:
                ml.start_delay()
                ml.start_lobby()
                rtt = ml.ping_rtt(ml.pairs[0].a.host, ml.server.ip)
                S.say(f"peer_start: +{extra:g} ms, A-lobby RTT {rtt:.3f} ms")
                for code, tree in codes:
                    ml.start_waiters(tree)
                    for pair in ml.pairs:
                        trials = [ml.trial(pair, tree) for _ in range(args.trials)]
                        ok = sum(t["ok"] for t in trials)
                        S.say(f"  {code:<6} {pair.label:<20} {ok}/{len(trials)} echoed, median"
                              f" {fmt(med(trials, 'data'))} s")
                        results.append((extra, rtt, code, pair.label, trials))
                    ml.stop_waiters()
            finally:
                ml.close()
        report(args, results)
        print(f"\n(run took {time.monotonic() - t0:.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{"rtt_extra_ms": e, "rtt_ms": r, "code": c, "pair": p, "trials": t}
                           for e, r, c, p, t in results], f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args, results):
    print()
    print(f"p2pnat peer connect: start -> first echo, {args.trials} trials per pair and code,"
          " medians (seconds since the command began)")
    rows = []
    before = {(e, p): med(t, "data") for e, _, c, p, t in results if c == "before"}
    for extra, rtt, code, label, trials in results:
        echo = med(trials, "data")
        b = before.get((extra, label))
        rows.append([f"+{extra:g}", f"{rtt:.2f}", code, label,
                     f"{sum(t['ok'] for t in trials)}/{len(trials)}",
                     fmt(med(trials, "nat")), fmt(med(trials, "login")),
                     fmt(med(trials, "path")), fmt(echo), fmt(med(trials, "wall")),
                     f"{echo / (rtt / 1000):.1f}" if not math.isnan(echo) and rtt > 1 else "-",
                     f"{echo / b:.2f}" if code == "after" and b and not math.isnan(b) else "-"])
    S.table(["+ms", "RTT ms", "code", "pair", "echoed", "nat", "login", "path", "echo",
             "wall", "RTTs", "ratio"], rows)
    print("nat/login/path/echo: when the command reported its NAT, logged in, had the path,"
          " got the echo; wall: process start -> echo (Python start-up included); RTTs: echo"
          " over the ping RTT (only with a delay line); ratio: after/before, echo medians.")


if __name__ == "__main__":
    S.main(main)
