"""
A TCP stream between two lab peers over p2pnat's QUIC streams, as users
run it (``tests/lab/test_streams_lab.py``, ``bench/stream_matrix.py``,
``bench/nebula_bulk.py``).

On B's host a sink (this module's ``sink`` tool) listens on
127.0.0.1::data:`SINK_PORT` and ``p2pnat peer wait --service
bulk=127.0.0.1:SINK_PORT`` serves it (:meth:`StreamLab.serve`); on A's host
``p2pnat peer connect B --forward-tcp 127.0.0.1:0=bulk`` listens, and the
``source`` tool pushes N bytes through that port, half-closes, and waits
for the sink's answer (its byte count and sha256), then for the end of the
stream (:meth:`StreamLab.transfer`, a :class:`StreamResult`: route from the
``--json`` events, both hashes, seconds, CPU of both peers and the lobby).

The bytes pushed are 64-byte blocks, each a 16-byte marker followed by 48
random bytes: any 80 bytes of the stream's plaintext contain the marker, so
a capture that never shows it (:class:`Sniffer`, an ``AF_PACKET`` socket in
a node's namespace) saw no plaintext.  :func:`add_loss` drops a share of
the packets to and from some public addresses on the lab's internet switch
(loss on those WAN links, both ways, with nftables), for as long as the
caller wants.

The tools run inside namespaces as ``python -m tests.support.lab.streams
TOOL ...`` and print JSON lines, the last one their result.
"""

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.support.lab.p2p import P2PLab

#: The module the tools run as.
MODULE = "tests.support.lab.streams"
#: The service name B serves and A forwards to.
SERVICE = "bulk"
#: Where the sink listens, on B's loopback.
SINK_PORT = 9099
BLOCK = 64
MARKER_LEN = 16


def _emit(obj):
    print(json.dumps(obj), flush=True)


# -- in-namespace tools ------------------------------------------------------------------


def stream_chunks(marker, size, chunk=1 << 20):
    """
    The ``size`` bytes the source sends, in pieces of at most ``chunk``:
    blocks of ``marker`` (16 bytes) and 48 random bytes.  Sixteen distinct
    random MiB are made once and cycled, so making the data costs little
    next to sending it.
    """
    if len(marker) != MARKER_LEN:
        raise ValueError(f"the marker is {MARKER_LEN} bytes")
    pieces = []
    for _ in range(16):
        piece = bytearray(os.urandom(chunk))
        for i in range(0, chunk, BLOCK):
            piece[i:i + MARKER_LEN] = marker
        pieces.append(bytes(piece))
    sent, i = 0, 0
    while sent < size:
        piece = pieces[i % len(pieces)][:size - sent]
        sent += len(piece)
        i += 1
        yield piece


def _tool_sink(args):
    """
    Accept TCP connections on ``--host``:``--port``, one at a time; read
    each to its end, answer one JSON line (bytes, sha256, seconds, this
    process's CPU seconds) and close.  Each connection's record is printed
    too.
    """
    server = socket.create_server((args.host, args.port))
    _emit({"listening": args.port})
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        server.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            conn, _ = server.accept()
        except socket.timeout:
            break
        with conn:
            conn.settimeout(args.idle)
            digest, count, t0, cpu = hashlib.sha256(), 0, time.monotonic(), time.process_time()
            error = None
            try:
                while True:
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    digest.update(data)
                    count += len(data)
            except OSError as e:  # a stalled or reset stream: say so, keep serving
                error = str(e)
            record = {"received": count, "sha256": digest.hexdigest(),
                      "seconds": round(time.monotonic() - t0, 4),
                      "cpu": round(time.process_time() - cpu, 4), "error": error}
            try:
                conn.sendall(json.dumps(record).encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            _emit(record)
    return 0


def _tool_source(args):
    """
    Connect to ``--host``:``--port``, send ``--size`` bytes (marker
    blocks), half-close, and read the sink's answer up to the end of the
    stream.  Exit 0 with a JSON result in any case (its ``error`` says what
    failed); ``cpu`` is this process's CPU seconds from the connect on.
    """
    marker = bytes.fromhex(args.marker)
    digest, sent, answer, error = hashlib.sha256(), 0, b"", None
    chunks = stream_chunks(marker, args.size)
    t0, cpu = time.monotonic(), time.process_time()
    try:
        with socket.create_connection((args.host, args.port), timeout=args.idle) as s:
            for piece in chunks:
                s.sendall(piece)
                digest.update(piece)
                sent += len(piece)
            s.shutdown(socket.SHUT_WR)
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    seconds, cpu = time.monotonic() - t0, time.process_time() - cpu
    try:
        sink = json.loads(answer.decode())
    except ValueError:
        sink = None
        error = error or f"no answer from the sink: {answer[:200]!r}"
    _emit({"sent": sent, "sha256": digest.hexdigest(), "seconds": round(seconds, 4),
           "cpu": round(cpu, 4), "sink": sink, "error": error})
    return 0


def _tool_sniff(args):
    """
    Capture every IPv4/UDP packet on ``--iface``, in and out
    (:class:`tests.support.lab.packets.Capture`), until SIGTERM or
    ``--duration``: count packets and UDP payload bytes, the packets that
    carry the marker anywhere, and the ones that are p2pnat frames (the
    lobby's clear-text framing); print the totals, with the packets the
    kernel dropped before we read them.
    """
    from p2pnat.protocol import wire
    from tests.support.lab.packets import Capture

    marker = bytes.fromhex(args.marker)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    capture = Capture(args.iface)
    totals = {"packets": 0, "udp_bytes": 0, "marker_packets": 0, "frames": 0}
    first_hit = None
    _emit({"listening": args.iface})
    deadline = time.monotonic() + args.duration
    try:
        while not stop and time.monotonic() < deadline:
            for packet, _, _, payload in capture.udp(0.2):
                totals["packets"] += 1
                totals["udp_bytes"] += len(payload)
                if payload[:1] == bytes([wire.MARKER]):
                    totals["frames"] += 1
                if marker in packet:
                    totals["marker_packets"] += 1
                    if first_hit is None:
                        first_hit = packet[:120].hex()
        dropped = capture.kernel_dropped()
    finally:
        capture.close()
    _emit(dict(totals, kernel_dropped=dropped, first_hit=first_hit))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=SINK_PORT)
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--idle", type=float, default=60, help="seconds a stream may stall")
    p.set_defaults(func=_tool_sink)
    p = sub.add_parser("source")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--marker", required=True, help="16 bytes in hex")
    p.add_argument("--idle", type=float, default=60, help="seconds a stream may stall")
    p.set_defaults(func=_tool_source)
    p = sub.add_parser("sniff")
    p.add_argument("--iface", required=True)
    p.add_argument("--marker", required=True, help="the bytes to look for, in hex")
    p.add_argument("--duration", type=float, default=600)
    p.set_defaults(func=_tool_sniff)
    args = parser.parse_args(argv)
    return args.func(args)


# -- from the tests' side --------------------------------------------------------------------


def proc_cpu(pid):
    """CPU seconds (user + system) of process ``pid`` so far; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def new_marker():
    """A fresh 16-byte marker."""
    return os.urandom(MARKER_LEN)


def wan_ip(host):
    """The public address ``host``'s packets leave with: its router's, or its own."""
    router = getattr(host, "router", None)
    return router.public_ip if router is not None and router.kind != "public" else host.ip


class Loss:
    """
    ``pct`` percent loss on the WAN links of ``ips`` (public addresses on
    the lab's internet switch), each way, each packet drawn independently,
    from :meth:`start` until :meth:`stop`: an nftables bridge table in the
    internet segment's namespace.  A packet between two such addresses
    crosses both links' rules, as it would cross both WANs.
    """

    def __init__(self, lab, name, ips, pct):
        if not 0 < pct < 100:
            raise ValueError(f"loss must be between 0 and 100 percent, not {pct}")
        self.lab, self.name, self.ips, self.pct = lab, name, list(ips), pct
        self.on = False

    def _nft(self, *argv, stdin=None):
        subprocess.run(["ip", "netns", "exec", self.lab._internet(), "nft", *argv],
                       input=stdin, text=True, check=True, capture_output=True, timeout=10)

    def start(self):
        drop = f"numgen random mod 10000 < {round(self.pct * 100)} drop"
        rules = "\n".join(f"    ip saddr {ip} {drop}\n    ip daddr {ip} {drop}" for ip in self.ips)
        self._nft("-f", "-", stdin=(
            f"table bridge {self.name} {{\n  chain forward {{\n"
            f"    type filter hook forward priority -5; policy accept;\n{rules}\n  }}\n}}\n"))
        self.on = True
        return self

    def stop(self):
        if self.on:
            self.on = False
            self._nft("delete", "table", "bridge", self.name)


class Sniffer:
    """
    The ``sniff`` tool on ``iface`` in ``node``'s namespace, capturing from
    when this returns; :meth:`stop` ends it and returns its totals
    (``packets``, ``udp_bytes``, ``marker_packets``, ``frames``,
    ``kernel_seen``, ``kernel_dropped``, ``first_hit``).
    """

    def __init__(self, node, marker, iface="eth0"):
        from tests.support.lab.running import start_python, wait_for_log

        self.proc = start_python(node, MODULE, "sniff", "--iface", iface, "--marker",
                                 marker.hex())
        wait_for_log(self.proc, r'"listening"', timeout=20)

    def stop(self):
        from tests.support.lab.running import events

        self.proc.stop(grace=10)
        found = [e for e in events(self.proc.stdout()) if "packets" in e]
        if not found:
            raise AssertionError(f"the sniffer printed no totals:\n{self.proc.describe(3000)}")
        return found[-1]


@dataclass
class StreamResult:
    """One stream through ``--forward-tcp``: what was sent, what came, how."""

    pair: str
    size: int
    #: The ``path`` event of ``peer connect`` (mode, strategy, seconds), or None.
    path: dict
    #: Later ``mode`` events of ``peer connect`` (the path changed route).
    modes: list
    #: The source tool's result (sent, sha256, seconds, sink, error).
    source: dict
    #: CPU seconds during the transfer: ``a`` (connect), ``b`` (wait), ``lobby``.
    cpu: dict = field(default_factory=dict)
    error: str = None
    log: str = ""

    @property
    def route(self):
        """``direct``, ``relayed``, ``relayed, then direct`` (...), or None (no path)."""
        if not self.path:
            return None
        seen = [self.path["mode"]] + [m["mode"] for m in self.modes if m["mode"] != "closed"]
        route = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]
        return ", then ".join(route)

    @property
    def received(self):
        sink = (self.source or {}).get("sink") or {}
        return sink.get("received", 0)

    @property
    def ok(self):
        """Every byte came and both ends' sha256 agree."""
        src = self.source or {}
        sink = src.get("sink") or {}
        return (self.error is None and not src.get("error") and src.get("sent") == self.size
                and sink.get("received") == self.size and sink.get("sha256") == src.get("sha256"))

    @property
    def seconds(self):
        return (self.source or {}).get("seconds")

    @property
    def mbps(self):
        """MB/s (10^6 bytes) from the TCP connect to the sink's answer."""
        return self.size / 1e6 / self.seconds if self.ok and self.seconds else None

    def describe(self):
        return (f"{self.pair}: route {self.route}, ok {self.ok}, {self.received}/{self.size}"
                f" bytes, {self.seconds}s, path {self.path}, source {self.source}, cpu"
                f" {self.cpu}, error {self.error}\n{self.log}")


class StreamLab(P2PLab):
    """
    A :class:`~tests.support.lab.p2p.P2PLab` for streams: its lobby runs
    with ``--lobby-relay-rate relay_rate`` when given (bytes/s one relayed
    session may use; at the lobby's default of 512 KiB/s a 20 MB relayed
    transfer takes 40 s), B's side gets a sink and ``peer wait --service``
    (:meth:`serve`), A's side runs transfers (:meth:`transfer`).
    """

    def __init__(self, workdir, relay_rate=None, addresses=2):
        self.relay_rate = relay_rate
        super().__init__(workdir, addresses=addresses)

    def start_lobby(self, *options, timeout=20):
        extra = ["--lobby-relay-rate", str(self.relay_rate)] if self.relay_rate else []
        return super().start_lobby(*extra, *options, timeout=timeout)

    def serve(self, cid, expected_nat=None, *args):
        """
        Start the sink on ``cid``'s host and ``peer wait --service
        bulk=127.0.0.1:SINK_PORT`` (plus ``args``) for it; wait for its
        login (started again if discovery did not find ``expected_nat``,
        as :meth:`P2PLab.start_checked_wait` does).  Return the list of
        wrong classifications seen.
        """
        c = self.clients[cid]
        c.sink = start_sink(c.host)
        service = ("--service", f"{SERVICE}=127.0.0.1:{SINK_PORT}", *args)
        if expected_nat is None:
            self.start_wait(cid, *service)
            self.wait_login(cid)
            return []
        return self.start_checked_wait(cid, expected_nat, *service)

    def transfer(self, a_id, b_id, size, marker=None, timeout=180, connect_args=(),
                 pair=None, on_forward=None):
        """
        ``peer connect b_id --forward-tcp 127.0.0.1:0=bulk`` on ``a_id``'s
        host, then ``size`` bytes through it (the source tool), then the
        connect process stopped.  A :class:`StreamResult`; a failure is in
        its ``error`` and ``ok``, not raised.  ``timeout`` bounds the whole.
        ``on_forward(connect_process)`` is called once the forward listens,
        before the bytes go (to attach a profiler, say); what it returns is
        called after them.
        """
        from tests.support.lab.running import LogTimeout, events, wait_event

        marker = marker or new_marker()
        pair = pair or f"{a_id} -> {b_id}"
        t0 = time.monotonic()
        proc = self.start_connect(a_id, b_id, "--forward-tcp", f"127.0.0.1:0={SERVICE}",
                                  "--exit-after", str(timeout), *connect_args)
        waiter = self.clients[b_id].waiter
        path, source, error, cpu = None, None, None, {}
        try:
            try:
                forward = wait_event(proc, "forward-tcp", timeout=min(60, timeout))
            except LogTimeout as e:
                error = f"no forward: {e}"
                return StreamResult(pair, size, first_path(proc), [], None, error=error,
                                    log=proc.describe(3000))
            path = first_path(proc)
            pids = {"a": proc.pid, "b": waiter.pid, "lobby": self.lobby.pid}
            before = {k: proc_cpu(p) for k, p in pids.items()}
            left = timeout - (time.monotonic() - t0)
            after_push = on_forward(proc) if on_forward else None
            source = push(self.clients[a_id].host, "127.0.0.1", forward["port"], size, marker,
                          timeout=max(5, left))
            if after_push:
                after_push()
            after = {k: proc_cpu(p) for k, p in pids.items()}
            cpu = {k: round(after[k] - before[k], 3) for k in pids
                   if before[k] is not None and after[k] is not None}
            if source and source.get("error"):
                error = f"source: {source['error']}"
        finally:
            modes = [e for e in events(proc.stdout()) if e.get("event") == "mode"]
            proc.stop(grace=3)
            log = proc.describe(3000) if error else ""
        return StreamResult(pair, size, path, modes, source, cpu, error, log)


def start_sink(node, host="127.0.0.1", port=SINK_PORT):
    """The sink tool on ``host``:``port`` in ``node``, listening when this returns."""
    from tests.support.lab.running import start_python, wait_for_log

    sink = start_python(node, MODULE, "sink", "--host", host, "--port", port)
    wait_for_log(sink, r'"listening"', timeout=20)
    return sink


def push(node, host, port, size, marker=None, timeout=180):
    """
    Run the source tool in ``node``: ``size`` bytes to ``host``:``port``
    (a sink, or a forward to one).  Its result (``sent``, ``sha256``,
    ``seconds``, ``cpu``, ``sink``: the sink's answer, ``error``); a
    failure to run is in ``error`` too.
    """
    from tests.support.lab.running import run_python

    marker = marker or new_marker()
    try:
        return run_python(node, MODULE, "source", "--host", host, "--port", port, "--size",
                          size, "--marker", marker.hex(), timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        return {"sent": 0, "sink": None, "error": str(e)}


def first_path(proc):
    """The ``path`` event ``proc`` printed, or None."""
    from tests.support.lab.running import events, first

    return first(events(proc.stdout()), "path")


if __name__ == "__main__":
    sys.exit(main())
