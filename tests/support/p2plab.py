"""
Fixtures for NAT-lab tests of the P2P path (see ``tests/test_p2p_lab.py``).

:class:`P2PLab` builds on :class:`p2pnat.lab.Lab`: a lobby (``twistd
lobby``) on a server with two public addresses and two ports on each (so
that discovery can run all of RFC 5780), lobby clients provisioned as
``p2pnat client add`` does (in this process: it only writes files) with
every lobby address for discovery, ``p2pnat peer wait`` and ``p2pnat peer
connect`` run as processes in their hosts' namespaces, and their ``--json``
events parsed into :class:`Trial` records.

:func:`run_jobs` runs independent jobs (one NAT pair's trials each) a few
at a time, never two at once on the same host; :func:`pair_table` is the
summary printed at the end of a matrix.

The module is also a small tool box run inside namespaces with
``python -m tests.support.p2plab TOOL ...`` (a reactor cannot change namespace):

- ``sniff``: print (hex) the first p2pnat frames of a type, sent under a
  session key ID of a role (``SESSION.a``), seen on an interface;
- ``forge``: send p2pnat frames sealed with a random key (a forger who
  does not know the session key) from a spoofed source address;
- ``echo``: a UDP echo server; ``ping``: send numbered datagrams to a UDP
  port and count the ones that come back unchanged.

Replaying a captured packet is ``python -m tests.support.lab inject``.
"""

import argparse
import io
import json
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

from tests.support import procs

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


def events(text):
    """The JSON event lines of a ``--json`` run's output."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def nat_of(evs):
    """``mapping/allocation`` of the first ``nat`` event, or None."""
    e = first(evs, "nat")
    return f"{e['mapping']}/{e['allocation']}" if e else None


def first(evs, name):
    for e in evs:
        if e.get("event") == name:
            return e
    return None


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


class P2PLab:
    """
    A NAT lab with a lobby on a two-address server; ``workdir`` holds the
    lobby's state directory and the client bundles.  Close it with
    :meth:`close` (the lab's namespaces and processes go with it).
    """

    def __init__(self, workdir):
        from p2pnat.lab import Lab

        self.workdir = workdir
        self.state = os.path.join(workdir, "lobby-state")
        self.clients = {}
        self.lobby = None
        self.lab = Lab()
        try:
            self.server = self.lab.add_server("lobby", addresses=2)
            self.lobby_addr = f"{self.server.ips[0]}:{LOBBY_PORTS[0]}"
        except BaseException:
            self.lab.close()
            raise

    def close(self):
        self.lab.close()

    def report(self):
        return self.lab.report()

    def add_client(self, cid, host):
        """Provision client ``cid`` (as ``p2pnat client add``) for ``host``."""
        from p2pnat.deployment import provision

        out = os.path.join(self.workdir, f"client-{cid}")
        args = argparse.Namespace(id=cid, lobby=self.lobby_addr, state_dir=self.state, out=out,
                                  replace=False)
        provision.client_add(args, out=io.StringIO())
        config = os.path.join(out, "client.toml")
        discovery = ", ".join(f'"{ip}:{port}"' for ip in self.server.ips for port in LOBBY_PORTS)
        with open(config, "a") as f:
            f.write(f"discovery = [{discovery}]\n")
        bundle = LobbyClientBundle(cid, host, config)
        self.clients[cid] = bundle
        return bundle

    def start_lobby(self, timeout=20):
        """Start ``twistd lobby`` on every address and port; wait until it listens."""
        listen = [f"{ip}:{port}" for ip in self.server.ips for port in LOBBY_PORTS]
        self.lobby = self.server.popen(
            procs.twistd("lobby", "--lobby-state-dir", self.state, "--udp-listen",
                         ",".join(listen)), cwd=procs.REPO, env=procs.env())
        deadline = time.monotonic() + timeout
        while self.lobby.stdout().count("ControlProtocol starting on") < len(listen):
            if self.lobby.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the lobby did not start:\n{self.lobby.describe()}")
            time.sleep(0.05)
        return self.lobby

    def start_wait(self, cid, *args):
        """Start ``p2pnat peer wait`` for ``cid`` (``--json -v``); do not wait."""
        c = self.clients[cid]
        c.waiter = c.host.popen(procs.p2pnat("peer", "wait", "--config", c.config, "--json",
                                             "-v", *args), cwd=procs.REPO, env=procs.env())
        return c.waiter

    def wait_login(self, cid, timeout=30):
        """Wait until ``cid``'s ``peer wait`` logged in; return its login event."""
        proc = self.clients[cid].waiter
        deadline = time.monotonic() + timeout
        while True:
            e = first(events(proc.stdout()), "login")
            if e:
                return e
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{cid} did not log in:\n{proc.describe()}")
            time.sleep(0.05)

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

    def tool(self, node, *args, **kwargs):
        """Start ``python -m tests.support.p2plab ARGS`` in ``node``; a tracked process."""
        return node.popen(node.python("-m", "tests.support.p2plab", *args), cwd=procs.REPO,
                          env=procs.env(), **kwargs)

    def run_tool(self, node, module, *args, timeout=30):
        """Run ``python -m MODULE ARGS`` in ``node``; its last JSON line."""
        done = node.run(node.python("-m", module, *args), cwd=procs.REPO, env=procs.env(),
                        timeout=timeout)
        evs = events(done.stdout)
        if done.returncode != 0 or not evs:
            raise AssertionError(f"{module} {' '.join(args)} in {node.name} failed"
                                 f" ({done.returncode}): {done.stdout} {done.stderr}")
        return evs[-1]


# -- waiting on processes ---------------------------------------------------------

def wait_event(proc, name, start=0, timeout=20.0, where=None):
    """
    Wait until ``proc`` printed a JSON event ``name`` (after the first
    ``start`` events, and matching ``where(event)`` if given); return it.
    """
    deadline = time.monotonic() + timeout
    while True:
        evs = events(proc.stdout())[start:]
        for e in evs:
            if e.get("event") == name and (where is None or where(e)):
                return e
        if proc.poll() is not None:
            raise AssertionError(f"exited before a {name!r} event:\n{proc.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name!r} event within {timeout}s:\n{proc.describe()}")
        time.sleep(0.02)


def wait_text(proc, pattern, start=0, timeout=10.0, stream="stderr"):
    """Wait until ``proc``'s ``stream`` from ``start`` on matches ``pattern``."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = getattr(proc, stream)()
        m = regex.search(text, start)
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no /{pattern}/ in {stream} within {timeout}s:\n"
                                 f"{proc.describe(4000)}")
        time.sleep(0.02)


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


# -- tools run inside namespaces -----------------------------------------------------

def _hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def _emit(obj):
    print(json.dumps(obj), flush=True)


def _frame_info(payload):
    """(type, key_id) of a p2pnat frame, or None."""
    from p2pnat.protocol import wire

    if len(payload) < 14 or payload[0] != wire.MARKER:
        return None
    klen = payload[12]
    try:
        return payload[2], payload[13:13 + klen].decode("ascii")
    except UnicodeDecodeError:
        return None


def _tool_sniff(args):
    """
    Print the first ``--count`` IPv4/UDP packets on ``--iface`` carrying a
    p2pnat frame of type ``--type`` under a key ID ending in ``.ROLE``
    (``--role``), as JSON with the packet in hex; exit 1 after ``--timeout``
    if fewer were seen.
    """
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.bind((args.iface, 0))
    _emit({"listening": args.iface})
    deadline = time.monotonic() + args.timeout
    seen = 0
    while seen < args.count and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            packet = s.recv(65535)
        except socket.timeout:
            break
        if len(packet) < 28 or packet[9] != socket.IPPROTO_UDP:
            continue
        ihl = (packet[0] & 0x0F) * 4
        sport, dport = struct.unpack_from("!HH", packet, ihl)
        info = _frame_info(packet[ihl + 8:])
        if info is None or info[0] != args.type or not info[1].endswith("." + args.role):
            continue
        seen += 1
        _emit({"packet": packet.hex(), "key_id": info[1],
               "src": f"{socket.inet_ntoa(packet[12:16])}:{sport}",
               "dst": f"{socket.inet_ntoa(packet[16:20])}:{dport}"})
    return 0 if seen >= args.count else 1


def _tool_forge(args):
    """
    Send ``--count`` frames (``--kind`` probe or data) sealed with a random
    key under ``--key-id``, from the spoofed ``--src`` to ``--dst``: what an
    off-path attacker who knows both peers' addresses and the session ID
    (it travels in clear) can send.
    """
    from p2pnat.protocol import p2p as M
    from p2pnat.protocol import wire
    from tests.support.lab import ip_udp_packet, send_raw

    key = os.urandom(wire.KEY_LEN)
    sent = 0
    for i in range(args.count):
        if args.kind == "probe":
            message = M.Probe(1, i)
        else:
            message = M.Data(args.payload.encode())
        stamp = int(time.time() * 1e6) + i
        data = wire.seal(message, args.key_id, key, stamp)
        send_raw(ip_udp_packet(_hostport(args.src), _hostport(args.dst), data))
        sent += 1
    _emit({"sent": sent, "kind": args.kind, "key_id": args.key_id})
    return 0


def _tool_echo(args):
    """A UDP echo server on ``--listen`` for at most ``--duration`` seconds."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(_hostport(args.listen))
    _emit({"listening": "%s:%d" % s.getsockname()})
    deadline = time.monotonic() + args.duration
    answered = 0
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
        if not r:
            continue
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
        answered += 1
    _emit({"answered": answered})
    return 0


def _tool_ping(args):
    """
    Send ``--count`` numbered datagrams to ``--to`` (one every
    ``--interval`` seconds) and count those that come back unchanged
    within ``--timeout`` seconds of the last.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = _hostport(args.to)
    sent = {}
    back = {}
    t0 = time.monotonic()
    for i in range(args.count):
        payload = f"datagram {i} {os.urandom(8).hex()}".encode()
        sent[payload] = time.monotonic()
        s.sendto(payload, target)
        end = time.monotonic() + args.interval
        while time.monotonic() < end:
            r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
            if r:
                data, _ = s.recvfrom(65535)
                if data in sent and data not in back:
                    back[data] = time.monotonic() - sent[data]
    end = time.monotonic() + args.timeout
    while len(back) < len(sent) and time.monotonic() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
        if r:
            data, _ = s.recvfrom(65535)
            if data in sent and data not in back:
                back[data] = time.monotonic() - sent[data]
    rtts = sorted(back.values())
    _emit({"sent": len(sent), "echoed": len(back),
           "median_rtt_ms": round(1000 * rtts[len(rtts) // 2], 3) if rtts else None,
           "seconds": round(time.monotonic() - t0, 3)})
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.support.p2plab")
    tools = parser.add_subparsers(dest="tool", required=True)
    p = tools.add_parser("sniff")
    p.add_argument("--iface", required=True)
    p.add_argument("--type", type=lambda t: int(t, 0), required=True)
    p.add_argument("--role", choices=("a", "b"), required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=_tool_sniff)
    p = tools.add_parser("forge")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--key-id", required=True)
    p.add_argument("--kind", choices=("probe", "data"), required=True)
    p.add_argument("--payload", default="forged")
    p.add_argument("--count", type=int, default=3)
    p.set_defaults(func=_tool_forge)
    p = tools.add_parser("echo")
    p.add_argument("--listen", required=True)
    p.add_argument("--duration", type=float, default=120.0)
    p.set_defaults(func=_tool_echo)
    p = tools.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_tool_ping)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
