"""
The P2P path across the Linux kernel's real NATs, in the
NAT lab: a lobby (``twistd lobby``) on a server with two public addresses
and two ports each, clients behind routers of every kind running ``p2pnat
peer wait --echo`` (B) and ``p2pnat peer connect B --send ...`` (A), all as
processes in network namespaces, with their ``--json`` events as the
evidence (``path``: mode, strategy, seconds to path, probes, rounds;
``data``: the echo).

What each class shows:

- :class:`MatrixTests`: every pair of {public, cone, symmetric-sequential,
  symmetric-random, double} on A's side and on B's (25 pairs), and two
  hosts behind one NAT (for each NAT kind), :data:`TRIALS` connects each.
  Every trial connects and an echo comes back (data both ways); the path is
  direct in every trial unless a side is symmetric-random, and direct for
  symmetric-random against public or cone (the birthday punch); random
  against random, sequential or double may be relayed.  Every home LAN is
  192.168.1.0/24 (the same private range on both sides).
- :class:`BackgroundMatrixTests`: the same matrix (each LAN on its own
  range) with a background host on every NAT's LAN opening 10 new UDP flows
  per second throughout, so that other traffic takes NAT ports while a
  punch is in progress.
- :class:`LossMatrixTests`: the same matrix with 2 % packet loss each way
  on both sides' WAN links (three pings per trial, each in a QUIC packet
  of its own on the encrypted channel; at least one echo).
- :class:`PathProtocolTests`: forged probes and data (a random key under
  the session's key ID), frames under an unknown session, and a replayed
  genuine datagram, all sent from a third lab host with the peer's spoofed
  address to a punched mapping, are dropped (``bad-mac``, ``unknown-key``,
  ``replay`` in the peer's log) and never reach the application; a refused
  request fails at once with "refused"; a relayed path upgrades to direct
  once direct UDP between the routers is let through; a peer that crashed
  with a relayed path up connects again; a UDP port forward over a direct
  path between two sequential symmetric NATs.

Discovery is part of every trial (A runs it at each connect, B once when
it starts), but what it finds is checked apart from the punch: a B whose
discovery did not find what its router is (e.g. a run starved of CPU) is
started again (at most twice, reported in the summary); a trial in which
A's discovery got its NAT wrong must still connect and echo, is reported,
and is run again once, so each pair has :data:`TRIALS` trials with the
NAT known, in which the "direct" rule applies.  A second wrong discovery
in one pair fails its test.

Delay is not modelled: this kernel has no ``sch_netem`` (the lab raises
``LabUnavailable`` for ``delay_ms``), so the 20 ms case of the benchmark
plan cannot run here; loss is done with nftables and is tested.

Each matrix class builds one lab, runs the lobby and every B's ``peer
wait`` once, and runs all its pairs' trials in its first test (a few pairs
at a time, never two on one host; :data:`JOBS`); each pair's test then
checks that pair's trials.  After a class's last test its summary table is
printed (pair, trials, connected, direct, relayed, echoes, median and max
seconds to the path, median probes, rounds, strategies); with
``P2PLAB_RESULTS=FILE`` every trial is also written there as JSON.

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import json
import os
import signal
import subprocess
import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import events, first, run_tool, start_tool, wait_event, wait_for_log

#: Trials per pair (the benchmark runs more).
TRIALS = int(os.environ.get("P2PLAB_TRIALS", "3"))
#: Pairs run at once (each on its own hosts and routers).
JOBS = int(os.environ.get("P2PLAB_JOBS", "5"))
#: Seconds a matrix may take before pairs not yet started are given up.
MATRIX_BUDGET = 80.0 * TRIALS


class P2PLabTestCase(LabTestCase):
    """
    Tests sharing one :class:`~tests.support.lab.p2p.P2PLab` per class
    (:attr:`pl`): built (and, for a matrix, run) before the class's first
    test, closed after its last.
    """

    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir)

    def setUp(self):
        super().setUp()
        self.pl = self.env


# -- the matrix -------------------------------------------------------------------


class _Matrix(P2PLabTestCase):
    """
    A: one host behind a router of each kind; B: one host behind another
    router of each kind, running ``peer wait --echo``; each A host connects
    to each B host :data:`TRIALS` times.  Same NAT: a second host on each
    A-side NAT router's LAN waits, and the A host beside it connects.
    """

    #: Home LANs' range (None: each its own 10.0.N.0/24).
    lan = "192.168.1.0/24"
    loss_pct = 0
    #: New UDP flows per second from a background host on each NAT LAN.
    background = 0
    #: Pings per trial, and how many echoes must come back.
    pings = 1
    min_echoes = 1
    same_nat = ("cone", "symmetric-sequential", "symmetric-random", "double")
    title = "P2P matrix (LANs on 192.168.1.0/24)"
    # Its failures carry the trials' and B's output; the whole lab's would bury them.
    report_failures = False

    @classmethod
    def pairs(cls):
        """(label, A kind, B kind or None for same NAT)."""
        found = [(f"{a} -> {b}", a, b) for a in P.KINDS for b in P.KINDS]
        found += [(f"same NAT ({k})", k, None) for k in cls.same_nat]
        return found

    @classmethod
    def router(cls, pl, name, kind):
        lab = pl.lab
        options = {"loss_pct": cls.loss_pct} if cls.loss_pct else {}
        if kind != "public" and cls.lan:
            options["lan"] = cls.lan
        r = lab.add_router(name, kind=kind, **options)
        if cls.background and kind != "public":
            lab.add_background(f"bg{name}", behind=r, target=pl.server, rate=cls.background,
                               duration=600)
        return r

    @classmethod
    def build(cls, pl):
        a_routers = {}
        needed_a = {a for _, a, _ in cls.pairs()}
        needed_b = {b for _, _, b in cls.pairs() if b}
        for kind in P.KINDS:
            s = P.SHORT[kind]
            if kind in needed_a:
                a_routers[kind] = cls.router(pl, f"ra{s}", kind)
                pl.add_client(f"a-{s}", pl.lab.add_host(f"a{s}", behind=a_routers[kind]))
            if kind in needed_b:
                r = cls.router(pl, f"rb{s}", kind)
                pl.add_client(f"b-{s}", pl.lab.add_host(f"b{s}", behind=r))
        for kind in cls.same_nat:
            s = P.SHORT[kind]
            pl.add_client(f"s-{s}", pl.lab.add_host(f"s{s}", behind=a_routers[kind]))
        pl.start_lobby()
        # One at a time: a burst of starting processes could starve a
        # discovery run (its answers then come "too late").  A B whose
        # discovery got its NAT wrong is started again (and reported).
        cls.restarts = {}
        for cid in [cid for cid in pl.clients if not cid.startswith("a-")]:
            kind = cls.kind_of(cid)
            wrong = pl.start_checked_wait(cid, P.EXPECTED_NAT[kind], "--echo")
            if wrong:
                cls.restarts[cid] = wrong
        cls.jobs = {}
        for label, a, b in cls.pairs():
            a_id = f"a-{P.SHORT[a]}"
            b_id = f"b-{P.SHORT[b]}" if b else f"s-{P.SHORT[a]}"
            cls.jobs[label] = P.Job(label, frozenset({a_id, b_id}), cls._trials(pl, label, a_id,
                                                                                 b_id))
        t0 = time.monotonic()
        P.run_jobs(list(cls._ordered(cls.jobs.values())), JOBS, t0 + MATRIX_BUDGET)
        cls.matrix_seconds = time.monotonic() - t0

    @staticmethod
    def _ordered(jobs):
        # The pairs that take longest (several rounds, relay fallbacks) first.
        def weight(job):
            return -sum(k in job.key for k in ("symmetric-random", "double", "sequential"))

        return sorted(jobs, key=weight)

    @staticmethod
    def kind_of(cid):
        short = cid.split("-", 1)[1]
        return next(k for k, s in P.SHORT.items() if s == short)

    @classmethod
    def _trials(cls, pl, label, a_id, b_id):
        # Half a second for the echoes: the lab's round trips take a millisecond.
        args = [a for i in range(cls.pings) for a in ("--send", f"ping{i}")] + ["--wait", "4"]
        expected = P.EXPECTED_NAT[cls.kind_of(a_id)]

        def run():
            # TRIALS trials in which A's discovery found its NAT; a trial in
            # which it did not is kept (it must still connect) and one more
            # is run, once at most per pair.  Likewise a trial that got its
            # path but no echo back: a rare loss not yet explained (about 1
            # in 500 trials; see the closing note of the session that added
            # this), run again once at most per pair and reported.
            trials, misses, silent = [], 0, 0
            while (sum(not (t.discovery_miss or t.echo_retry) for t in trials) < TRIALS
                   and misses <= 1 and silent <= 1):
                t = pl.connect(a_id, b_id, *args, pair=label, sent=cls.pings)
                t.discovery_miss = t.nat != expected
                texts = {e.get("text") for e in t.echoes}
                t.echo_retry = (t.connected and not t.discovery_miss and silent == 0
                                and not texts & {f"ping{i}" for i in range(cls.pings)})
                misses += t.discovery_miss
                silent += t.echo_retry
                trials.append(t)
            return trials

        return run

    @classmethod
    def results(cls):
        return {label: (job.result or []) for label, job in cls.jobs.items()}

    @classmethod
    def finished(cls, pl):
        results = cls.results()
        table = P.pair_table(f"{cls.title}: {TRIALS} trials per pair, {JOBS} pairs at once,"
                             f" {cls.matrix_seconds:.0f}s", results)
        rnd = [t for label, ts in results.items() for t in ts
               if label in ("symmetric-random -> public", "symmetric-random -> cone",
                            "public -> symmetric-random", "cone -> symmetric-random")]
        table += (f"\nsymmetric-random vs public/cone: {sum(t.direct for t in rnd)}/{len(rnd)}"
                  " direct")
        misses = sum(t.discovery_miss for ts in results.values() for t in ts)
        table += (f"\nA's discovery wrong in {misses} of"
                  f" {sum(len(ts) for ts in results.values())} trials (each re-run once)")
        for cid, wrong in cls.restarts.items():
            table += f"\n{cid}: discovery found {', '.join(map(str, wrong))} first; started again"
        print("\n" + table, flush=True)
        out = os.environ.get("P2PLAB_RESULTS")
        if out:
            record = {
                "class": cls.__name__, "title": cls.title, "trials_per_pair": TRIALS,
                "jobs": JOBS, "seconds": cls.matrix_seconds,
                "restarts": cls.restarts,
                "pairs": {label: {"stats": P.pair_stats(ts),
                                  "trials": [{"mode": t.mode, "path": t.path, "nat": t.nat,
                                              "echoes": len(t.echoes), "exit": t.returncode,
                                              "wall": round(t.wall, 3)} for t in ts]}
                          for label, ts in results.items()},
            }
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check_pair(self, label, a_kind, b_kind):
        job = self.jobs[label]
        if job.error is not None:
            self.fail(f"{label}: {job.error!r}")
        trials = job.result
        must_be_direct = b_kind is None or P.expect_direct(a_kind, b_kind)
        b_id = next(iter(job.hosts - {f"a-{P.SHORT[a_kind]}"}))
        waiter = self.pl.clients[b_id].waiter
        expected = P.EXPECTED_NAT[a_kind]
        b_expected = P.EXPECTED_NAT[b_kind or a_kind]

        def why(t):
            return f"{t.describe()}\nB: {waiter.describe(3000)}"

        b_nat = P.nat_of(events(waiter.stdout()))
        self.assertEqual(b_nat, b_expected,
                         f"{b_id}'s discovery (also when started again) found {b_nat}, not"
                         f" {b_expected}: {self.restarts.get(b_id)}\n{waiter.describe(3000)}")
        misses = [t for t in trials if t.discovery_miss]
        self.assertLessEqual(len(misses), 1, "A's discovery got its NAT wrong twice:\n"
                             + "\n".join(t.describe() for t in misses))
        retried = [t for t in trials if t.echo_retry]
        self.assertLessEqual(len(retried), 1, "two trials got no echo back:\n"
                             + "\n".join(why(t) for t in retried))
        self.assertEqual(len(trials) - len(misses) - len(retried), TRIALS, label)
        for t in trials:
            if t.echo_retry:
                self.assertTrue(t.connected, f"not connected: {why(t)}")
                print(f"\n  [{label}: one trial connected but got no echo; run again]\n"
                      f"  {t.describe()}", flush=True)
                continue
            self.assertTrue(t.connected, f"not connected: {why(t)}")
            self.assertEqual(t.returncode, 0, why(t))
            texts = {e.get("text") for e in t.echoes}
            self.assertGreaterEqual(len(texts & {f"ping{i}" for i in range(self.pings)}),
                                    self.min_echoes, f"no echo: {why(t)}")
            # Every bundle has its certificate: the pings rode QUIC.
            self.assertIs(t.path.get("encrypted"), True, f"not encrypted: {why(t)}")
            if must_be_direct and not t.discovery_miss:
                self.assertEqual(t.mode, "direct", f"not direct: {why(t)}")
        s = P.pair_stats(trials)
        extra = f"; A's discovery found {misses[0].nat} once ({expected})" if misses else ""
        measured(f"{s['direct']}/{s['trials']} direct, median {s['median_s']:.3f}s,"
                 f" {s['median_probes']:g} probes, {', '.join(s['strategies'])}{extra}")


def _pair_tests(cls):
    """Give ``cls`` one test per pair of its matrix."""
    for label, a, b in cls.pairs():
        name = (f"test_{P.SHORT[a]}_to_{P.SHORT[b]}" if b else f"test_same_nat_{P.SHORT[a]}")

        def test(self, label=label, a=a, b=b):
            self.check_pair(label, a, b)

        test.__name__ = name
        test.__doc__ = (f"{label}: every trial connects with an echo"
                        + (", over a direct path" if b is None or P.expect_direct(a, b) else "")
                        + ".")
        setattr(cls, name, test)
    return cls


@_pair_tests
class MatrixTests(_Matrix):
    """The matrix, every home LAN on 192.168.1.0/24, and same-NAT pairs."""


@_pair_tests
class BackgroundMatrixTests(_Matrix):
    """
    The matrix with a background host on each NAT LAN (behind a double
    NAT's home router: it takes ports of both NATs) opening 10 new UDP
    flows per second for the whole run: sequential NATs' ports move on
    during the punch, and discovery measures the rate.
    """

    lan = None
    background = 10
    same_nat = ()
    title = "P2P matrix with 10 new flows/s of background traffic on each NAT LAN"


@_pair_tests
class LossMatrixTests(_Matrix):
    """The matrix with 2 % loss each way on both sides' WAN links."""

    lan = None
    loss_pct = 2
    pings = 3
    min_echoes = 1
    same_nat = ()
    title = "P2P matrix with 2 % loss each way on both WAN links"


# -- protocol: attacks, refusal, upgrade, forwarding ---------------------------------


class PathProtocolTests(P2PLabTestCase):
    """
    Two cone NATs (A side, B side), two sequential symmetric NATs, a random
    one, and a third host on the internet segment for the attacks.  Each test uses
    clients of its own on the shared hosts.
    """

    @classmethod
    def build(cls, pl):
        lab = pl.lab
        cls.ra = lab.add_router("ra", kind="cone")
        cls.rb = lab.add_router("rb", kind="cone")
        cls.ha = lab.add_host("ha", behind=cls.ra)
        cls.hb = lab.add_host("hb", behind=cls.rb)
        cls.rsa = lab.add_router("rsa", kind="symmetric-sequential")
        cls.rsb = lab.add_router("rsb", kind="symmetric-sequential")
        cls.hsa = lab.add_host("hsa", behind=cls.rsa)
        cls.hsb = lab.add_host("hsb", behind=cls.rsb)
        cls.rrb = lab.add_router("rrb", kind="symmetric-random")
        cls.hrb = lab.add_host("hrb", behind=cls.rrb)
        cls.evil = lab.add_host("evil")
        for cid, host in (("fb", cls.hb), ("refa", cls.ha), ("refb", cls.hb),
                          ("ua", cls.ha), ("ub", cls.hb), ("wa", cls.hsa), ("wb", cls.hsb),
                          ("ka", cls.hsa), ("kb", cls.hrb)):
            pl.add_client(cid, host)
        # fa's bundle has no certificate: its path stays in the MAC'd clear
        # mode whose frames test_forged_and_replayed_frames_ignored forges.
        pl.add_client("fa", cls.ha, certificate=False)
        pl.start_lobby()

    def setUp(self):
        super().setUp()
        self._blocks = []
        self.addCleanup(self._unblock_all)

    # -- helpers --------------------------------------------------------------------

    def waiter(self, cid, *args):
        proc = self.pl.start_wait(cid, *args)
        self.pl.wait_login(cid)
        return proc

    def block(self, name, pairs):
        """Drop IPv4 between each (x, y) of ``pairs``, both ways, on the internet switch."""
        inet = self.lab._internet()
        rules = "\n".join(f"    ip saddr {x} ip daddr {y} drop\n    ip saddr {y} ip daddr {x} drop"
                          for x, y in pairs)
        ruleset = (f"table bridge {name} {{\n  chain forward {{\n"
                   f"    type filter hook forward priority -10; policy accept;\n{rules}\n  }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", inet, "nft", "-f", "-"], input=ruleset, text=True,
                       check=True, capture_output=True, timeout=10)
        self._blocks.append(name)

    def unblock(self, name):
        inet = self.lab._internet()
        subprocess.run(["ip", "netns", "exec", inet, "nft", "delete", "table", "bridge", name],
                       check=True, capture_output=True, timeout=10)
        self._blocks.remove(name)

    def _unblock_all(self):
        for name in list(self._blocks):
            try:
                self.unblock(name)
            except subprocess.CalledProcessError:
                pass

    def say(self, proc, text):
        proc.popen.stdin.write(text.encode() + b"\n")
        proc.popen.stdin.flush()

    def echo_of(self, proc, text, timeout=10.0):
        return wait_event(proc, "data", timeout=timeout, where=lambda e: e.get("text") == text)

    @staticmethod
    def data_events(proc):
        return [e for e in events(proc.stdout()) if e.get("event") == "data"]

    # -- tests ------------------------------------------------------------------------

    def test_forged_and_replayed_frames_ignored(self):
        """
        With a direct path up between A and B (both behind cone NATs), a
        third host sends to B's punched mapping, from A's spoofed mapping:
        probes and data sealed with a random key under the session's key ID
        ``SESSION.a`` (``bad-mac``), data under an unknown session
        (``unknown-key``) and a replay of A's genuine data datagram captured
        on B's router (``replay``).  B's log shows each drop, its application
        receives none of them, and the path still carries A's next datagram.
        """
        from p2pnat.protocol import p2p as M

        pl = self.pl
        b = self.waiter("fb", "--echo")
        sniff = start_tool(self.rb, "sniff", "--iface", "wan", "--type", hex(M.Data.TYPE),
                           "--role", "a", "--timeout", "40")
        wait_for_log(sniff, r'"listening"')
        a = pl.start_connect("fa", "fb", "--stay", "--exit-after", "60",
                             stdin=subprocess.PIPE)
        path = wait_event(a, "path", timeout=30)
        self.assertEqual(path["mode"], "direct", a.describe())
        self.say(a, "first")
        self.echo_of(a, "first")
        sniff.wait(20)
        captured = json.loads([line for line in sniff.stdout().splitlines()
                               if '"packet"' in line][0])
        session_hex = captured["key_id"].split(".")[0]
        self.assertEqual(captured["key_id"], f"{session_hex}.a")
        b_log_start = len(b.stderr())
        b_data_before = len(self.data_events(b))

        src, dst = captured["src"], captured["dst"]
        forged = [
            ("probe", captured["key_id"], "x"),
            ("data", captured["key_id"], "forged-data-under-the-session-id"),
            ("data", f"{os.urandom(16).hex()}.a", "forged-data-under-an-unknown-session"),
        ]
        for kind, key_id, payload in forged:
            run_tool(self.evil, "forge", "--src", src, "--dst", dst, "--key-id", key_id,
                     "--kind", kind, "--payload", payload, "--count", "3")
        run_tool(self.evil, "inject", "--hex", captured["packet"], "--count", "2")

        for reason in ("bad-mac", "unknown-key", "replay"):
            m = wait_for_log(b, rf"dropped datagram from {src}: {reason} [^\n]*", b_log_start,
                             stream="stderr")
            measured(m.group(0)[len("dropped datagram from "):])
        drops = b.stderr()[b_log_start:]
        self.assertGreaterEqual(drops.count(f"{src}: bad-mac Probe for {captured['key_id']}"), 3,
                                drops)
        self.assertGreaterEqual(drops.count(f"{src}: bad-mac Data for {captured['key_id']}"), 3,
                                drops)

        # The path still works, and only genuine data reached either side.
        self.say(a, "second")
        self.echo_of(a, "second")
        after = self.data_events(b)[b_data_before:]
        self.assertEqual([e.get("echoed") for e in after], [len("second")], b.describe())
        self.assertEqual([e.get("text") for e in self.data_events(a)], ["first", "second"],
                         a.describe())
        a.stop()

    def test_refused_request_refused_at_once(self):
        """
        B accepts only someone else: A's connect fails with "refused",
        promptly (from A's login to the error), and B opens no path.
        """
        b = self.waiter("refb", "--echo", "--accept", "someone-else")
        t = self.pl.connect("refa", "refb", "--send", "ping")
        self.assertNotEqual(t.returncode, 0, t.describe())
        self.assertIsNone(t.path, t.describe())
        self.assertIn("refused", t.error or "", t.describe())
        login, error = first(t.events, "login"), first(t.events, "error")
        took = error["t"] - login["t"]
        measured(f"refused {took:.3f}s after login: {t.error}")
        self.assertLess(took, 1.0, t.describe())
        self.assertIsNone(first(events(b.stdout()), "path"), b.describe())
        self.assertIn("refa asks to connect: refused", b.stderr())

    def test_relayed_path_upgrades_to_direct(self):
        """
        Direct UDP between the two routers is dropped on the internet
        switch, so the connect falls back to the lobby's relay (data flows
        through it); once the block is lifted, the path turns direct at
        the next upgrade attempt (``--upgrade-interval 3``), and with the
        lobby then cut off, data still flows: it goes direct.
        """
        pl = self.pl
        ra_wan, rb_wan = self.ra.wan_ip, self.rb.wan_ip
        b = self.waiter("ub", "--echo")
        self.block("p2pdirect", [(ra_wan, rb_wan)])
        a = pl.start_connect("ua", "ub", "--stay", "--timeout", "6", "--upgrade-interval", "3",
                             "--exit-after", "60", stdin=subprocess.PIPE)
        path = wait_event(a, "path", timeout=30)
        self.assertEqual(path["mode"], "relayed", a.describe())
        self.say(a, "relayed")
        self.echo_of(a, "relayed")
        self.unblock("p2pdirect")
        t0 = time.monotonic()
        wait_event(a, "mode", timeout=20, where=lambda e: e.get("mode") == "direct")
        took = time.monotonic() - t0
        wait_event(b, "mode", timeout=10, where=lambda e: e.get("mode") == "direct")
        measured(f"relayed after {path['seconds']:.2f}s; direct {took:.2f}s after the unblock")
        self.assertLess(took, 3 + 6, a.describe())
        # Without the lobby, only the direct path can carry the echo.
        lobby_ips = self.pl.server.ips
        self.block("p2pnolobby", [(w, s) for w in (ra_wan, rb_wan) for s in lobby_ips])
        self.say(a, "direct")
        self.echo_of(a, "direct")
        self.unblock("p2pnolobby")
        a.stop()

    def test_udp_forward_between_sequential_nats(self):
        """
        ``peer wait --forward-udp`` on B (a UDP echo service on B's host)
        and ``peer connect --forward-udp-listen`` on A, both behind
        sequential symmetric NATs: datagrams sent to A's local port come
        back from B's service, over a direct path.
        """
        pl = self.pl
        echo = start_tool(self.hsb, "echo", "--listen", "127.0.0.1:7000", "--duration", "120")
        wait_for_log(echo, r'"listening"')
        b = self.waiter("wb", "--forward-udp", "127.0.0.1:7000")
        a = pl.start_connect("wa", "wb", "--forward-udp-listen", "127.0.0.1:7001",
                             "--exit-after", "60")
        path = wait_event(a, "path", timeout=30)
        wait_event(a, "forward", timeout=10)
        self.assertEqual(path["mode"], "direct", a.describe())
        got = run_tool(self.hsa, "ping", "--to", "127.0.0.1:7001", "--count", "50",
                       "--interval", "0.02", "--timeout", "3")
        measured(f"{path['strategy']} in {path['seconds']:.3f}s; {got['echoed']}/{got['sent']}"
                 f" datagrams echoed, median rtt {got['median_rtt_ms']} ms")
        self.assertEqual(got["echoed"], got["sent"], f"{got}\n{a.describe()}\n{b.describe()}")
        a.stop()

    def test_reconnect_after_a_crash_on_a_relayed_path(self):
        """
        A (sequential NAT) and B (random NAT) can only be relayed.  A is
        killed with its path up, so B never hears its PathClose (as when
        the PathClose is lost); A's next connects are relayed again and
        echo.  (B used to take the new introduction for an upgrade of its
        stale path and not bind the relay: "the lobby does not relay this
        session", for every later connect of that peer.)
        """
        pl = self.pl
        b = self.waiter("kb", "--echo")
        a = pl.start_connect("ka", "kb", "--stay", "--no-stdin", "--exit-after", "60")
        path = wait_event(a, "path", timeout=30)
        self.assertEqual(path["mode"], "relayed", a.describe())
        wait_event(b, "path", timeout=10)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        for _ in range(2):
            t = pl.connect("ka", "kb", "--send", "again")
            self.assertEqual((t.returncode, t.mode), (0, "relayed"),
                             f"{t.describe()}\nB: {b.describe(3000)}")
            self.assertEqual([e.get("text") for e in t.echoes], ["again"], t.describe())
        measured(f"relayed again in {t.path['seconds']:.3f}s after the crash")
