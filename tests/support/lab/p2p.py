"""
The P2P path's NAT lab (see ``tests/lab/test_p2p_lab.py`` and
``tests/lab/test_discovery_lab.py``).

:class:`P2PLab` is a :class:`~tests.support.lab.cases.LabSetup`: a lobby
(``twistd lobby``) on a server with two public addresses (or one) and two
ports on each (so that discovery can run all of RFC 5780), lobby clients
provisioned as ``p2pnat client add`` does (in this process: it only writes
files) with every lobby address for discovery, ``p2pnat peer wait`` and
``p2pnat peer connect`` run as processes in their hosts' namespaces, and
their ``--json`` events parsed into :class:`Trial` records.

:func:`run_jobs` runs independent jobs (one NAT pair's trials each) a few
at a time, never two at once on the same host; :func:`pair_table` is the
summary printed at the end of a matrix.
"""

import os
import statistics
import subprocess
import threading
import time
from concurrent import futures
from dataclasses import dataclass

from p2pnat.lab.topology import hostport
from tests.support import procs
from tests.support.lab.cases import LabSetup
from tests.support.lab.running import events, first, wait_event, wait_output

#: The router kinds of the matrix, and the short names used in node and
#: client names (node names are at most 12 of [a-z0-9]).
KINDS = ("public", "cone", "symmetric-sequential", "symmetric-random", "double")
SHORT = {"public": "pub", "cone": "cone", "symmetric-sequential": "seq",
         "symmetric-random": "rand", "double": "dbl"}
LOBBY_PORTS = (3478, 3479)
#: What discovery must find behind each kind of router (``nat`` event:
#: mapping/allocation); a double NAT looks like its sequential outer NAT.
EXPECTED_NAT = {
    "public": "none/preserving",
    "cone": "endpoint-independent/preserving",
    "symmetric-sequential": "address-and-port-dependent/sequential",
    "symmetric-random": "address-and-port-dependent/random",
    "double": "address-and-port-dependent/sequential",
}


def expect_direct(a_kind, b_kind):
    """
    Whether the path between a host behind ``a_kind`` and one behind
    ``b_kind`` must be direct: always unless a side is symmetric-random;
    symmetric-random only against public or cone (the birthday punch).
    """
    kinds = (a_kind, b_kind)
    if "symmetric-random" not in kinds:
        return True
    other = b_kind if a_kind == "symmetric-random" else a_kind
    return other in ("public", "cone")


def nat_of(evs):
    """``mapping/allocation`` of the first ``nat`` event, or None."""
    e = first(evs, "nat")
    return f"{e['mapping']}/{e['allocation']}" if e else None


@dataclass
class Trial:
    """One ``p2pnat peer connect`` run and what came of it."""

    pair: str
    returncode: int
    wall: float
    events: list
    stderr: str
    sent: int = 1
    #: A's discovery did not find what its router is (see EXPECTED_NAT).
    discovery_miss: bool = False
    echo_retry: bool = False  # connected, no echo: run again (tests.lab.test_p2p_lab)

    @property
    def path(self):
        return first(self.events, "path")

    @property
    def mode(self):
        return self.path["mode"] if self.path else None

    @property
    def connected(self):
        return self.mode in ("direct", "relayed")

    @property
    def direct(self):
        return self.mode == "direct"

    @property
    def echoes(self):
        return [e for e in self.events if e.get("event") == "data"]

    @property
    def error(self):
        e = first(self.events, "error")
        return e["error"] if e else None

    @property
    def nat(self):
        return nat_of(self.events)

    def describe(self, tail=1500):
        p = self.path or {}
        head = (f"{self.pair}: exit {self.returncode} in {self.wall:.2f}s, nat {self.nat},"
                f" mode {self.mode}, strategy {p.get('strategy')}, {p.get('seconds')}s,"
                f" {p.get('probes')} probes, {p.get('rounds')} rounds,"
                f" {len(self.echoes)}/{self.sent} echoes, error {self.error!r}")
        # Without the socket chatter (a window opens dozens of sockets).
        err = "\n".join(line for line in self.stderr.splitlines()
                        if "ControlProtocol starting on" not in line
                        and "(UDP Port " not in line)
        return head + ("\n  stderr: " + err[-tail:].rstrip() if err else "")


class LobbyClientBundle:
    """A provisioned lobby client: ID, host and ``client.toml``."""

    def __init__(self, cid, host, config):
        self.id = cid
        self.host = host
        self.config = config
        self.waiter = None


class P2PLab(LabSetup):
    """
    A NAT lab with a lobby server of ``addresses`` public addresses;
    ``workdir`` holds the lobby's state directory and the client bundles.
    Close it with :meth:`close` (the lab's namespaces and processes go with
    it).
    """

    def __init__(self, workdir, addresses=2):
        self.addresses = addresses
        self.state = os.path.join(workdir, "lobby-state")
        self.clients = {}
        self.lobby = None
        super().__init__(workdir)

    def setup(self):
        self.server = self.lab.add_server("lobby", addresses=self.addresses)
        self.lobby_addr = f"{self.server.ips[0]}:{LOBBY_PORTS[0]}"

    def add_client(self, cid, host, certificate=True):
        """
        Provision client ``cid`` (as ``p2pnat client add``) for ``host``;
        with ``certificate=False`` its bundle is one from before client
        certificates, so its paths carry MAC'd clear datagrams.
        """
        from p2pnat.deployment import provision

        out = os.path.join(self.workdir, f"client-{cid}")
        provision.add_client(self.state, cid, out, lobby=self.lobby_addr)
        config = os.path.join(out, "client.toml")
        if not certificate:
            procs.without_certificate(config)
        discovery = ", ".join(f'"{ip}:{port}"' for ip in self.server.ips for port in LOBBY_PORTS)
        with open(config, "a") as f:
            f.write(f"discovery = [{discovery}]\n")
        bundle = LobbyClientBundle(cid, host, config)
        self.clients[cid] = bundle
        return bundle

    def lobby_listen(self):
        """The lobby's listen addresses: every IPv4 address of its server, both ports."""
        return [f"{ip}:{port}" for ip in self.server.ips for port in LOBBY_PORTS]

    def start_lobby(self, *options, timeout=20):
        """
        Start ``twistd lobby`` on every address and port, with ``options``
        (more of its command-line options); wait until it listens.
        """
        listen = self.lobby_listen()
        self.lobby = self.server.popen(
            procs.twistd("lobby", "--lobby-state-dir", self.state, "--udp-listen",
                         ",".join(listen), *options), cwd=procs.REPO, env=procs.env())
        wait_output(self.lobby, lambda out: out.count("ControlProtocol starting on") >= len(listen),
                    f"the lobby listening on {len(listen)} sockets", timeout)
        return self.lobby

    def start_wait(self, cid, *args):
        """Start ``p2pnat peer wait`` for ``cid`` (``--json -v``); do not wait."""
        c = self.clients[cid]
        c.waiter = c.host.popen(procs.p2pnat("peer", "wait", "--config", c.config, "--json",
                                             "-v", *args), cwd=procs.REPO, env=procs.env())
        return c.waiter

    def wait_login(self, cid, timeout=30):
        """Wait until ``cid``'s ``peer wait`` logged in; return its login event."""
        return wait_event(self.clients[cid].waiter, "login", timeout=timeout)

    def start_checked_wait(self, cid, expected, *args, tries=3):
        """
        Start ``peer wait`` for ``cid`` and wait for its login; if its
        discovery did not find ``expected`` (``mapping/allocation``), stop
        it and start it again, at most ``tries`` times in all.  Return the
        list of wrong classifications seen (empty: right the first time).
        """
        wrong = []
        for _ in range(tries):
            proc = self.start_wait(cid, *args)
            self.wait_login(cid)
            found = nat_of(events(proc.stdout()))
            if found == expected:
                break
            wrong.append(found)
            proc.stop()
        return wrong

    def connect_argv(self, cid, peer, *args):
        c = self.clients[cid]
        return procs.p2pnat("peer", "connect", peer, "--config", c.config, "--json", "-v", *args)

    def connect(self, cid, peer, *args, pair="", sent=1, timeout=45):
        """Run ``p2pnat peer connect`` in ``cid``'s host; a :class:`Trial`."""
        c = self.clients[cid]
        t0 = time.monotonic()
        try:
            done = c.host.run(self.connect_argv(cid, peer, *args), cwd=procs.REPO,
                              env=procs.env(), timeout=timeout)
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code = -1
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
            err += f"\n(killed after {timeout}s)"
        return Trial(pair or f"{cid}->{peer}", code, time.monotonic() - t0, events(out), err,
                     sent)

    def start_connect(self, cid, peer, *args, **kwargs):
        """Start ``p2pnat peer connect`` in the background; a tracked process."""
        c = self.clients[cid]
        return c.host.popen(self.connect_argv(cid, peer, *args), cwd=procs.REPO,
                            env=procs.env(), **kwargs)


class DualStackP2PLab(P2PLab):
    """
    A :class:`P2PLab` in a dual-stack lab (``Lab(ipv6=True)``): the lobby's
    server has as many IPv6 addresses as IPv4 ones, and the lobby listens
    on all of them (:attr:`lobby_addr6`: the first IPv6 one, port 3478).
    Clients still log in and run discovery over IPv4, as provisioned.
    """

    lab_options = {"ipv6": True}

    def setup(self):
        super().setup()
        self.lobby_addr6 = hostport(self.server.ip6s[0], LOBBY_PORTS[0])

    def lobby_listen(self):
        return super().lobby_listen() + [hostport(ip, port) for ip in self.server.ip6s
                                         for port in LOBBY_PORTS]


# -- running jobs a few at a time ---------------------------------------------------

@dataclass
class Job:
    """Work that uses some hosts (by name) exclusively; ``run()`` returns its result."""

    key: str
    hosts: frozenset
    run: object
    result: object = None
    error: object = None
    seconds: float = 0.0


def run_jobs(jobs, concurrency, deadline):
    """
    Run ``jobs`` (:class:`Job`), at most ``concurrency`` at once and never
    two sharing a host, in the order given as far as hosts allow.  A job
    that raises keeps its exception in :attr:`Job.error`.  Jobs not started
    by ``deadline`` (a monotonic time) are not started: their error says so.
    Every job's own run is bounded (subprocess timeouts), so this is too.
    """
    pending = list(jobs)
    running = {}
    busy = set()
    lock = threading.Lock()

    def timed(job):
        t0 = time.monotonic()
        try:
            job.result = job.run()
        except BaseException as e:  # kept for the job's own test to report
            job.error = e
        finally:
            job.seconds = time.monotonic() - t0
        return job

    with futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        while pending or running:
            with lock:
                for job in list(pending):
                    if len(running) >= concurrency:
                        break
                    if time.monotonic() > deadline:
                        job.error = AssertionError("not started: the matrix ran out of time")
                        pending.remove(job)
                        continue
                    if job.hosts & busy:
                        continue
                    pending.remove(job)
                    busy |= job.hosts
                    running[pool.submit(timed, job)] = job
            if not running:
                continue
            done, _ = futures.wait(list(running), timeout=60,
                                   return_when=futures.FIRST_COMPLETED)
            for f in done:
                job = running.pop(f)
                busy -= job.hosts
    return jobs


# -- summaries ------------------------------------------------------------------------

def pair_stats(trials):
    """Counts and medians of one pair's trials."""
    paths = [t.path for t in trials if t.path]
    seconds = [p["seconds"] for p in paths]
    totals = [p["total"] for p in paths if "total" in p]
    probes = [p.get("probes", 0) for p in paths]
    strategies = sorted({p.get("strategy") for p in paths if p.get("strategy")})
    return {
        "trials": len(trials),
        "connected": sum(t.connected for t in trials),
        "direct": sum(t.direct for t in trials),
        "relayed": sum(t.mode == "relayed" for t in trials),
        "echo": sum(bool(t.echoes) for t in trials),
        "discovery_misses": sum(bool(getattr(t, "discovery_miss", False)) for t in trials),
        "median_s": statistics.median(seconds) if seconds else None,
        "max_s": max(seconds) if seconds else None,
        "median_total_s": statistics.median(totals) if totals else None,
        "median_probes": statistics.median(probes) if probes else None,
        "rounds": max((p.get("rounds", 1) for p in paths), default=None),
        "strategies": strategies,
    }


def pair_table(title, results):
    """
    ``results``: {pair: [Trial]} -> the summary table as text: trials,
    connected, direct, relayed, with an echo; median and max seconds from
    the connect call to the path (after login), median seconds from the
    start of the command (discovery and login included), median probes
    sent, most rounds, trials whose discovery got A's NAT wrong, strategies.
    """
    head = (f"{'pair (A -> B)':<44} {'trials':>6} {'conn':>5} {'direct':>6} {'relay':>5}"
            f" {'echo':>5} {'med s':>7} {'max s':>7} {'total':>6} {'probes':>7} {'rnds':>4}"
            f" {'miss':>4}"
            "  strategy")
    lines = [title, head, "-" * len(head)]
    for pair, trials in results.items():
        s = pair_stats(trials)
        med = f"{s['median_s']:.3f}" if s["median_s"] is not None else "-"
        mx = f"{s['max_s']:.3f}" if s["max_s"] is not None else "-"
        probes = f"{s['median_probes']:g}" if s["median_probes"] is not None else "-"
        total = f"{s['median_total_s']:.2f}" if s["median_total_s"] is not None else "-"
        lines.append(f"{pair:<44} {s['trials']:>6} {s['connected']:>5} {s['direct']:>6}"
                     f" {s['relayed']:>5} {s['echo']:>5} {med:>7} {mx:>7} {total:>6} {probes:>7}"
                     f" {s['rounds'] or '-':>4} {s['discovery_misses']:>4}"
                     f"  {', '.join(s['strategies'])}")
    return "\n".join(lines)
