"""
The P2P success matrix: for every pair of NAT kinds (A connecting, B
waiting) and for two hosts behind the same NAT, N trials of ``p2pnat peer
connect`` through the lobby, with success rate, direct rate, time to a
direct path, packets and rounds; with ``--with-nebula`` the same pairs with
nebula (lighthouse, punchy, no relays) in the same run, side by side.

The NAT lab (p2pnat.lab, network namespaces, the kernel's own NAT): one
lobby server with 2 addresses x 2 ports (RFC 5780 discovery) on the
internet segment, and for each kind K of ``--kinds`` a host A behind its own
router of kind K and a host B behind another router of kind K ("public":
no router); for each kind of ``--same-nat`` a router with two hosts on its
LAN.  Each B runs ``p2pnat peer wait --echo`` for the whole run; a trial is
one ``p2pnat peer connect B --send ping1 --send ping2 --send ping3`` in A's
namespace (a new process: NAT discovery, login, the connect request, the
punch), and it succeeded when the path was reported and an echo came back
through it (three datagrams, so that --loss does not fail a working path).

Figures per pair (medians over the trials; "p90" nearest rank):

- ``ok``: trials with a working path (direct or relayed by the lobby);
  ``direct``: trials whose path was direct.
- ``to direct``: the path event's ``seconds``, from the connect request to
  the direct path (direct trials only); ``total``: the same plus NAT
  discovery and login (``total``); ``wall``: from starting the process to
  the path event (Python start-up included), comparable with nebula's.
- ``probes``: what A's path event reports (probes A sent, all rounds);
  ``pkts``: UDP datagrams both hosts sent to anything but the lobby (or
  the lighthouse) during the trial, counted by an nftables counter in each
  host's own namespace (probes, acks, the echo, the close).
- ``rounds``: A's rounds (request, introduction, punch) until the path.

Conditions: ``--background RATE`` adds a host per LAN (and per carrier-grade
segment) opening RATE new UDP flows per second (Lab.add_background), which
consumes NAT ports during the punch; ``--loss PCT`` drops PCT % of the
packets each way on every router's WAN link (and on public hosts' links).

Delay: this kernel has no sch_netem, so ``tc netem`` cannot model the
targets' 20 ms RTT.  ``--rtt-ms R`` instead runs bench/delayline.py (a TUN
delay line, policy routing inside our own namespaces only) in the lobby,
the lighthouse and every A and B host, each holding what it sends for R/2
ms: every endpoint-to-endpoint round trip then gets R ms more.  Without it
the figures are at the lab's own RTT (tens of microseconds, printed).

nebula (``--with-nebula``, Debian package ``nebula``): a lighthouse on the
public segment; per trial both nodes (A's and B's namespaces, listening on
a random port, punchy punch+respond on, ``relay.use_relays: false``) start
fresh, and ``ping`` inside A's namespace to B's overlay address is retried
until a reply or ``--nebula-timeout`` (10 s); both nodes are then stopped.
nebula has no relay here, so success means direct.  Its time includes both
nodes' start-up and their registration with the lighthouse, like p2pnat's
"wall" includes discovery and login (B is already waiting there).

    sudo /tmp/venv/bin/python bench/p2p_matrix.py --trials 5
    sudo /tmp/venv/bin/python bench/p2p_matrix.py --with-nebula        # 20 trials per pair
    sudo /tmp/venv/bin/python bench/p2p_matrix.py --pairs cone:sym-seq,sym-rand:public \\
        --background 20 --loss 1 --rtt-ms 20 --json /tmp/matrix.json

Needs root (namespaces), iproute2, nftables, ping; nebula and nebula-cert
for --with-nebula.  Every namespace is removed at the end (also on ^C).
"""

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support as S  # noqa: E402

KINDS = ["public", "cone", "symmetric-sequential", "symmetric-random", "double"]
SHORT = {"public": "public", "cone": "cone", "symmetric-sequential": "sym-seq",
         "symmetric-random": "sym-rand", "double": "double"}
LONG = {v: k for k, v in SHORT.items()}
LOBBY_PORTS = (3478, 3479)
DELAYLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delayline.py")
OVERLAY = "10.250"  # nebula's overlay: 10.250.0.0/16 (the lab's LANs are 10.0.N.0/24)
COUNTER_TABLE = "p2pbench"
#: A trial sends three datagrams over its path: one echo back is enough (with
#: --loss a single datagram or its echo may be lost; the path is still there).
ECHO_SENDS = ("--send", "ping1", "--send", "ping2", "--send", "ping3")


# -- small helpers ----------------------------------------------------------------

def kind_name(text):
    """A kind from its long or short name."""
    if text in KINDS:
        return text
    if text in LONG:
        return LONG[text]
    raise S.BenchError(f"unknown NAT kind {text!r}: use {', '.join(SHORT.values())}")


def nat_code(text):
    """'endpoint-independent/preserving' -> 'EI/pres': a discovered NAT, short."""
    if not text:
        return "?"
    mapping, _, alloc = text.partition("/")
    m = {"none": "none", "endpoint-independent": "EI", "address-dependent": "AD",
         "address-and-port-dependent": "APD", "unknown": "unk"}.get(mapping, mapping)
    a = {"preserving": "pres", "sequential": "seq", "random": "rand",
         "unknown": "unk"}.get(alloc, alloc)
    return "none" if m == "none" else f"{m}/{a}"


def fmt_s(value):
    return "-" if value != value else f"{value:.3f}"  # NaN -> "-"


def fmt_pct(n, d):
    return "-" if not d else f"{100 * n / d:.0f} %"


def p90(values):
    return S.percentile(values, 90)


class Pair:
    """Who connects to whom: A's host and config, B's host and client ID."""

    def __init__(self, label, kind_a, kind_b, a, b, same_nat=False):
        self.label = label
        self.kind_a, self.kind_b = kind_a, kind_b
        self.a, self.b = a, b  # Endpoint
        self.same_nat = same_nat
        self.p2p = []  # trial dicts
        self.nebula = []

    @property
    def cls(self):
        """The pair's class for the targets: 'cone', 'sequential', 'random' or 'same'."""
        kinds = {self.kind_a, self.kind_b}
        if self.same_nat:
            return "same"
        if "symmetric-random" in kinds:
            return "random"
        if kinds <= {"public", "cone"}:
            return "cone"
        return "sequential"  # symmetric-sequential, or double (a cone behind a sequential CGN)


class Endpoint:
    """A host of the matrix: its lab node, router, p2pnat client and nebula identity."""

    def __init__(self, name, host, router, overlay_ip):
        self.name = name
        self.host = host
        self.router = router
        self.overlay_ip = overlay_ip
        self.config = None  # client.toml
        self.waiter = None  # B's `peer wait` process
        self.nat = None  # B's NAT as its discovery found it (mapping/allocation)


# -- the lab ------------------------------------------------------------------------

class MatrixLab:
    def __init__(self, args, work):
        from p2pnat.lab import Lab

        self.args = args
        self.work = work
        self.lab = Lab()
        self.endpoints = []
        self.pairs = []
        self.delaylines = []
        self.lighthouse = None
        self.lighthouse_proc = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # building

    def _router(self, name, kind):
        args = self.args
        if kind == "public":
            return self.lab.add_router(name, kind="public", loss_pct=args.loss) \
                if args.loss else None
        return self.lab.add_router(name, kind=kind, loss_pct=args.loss)

    def _endpoint(self, name, router):
        host = self.lab.add_host(name, behind=router)
        ep = Endpoint(name, host, router if router is not None and router.ns else None,
                      f"{OVERLAY}.0.{len(self.endpoints) + 10}")
        self.endpoints.append(ep)
        return ep

    def _build(self):
        args, lab = self.args, self.lab
        self.server = lab.add_server("lobby", addresses=2)
        self.sink = lab.add_host("sink") if args.background else None
        sides = {}
        for i, kind in enumerate(args.kinds):
            ra = self._router(f"ra{i}", kind)
            rb = self._router(f"rb{i}", kind)
            sides[kind] = (self._endpoint(f"a{i}", ra), self._endpoint(f"b{i}", rb))
        for ka, kb in args.pairs:
            self.pairs.append(Pair(f"{SHORT[ka]} -> {SHORT[kb]}", ka, kb, sides[ka][0],
                                   sides[kb][1]))
        for i, kind in enumerate(args.same_nat):
            r = self._router(f"rs{i}", kind)
            a, b = self._endpoint(f"s{i}a", r), self._endpoint(f"s{i}b", r)
            self.pairs.append(Pair(f"same NAT ({SHORT[kind]})", kind, kind, a, b, same_nat=True))
        if args.background:
            self._background()
        if args.with_nebula:
            self.lighthouse = lab.add_host("lh")
        self._counters()

    def _background(self):
        n = 0
        seen = set()
        for ep in self.endpoints:
            r = ep.router
            for router in (r, getattr(r, "upstream", None)):
                if router is None or router.ns is None or router.name in seen:
                    continue
                seen.add(router.name)
                self.lab.add_background(f"bg{n}", behind=router, target=self.sink,
                                        rate=self.args.background,
                                        duration=self.args.max_duration)
                n += 1
        S.say(f"  {n} background hosts, {self.args.background:g} new flows/s each")

    def _counters(self):
        """An nftables counter in each host: UDP sent to anything but the lobby/lighthouse."""
        servers = list(self.server.ips) + ([self.lighthouse.ip] if self.lighthouse else [])
        rules = (f"table ip {COUNTER_TABLE} {{\n"
                 "  counter peer { }\n"
                 "  chain output {\n"
                 "    type filter hook output priority filter; policy accept;\n"
                 # Not the delay line's re-sent copies (bench/delayline.py marks them 0x64).
                 f"    meta mark != 0x64 ip daddr != {{ {', '.join(servers)} }} meta l4proto udp"
                 " counter name peer\n"
                 "  }\n}\n")
        for ep in self.endpoints:
            done = ep.host.run([S.which("nft"), "-f", "-"], input=rules, timeout=15)
            if done.returncode != 0:
                raise S.BenchError(f"nft counter in {ep.name}: {done.stderr.strip()}")

    def packets(self, ep):
        done = ep.host.run([S.which("nft"), "-j", "list", "counter", "ip", COUNTER_TABLE,
                            "peer"], timeout=15)
        try:
            for item in json.loads(done.stdout)["nftables"]:
                if "counter" in item:
                    return item["counter"]["packets"]
        except (ValueError, KeyError):
            pass
        raise S.BenchError(f"cannot read the packet counter of {ep.name}: {done.stderr.strip()}")

    # delay

    def start_delay(self):
        """bench/delayline.py with R/2 ms in every endpoint, the lobby and the lighthouse."""
        rtt = self.args.rtt_ms
        if not rtt:
            return
        if not os.path.exists(DELAYLINE):
            raise S.BenchError(f"--rtt-ms needs {DELAYLINE} (the TUN delay line)")
        nodes = [self.server] + ([self.lighthouse] if self.lighthouse else []) + \
            [ep.host for ep in self.endpoints]
        for node in nodes:
            p = node.popen(node.python(DELAYLINE, "--delay-ms", rtt / 2,
                                       "--duration", self.args.max_duration))
            p.wait_for_output("delayline ready", 15)
            self.delaylines.append(p)
            if self.args.with_nebula:
                # Overlay packets skip the delay line: nebula's own UDP is delayed already.
                node.run(["ip", "rule", "add", "to", f"{OVERLAY}.0.0/16", "lookup", "main",
                          "pref", "150"], timeout=10)

    def ping_rtt(self, node, target, count=10):
        done = node.run([S.which("ping"), "-n", "-c", str(count), "-i", "0.05", target],
                        timeout=30)
        times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
        return S.median(times) if times else float("nan")

    # p2pnat

    def start_p2pnat(self):
        state = os.path.join(self.work, "lobby-state")
        ips = self.server.ips
        lobby = f"{ips[0]}:{LOBBY_PORTS[0]}"
        discovery = ", ".join(f'"{ip}:{p}"' for ip in ips for p in LOBBY_PORTS)
        for ep in self.endpoints:
            out = os.path.join(self.work, "clients", ep.name)
            S.run_cli(["client", "add", ep.name, "--state-dir", state, "--lobby", lobby,
                       "--out", out])
            ep.config = os.path.join(out, "client.toml")
            with open(ep.config, "a") as f:
                f.write(f"discovery = [{discovery}]\n")
        self.lobby = self.server.popen(S.procs.twistd(
            "lobby", "--lobby-state-dir", state, "--log-level", "warn",
            "--udp-listen", ",".join(f"{ip}:{p}" for ip in ips for p in LOBBY_PORTS)),
            cwd=S.procs.REPO, env=S.procs.env())
        # B's discovery runs once, when `peer wait` starts: the lobby must answer by then
        # (a B that found no lobby keeps an unknown NAT for its whole session).
        want = {f"{ip}:{p}" for ip in ips for p in LOBBY_PORTS}

        def listening():
            if self.lobby.poll() is not None:
                raise S.BenchError(f"the lobby exited\n{self.lobby.describe()}")
            done = self.server.run([S.which("ss"), "-Hlun"], timeout=10)
            return want <= {f.split()[3] for f in done.stdout.splitlines() if len(f.split()) > 3}

        S.wait_until(listening, 60, "the lobby's UDP sockets")
        for pair in self.pairs:
            b = pair.b
            if b.waiter is None:
                b.waiter = b.host.popen(S.procs.p2pnat(
                    "peer", "wait", "--config", b.config, "--echo", "--json", "-v"),
                    cwd=S.procs.REPO, env=S.procs.env())
        for pair in self.pairs:
            try:
                out = pair.b.waiter.wait_for_output('"event": "login"', 40)
            except Exception as e:
                raise S.BenchError(f"B ({pair.b.name}) did not log in: {e}\n"
                                   f"{self.lab.report()[-4000:]}")
            for line in out.splitlines():
                if '"event": "nat"' in line:
                    ev = json.loads(line)
                    # What B found at start-up: the lobby gives it to every A.
                    pair.b.nat = f"{ev['mapping']}/{ev['allocation']}"
            if pair.b.nat is None or "unknown" in pair.b.nat:
                S.say(f"  WARNING: B of {pair.label} found its NAT {pair.b.nat or '(no event)'}:"
                      " its peers will plan for the worst")

    def p2p_trial(self, pair):
        """One `peer connect`: its figures as a dict."""
        args = self.args
        argv = S.procs.p2pnat("peer", "connect", pair.b.name, "--config", pair.a.config,
                              "--json", "-v", *ECHO_SENDS, "--wait", "0.5",
                              *(["--timeout", str(args.timeout)] if args.timeout else []))
        before = self.packets(pair.a) + self.packets(pair.b)
        t0 = time.monotonic()
        proc = pair.a.host.popen(argv, cwd=S.procs.REPO, env=S.procs.env(),
                                 stdout=subprocess.PIPE)
        events, wall, buf = [], None, b""
        deadline = t0 + (args.timeout or 12) + 20
        fd = proc.popen.stdout.fileno()
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.startswith(b"{"):
                            try:
                                ev = json.loads(line)
                            except ValueError:
                                continue
                            events.append(ev)
                            if ev.get("event") == "path" and wall is None:
                                wall = time.monotonic() - t0
                elif proc.poll() is not None:
                    break
        finally:
            proc.stop()
            proc.popen.stdout.close()
            status = proc.poll()
        pkts = self.packets(pair.a) + self.packets(pair.b) - before
        path = next((e for e in events if e.get("event") == "path"), None)
        echoed = any(e.get("event") == "data" for e in events)
        nat = next((e for e in events if e.get("event") == "nat"), None)
        error = next((e.get("error") for e in events if e.get("event") == "error"), None)
        trial = {"ok": bool(path and echoed), "path": bool(path), "echo": echoed,
                 "mode": path.get("mode") if path else None,
                 "seconds": path.get("seconds") if path else None,
                 "total": path.get("total") if path else None, "wall": wall,
                 "strategy": path.get("strategy") if path else None,
                 "probes": path.get("probes") if path else None,
                 "rounds": path.get("rounds") if path else None, "pkts": pkts,
                 "nat": f"{nat['mapping']}/{nat['allocation']}" if nat else None,
                 "error": error, "status": status}
        if not trial["ok"]:
            trial["stderr"] = proc.stderr()[-3000:]
        # The lab keeps every process it started; a finished trial's is not needed.
        if proc in self.lab.processes:
            self.lab.processes.remove(proc)
            proc._finish()
        return trial

    def stop_p2pnat(self):
        for pair in self.pairs:
            if pair.b.waiter is not None:
                pair.b.waiter.stop()

    # nebula

    def start_nebula(self):
        nebula, cert = S.need("nebula", "nebula-cert")
        self.nebula_bin = nebula
        done = subprocess.run([nebula, "-version"], capture_output=True, text=True, timeout=30)
        self.nebula_version = (done.stdout.strip() or done.stderr.strip()).replace("Version: ", "")
        d = os.path.join(self.work, "nebula")
        os.makedirs(d)
        self.nebula_dir = d

        def run(*argv):
            done = subprocess.run([cert, *argv], capture_output=True, text=True, timeout=60,
                                  cwd=d)
            if done.returncode != 0:
                raise S.BenchError(f"nebula-cert {argv[0]}: {done.stderr.strip()}")

        run("ca", "-name", "p2pnat bench", "-duration", "48h", "-out-crt", "ca.crt",
            "-out-key", "ca.key")
        run("sign", "-ca-crt", "ca.crt", "-ca-key", "ca.key", "-name", "lh",
            "-ip", f"{OVERLAY}.0.1/16", "-out-crt", "lh.crt", "-out-key", "lh.key")
        for ep in self.endpoints:
            run("sign", "-ca-crt", "ca.crt", "-ca-key", "ca.key", "-name", ep.name,
                "-ip", f"{ep.overlay_ip}/16", "-out-crt", f"{ep.name}.crt",
                "-out-key", f"{ep.name}.key")
        lh = self.nebula_config("lh", lighthouse=True)
        self.lighthouse_proc = self.lighthouse.popen([nebula, "-config", lh])
        S.wait_until(lambda: "Nebula interface is active" in self.lighthouse_proc.stderr()
                     + self.lighthouse_proc.stdout(), 15, "the nebula lighthouse")

    def nebula_config(self, name, lighthouse=False):
        d = self.nebula_dir
        lh = f"{OVERLAY}.0.1"
        conf = {
            "pki": {"ca": f"{d}/ca.crt", "cert": f"{d}/{name}.crt", "key": f"{d}/{name}.key"},
            "static_host_map": {} if lighthouse else {lh: [f"{self.lighthouse.ip}:4242"]},
            "lighthouse": {"am_lighthouse": lighthouse, "interval": 60,
                           "hosts": [] if lighthouse else [lh]},
            # Nodes: a random port at each start, so each trial makes fresh NAT mappings.
            "listen": {"host": "0.0.0.0", "port": 4242 if lighthouse else 0},
            "punchy": {"punch": True, "respond": True},
            "relay": {"am_relay": False, "use_relays": False},
            "tun": {"dev": "nebula1", "mtu": 1300},
            "logging": {"level": "info"},
            "firewall": {"outbound": [{"port": "any", "proto": "any", "host": "any"}],
                         "inbound": [{"port": "any", "proto": "any", "host": "any"}]},
        }
        path = os.path.join(d, f"{name}.yml")
        with open(path, "w") as f:
            json.dump(conf, f, indent=1)  # JSON is YAML
        return path

    def nebula_trial(self, pair):
        args = self.args
        a, b = pair.a, pair.b
        before = self.packets(a) + self.packets(b)
        t0 = time.monotonic()
        procs = [ep.host.popen([self.nebula_bin, "-config", self.nebula_config(ep.name)])
                 for ep in (a, b)]
        ok, elapsed, attempts = False, None, 0
        deadline = t0 + args.nebula_timeout
        try:
            while time.monotonic() < deadline:
                left = deadline - time.monotonic()
                attempts += 1
                done = a.host.run([S.which("ping"), "-n", "-c", "1", "-W",
                                   str(max(1, min(2, int(left)))), b.overlay_ip],
                                  timeout=left + 5)
                if done.returncode == 0:
                    elapsed = time.monotonic() - t0
                    ok = elapsed <= args.nebula_timeout
                    break
                if "time=" not in done.stdout:
                    time.sleep(0.02)  # the tun device is not up yet: no route
        finally:
            logs = [p.stderr()[-2000:] + p.stdout()[-2000:] for p in procs]
            for p in procs:
                p.stop(grace=2)
                if p in self.lab.processes:
                    self.lab.processes.remove(p)
                    p._finish()
        pkts = self.packets(a) + self.packets(b) - before
        trial = {"ok": ok, "seconds": elapsed if ok else None, "pkts": pkts, "pings": attempts}
        if not ok:
            trial["log_a"], trial["log_b"] = logs
        return trial

    def close(self):
        for p in self.delaylines:
            p.stop()
        self.lab.close()


# -- running ----------------------------------------------------------------------

def run_phase(ml, name, trial_fn, store, args, trials):
    pairs = ml.pairs
    t_start = time.monotonic()
    for i, pair in enumerate(pairs, 1):
        results = getattr(pair, store)
        for n in range(trials):
            results.append(trial_fn(pair))
            time.sleep(args.pause)
        ok = sum(r["ok"] for r in results)
        direct = sum(1 for r in results if r.get("mode", "direct") == "direct" and r["ok"])
        times = [r["seconds"] for r in results if r["ok"] and r.get("mode", "direct") == "direct"]
        S.say(f"  {name} [{i}/{len(pairs)}] {pair.label:<22} {ok}/{len(results)} ok,"
              f" {direct} direct, median {fmt_s(S.median(times))} s"
              f"  ({time.monotonic() - t_start:.0f} s)")
        failed = [r for r in results if not r["ok"]]
        if failed and not args.verbose:
            # One line on why (a crash shows its exception; -v prints the whole output).
            why = (failed[0].get("error") or failed[0].get("stderr") or "").strip()
            S.say(f"    {len(failed)} failed; first: {why.splitlines()[-1][:200] if why else '?'}")
        if args.verbose:
            for r in results:
                if not r["ok"]:
                    S.say("    failed: " + json.dumps({k: v for k, v in r.items()
                                                      if not k.startswith(("stderr", "log"))}))
                    S.say("    " + (r.get("stderr") or r.get("log_a", ""))[-1500:]
                          .replace("\n", "\n    "))
                    break


def p2p_row(pair):
    rs = pair.p2p
    n = len(rs)
    ok = [r for r in rs if r["ok"]]
    direct = [r for r in ok if r["mode"] == "direct"]
    td = [r["seconds"] for r in direct]
    tot = [r["total"] for r in direct]
    wall = [r["wall"] for r in direct if r["wall"] is not None]
    probes = [r["probes"] for r in ok if r["probes"] is not None]
    pkts = [r["pkts"] for r in ok]
    rounds = [r["rounds"] for r in ok if r["rounds"] is not None]
    strategies = sorted({(r["strategy"] or "?").split(" (")[0] for r in ok})
    nats_a = sorted({r["nat"] for r in rs if r["nat"]})
    relayed = [r["seconds"] for r in ok if r["mode"] != "direct" and r["seconds"] is not None]
    return {
        "relay_med": S.median(relayed),
        "pair": pair.label, "n": n, "ok": len(ok), "direct": len(direct),
        "td_med": S.median(td), "td_p90": p90(td), "total_med": S.median(tot),
        "wall_med": S.median(wall), "probes": S.median(probes), "pkts": S.median(pkts),
        "rounds": S.median(rounds), "rounds_max": max(rounds) if rounds else float("nan"),
        "strategy": ",".join(strategies),
        "nat": f"{'+'.join(nat_code(x) for x in nats_a) or '?'} / {nat_code(pair.b.nat)}",
    }


def targets(pair, row):
    """The targets that apply to C{pair}: [(text, met)]."""
    out = [("every trial connected", row["ok"] == row["n"])]
    cls = pair.cls
    if cls != "random":
        out.append(("direct in every trial", row["direct"] == row["n"]))
    elif {pair.kind_a, pair.kind_b} & {"public", "cone"}:
        out.append((">= 99 % direct", row["n"] and row["direct"] / row["n"] >= 0.99))
    if cls in ("cone", "same"):
        out.append(("median to direct <= 1 s", row["td_med"] <= 1.0))
    elif cls == "sequential":
        out.append(("median to direct <= 3 s", row["td_med"] <= 3.0))
    return out


def report(ml, args, rtts):
    pairs = ml.pairs
    print()
    conds = [f"{args.trials} trials per pair"
             + (f" (nebula: {args.nebula_trials})" if args.with_nebula and
                args.nebula_trials != args.trials else "")]
    if args.background:
        conds.append(f"background {args.background:g} new flows/s per LAN")
    if args.loss:
        conds.append(f"loss {args.loss:g} % each way per WAN link")
    if args.rtt_ms:
        conds.append(f"delay line: +{args.rtt_ms:g} ms per RTT")
    print("p2pnat P2P matrix (A -> B: A connects, B waits): " + "; ".join(conds))
    print(f"RTT (ping, median): A-host to lobby {rtts['lobby']:.3f} ms"
          + ("" if args.rtt_ms else "  -- the lab's own RTT: this kernel has no sch_netem,"
             " so tc netem cannot add the targets' 20 ms; --rtt-ms 20 uses a TUN delay line"))
    rows = [p2p_row(p) for p in pairs]
    table = []
    for r in rows:
        table.append([r["pair"], f"{r['ok']}/{r['n']}", fmt_pct(r["direct"], r["n"]),
                      fmt_s(r["td_med"]), fmt_s(r["td_p90"]), fmt_s(r["total_med"]),
                      fmt_s(r["relay_med"]),
                      fmt_s(r["wall_med"]), f"{r['probes']:.0f}" if r["probes"] == r["probes"]
                      else "-", f"{r['pkts']:.0f}" if r["pkts"] == r["pkts"] else "-",
                      f"{r['rounds']:g}/{r['rounds_max']:g}" if r["rounds"] == r["rounds"]
                      else "-", r["strategy"], r["nat"]])
    S.table(["pair", "ok", "direct", "to direct s", "p90 s", "total s", "to relay s", "wall s",
             "probes", "pkts", "rounds med/max", "strategy", "NAT found A / B"], table)
    print("to direct: connect request -> direct path (the path event's seconds); total: the"
          " same + NAT discovery + login; wall: process start -> path event; medians over direct"
          " trials.  to relay: connect request -> relayed path (trials that ended relayed)."
          "  probes: A's (path event); pkts: UDP both hosts sent to the peer side (nftables"
          " counters); medians over successful trials.  NAT found: what discovery reported"
          " (mapping/allocation), A's in its trials, B's once at its start.")
    print()
    print("Targets (at 20 ms RTT in the issue"
          + (f"; measured here with +{args.rtt_ms:g} ms" if args.rtt_ms else
             "; measured here at the lab's RTT, see above") + "):")
    print("  direct in every trial where neither side is symmetric-random; >= 99 % direct for"
          " symmetric-random vs public/cone;")
    print("  every pair connected; median time to direct <= 1 s for cone pairs, <= 3 s for"
          " sequential-symmetric pairs (double = cone behind a sequential CGN).")
    trows, missed = [], 0
    for pair, r in zip(pairs, rows):
        for text, met in targets(pair, r):
            missed += not met
            trows.append([pair.label, text, "met" if met else "MISSED"])
    S.table(["pair", "target", ""], trows)
    print(f"{missed} target(s) missed" if missed else "every target met")
    if args.with_nebula:
        print()
        print(f"p2pnat vs nebula {ml.nebula_version} (lighthouse, punchy, no relays), same lab,"
              " same run;"
              f" nebula: time from starting both nodes to the first overlay ping reply"
              f" (timeout {args.nebula_timeout:g} s)")
        side = []
        for pair, r in zip(pairs, rows):
            nb = pair.nebula
            nok = [x["seconds"] for x in nb if x["ok"]]
            npk = [x["pkts"] for x in nb if x["ok"]]
            side.append([pair.label, f"{r['ok']}/{r['n']}", fmt_pct(r["direct"], r["n"]),
                         fmt_s(r["total_med"]), fmt_s(r["wall_med"]),
                         f"{len(nok)}/{len(nb)}", fmt_s(S.median(nok)), fmt_s(p90(nok)),
                         f"{S.median(npk):.0f}" if npk else "-"])
        S.table(["pair", "p2pnat ok", "direct", "total s", "wall s", "nebula ok (direct)",
                 "median s", "p90 s", "pkts"], side)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per pair (20)")
    ap.add_argument("--kinds", default=",".join(SHORT[k] for k in KINDS),
                    help="NAT kinds for A and B (default: all five)")
    ap.add_argument("--pairs", default="",
                    help="only these A:B pairs, e.g. cone:sym-seq,sym-rand:public"
                         " (default: every pair of --kinds)")
    ap.add_argument("--same-nat", default="cone,symmetric-random",
                    help="kinds of NAT with two hosts behind the same one (default:"
                         " cone,sym-rand; empty: none)")
    ap.add_argument("--background", type=float, default=0,
                    help="a background host per LAN opening this many new flows/s")
    ap.add_argument("--loss", type=float, default=0, help="loss %% on every WAN link, each way")
    ap.add_argument("--rtt-ms", type=float, default=0,
                    help="add this RTT between endpoints with bench/delayline.py (no netem here)")
    ap.add_argument("--timeout", type=float, default=0,
                    help="p2pnat peer connect --timeout (default: the CLI's, 12 s)")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between trials")
    ap.add_argument("--with-nebula", action="store_true", help="the same pairs with nebula")
    ap.add_argument("--nebula-trials", type=int, default=0,
                    help="trials per pair for nebula (default: --trials)")
    ap.add_argument("--nebula-timeout", type=float, default=10.0,
                    help="seconds a nebula trial may take (10)")
    ap.add_argument("--json", help="write every trial's figures to this file")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="print the first failed trial of each pair")
    args = ap.parse_args()
    args.nebula_trials = args.nebula_trials or args.trials
    args.kinds = [kind_name(k.strip()) for k in args.kinds.split(",") if k.strip()]
    args.same_nat = [kind_name(k.strip()) for k in args.same_nat.split(",") if k.strip()]
    if args.pairs:
        pairs = []
        for item in args.pairs.split(","):
            ka, _, kb = item.strip().partition(":")
            pairs.append((kind_name(ka), kind_name(kb)))
        args.pairs = pairs
        args.kinds = sorted({k for p in pairs for k in p}, key=KINDS.index)
    else:
        args.pairs = [(ka, kb) for ka in args.kinds for kb in args.kinds]
    if len(set(args.same_nat) - set(KINDS[1:])) or "public" in args.same_nat:
        raise S.BenchError("--same-nat takes NAT kinds (not public)")
    if not 1 <= args.trials <= 1000 or not 1 <= args.nebula_trials <= 1000 or \
            not 0 <= args.loss < 50 or \
            not 0 <= args.background <= 1000 or not 0 <= args.rtt_ms <= 400 or \
            not 1 <= args.nebula_timeout <= 60 or not 0 <= args.timeout <= 120:
        raise S.BenchError("--trials 1-1000, --loss 0-50, --background 0-1000, --rtt-ms 0-400,"
                           " --nebula-timeout 1-60, --timeout 0-120")
    npairs = len(args.pairs) + len(args.same_nat)
    per_pair = args.trials * ((args.timeout or 12) + 25) + (
        args.nebula_trials * (args.nebula_timeout + 5) if args.with_nebula else 0)
    # Upper bound of the run, for the helper processes' own deadlines.
    args.max_duration = int(min(86400, 600 + npairs * per_pair))
    return args


def main():
    args = parse_args()
    S.need_lab("ping", "ss", *(["nebula", "nebula-cert"] if args.with_nebula else []))
    work = S.workdir("p2p-matrix")
    ml = None
    t0 = time.monotonic()
    try:
        npairs = len(args.pairs) + len(args.same_nat)
        S.say(f"p2p_matrix: {npairs} pairs x {args.trials} trials"
              + (f" (+ nebula x {args.nebula_trials})" if args.with_nebula else "")
              + "; building the lab")
        ml = MatrixLab(args, work)
        ml.start_delay()
        ml.start_p2pnat()
        if args.with_nebula:
            ml.start_nebula()
        rtts = {"lobby": ml.ping_rtt(ml.pairs[0].a.host, ml.server.ip)}
        S.say(f"  lab up in {time.monotonic() - t0:.0f} s; A-lobby RTT {rtts['lobby']:.3f} ms")
        run_phase(ml, "p2pnat", ml.p2p_trial, "p2p", args, args.trials)
        ml.stop_p2pnat()
        if args.with_nebula:
            run_phase(ml, "nebula", ml.nebula_trial, "nebula", args, args.nebula_trials)
        report(ml, args, rtts)
        print(f"\n(run took {time.monotonic() - t0:.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items()},
                       "b_nat": {p.label: p.b.nat for p in ml.pairs},
                           "rtt_ms": rtts,
                           "pairs": [{"pair": p.label, "kind_a": p.kind_a, "kind_b": p.kind_b,
                                      "same_nat": p.same_nat, "p2pnat": p.p2p,
                                      "nebula": p.nebula} for p in ml.pairs]},
                          f, indent=1, default=str)
    finally:
        if ml is not None:
            ml.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    S.main(main)
