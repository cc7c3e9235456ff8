"""
One QUIC connection across path changes, through the Linux kernel's real
NATs: a 20 MB TCP stream through ``p2pnat peer connect --forward-tcp``
(alice, behind a cone NAT) to ``p2pnat peer wait --service`` (bob, behind
a fully random symmetric NAT), checked with sha256 at both ends.

- :meth:`PathChangeTests.test_relayed_stream_finishes_direct`: the first
  punch is made to fail (alice's router drops UDP to and from bob's
  router), so the path starts relayed by the lobby; the stream starts
  there, the block is lifted once a few MB went through, the next upgrade
  punch makes the path direct while the stream is under way, and the
  stream finishes on the direct path with its bytes intact;
- :meth:`PathChangeTests.test_conntrack_flush_on_each_side`: mid-transfer,
  ``conntrack -F`` on alice's router (her mapping comes back on the same
  port at her next packet), then on bob's (his mapping comes back on a new
  random port, which alice's NAT filters: QUIC falls silent, the path
  recovers over the relay and punches again); the bytes arrive intact.

In both, the application sees no error (the forward's ``stream-closed``
event has none, the TCP client gets the sink's digest), and it is one QUIC
connection throughout (one ``quic`` event).  The lobby asks for presence
keepalives every 5 s, so that a client whose NAT forgot its lobby mapping
is found again soon, and relays 1 MB/s per session, so that the relayed
part of a transfer does not take the whole budget.

Run as ``python -m tests.lab.test_quic_paths_lab sink|source ...`` it is
the TCP sink and source the tests start in the hosts' namespaces.

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import argparse
import hashlib
import json
import random
import socket
import sys
import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import UdpBlock, add_home
from tests.support.lab.running import (
    events,
    finish_python,
    start_python,
    wait_event,
    wait_output,
)

MODULE = "tests.lab.test_quic_paths_lab"
#: Bytes each transfer sends.
SIZE = 20 * 1024 * 1024
SEED = 20
SINK_PORT = 9000
FORWARD_PORT = 7000
#: The source prints its progress every this many bytes.
STEP = 1024 * 1024
#: The lobby's relay rate in these tests (bytes per second per session).
RELAY_RATE = 1024 * 1024


def expected():
    data = random.Random(SEED).randbytes(SIZE)
    return len(data), hashlib.sha256(data).hexdigest()


class QuicPathsLab(P.P2PLab):
    def start_lobby(self, timeout=20):
        """The lobby: presence keepalives every 5 s, relaying RELAY_RATE per session."""
        return super().start_lobby("--lobby-keepalive", "5", "--lobby-relay-rate",
                                   str(RELAY_RATE), timeout=timeout)


class PathChangeTests(LabTestCase):
    #: (name, alice's router kind, bob's) of each test's pair.
    PAIRS = (("up", "cone", "symmetric-random"), ("fl", "cone", "symmetric-random"))

    @classmethod
    def make_env(cls, workdir):
        return QuicPathsLab(workdir)

    @classmethod
    def build(cls, pl):
        pl.routers = {}
        for name, a_kind, b_kind in cls.PAIRS:
            for side, kind in (("a", a_kind), ("b", b_kind)):
                pl.routers[f"{side}{name}"] = add_home(pl, f"{side}{name}", kind)
        pl.start_lobby()
        for name, _, _ in cls.PAIRS:
            bob = pl.clients[f"b{name}"]
            sink = start_python(bob.host, MODULE, "sink", "--port", SINK_PORT)
            wait_event(sink, "listening", timeout=20)
            pl.start_wait(f"b{name}", "--service", f"bulk=127.0.0.1:{SINK_PORT}")
        for name, _, _ in cls.PAIRS:
            pl.wait_login(f"b{name}")

    # -- helpers ---------------------------------------------------------------------

    def connect(self, name, timeout=40, budget=15):
        """
        alice's forward to bob's ``bulk`` service, the path within
        ``budget`` seconds (``--timeout``); (process, path event).
        """
        a = self.env.start_connect(f"a{name}", f"b{name}", "--forward-tcp",
                                   f"127.0.0.1:{FORWARD_PORT}=bulk", "--timeout", str(budget),
                                   "--upgrade-interval", "2", "--exit-after", "120")
        path = wait_event(a, "path", timeout=timeout)
        wait_event(a, "forward-tcp", timeout=20)
        return a, path

    def source(self, name):
        alice = self.env.clients[f"a{name}"]
        return start_python(alice.host, MODULE, "source", "--port", FORWARD_PORT)

    def sent(self, source):
        progress = [e["sent"] for e in events(source.stdout()) if e.get("event") == "progress"]
        return progress[-1] if progress else 0

    def wait_sent(self, source, count, timeout):
        return wait_output(source, lambda out: self.sent(source) >= count,
                           f"{count} bytes sent", timeout)

    def router_block(self, router, peer_ip):
        """Drop UDP to and from C{peer_ip} in C{router}'s forwarding; lift it with C{.lift()}."""
        block = UdpBlock.in_router(router, peer_ip, "qpblock")
        self.addCleanup(block.lift)
        return block

    def check_transfer(self, a, source, line):
        """The source's result, the forward's events: intact, no error, one connection."""
        result = finish_python(source, timeout=90)
        size, digest = expected()
        self.assertEqual((result["sent"], result["sha256"]), (size, digest), line)
        self.assertEqual(result["reply"], f"{size} {digest}", line)
        closed = wait_event(a, "stream-closed", timeout=10)
        self.assertNotIn("error", closed, line)
        self.assertEqual(closed.get("sent"), size, line)
        quic = [e for e in events(a.stdout()) if e.get("event") == "quic"]
        self.assertEqual(len(quic), 1, line)
        return result

    def modes(self, a):
        return [e["mode"] for e in events(a.stdout()) if e.get("event") == "mode"]

    # -- tests -------------------------------------------------------------------------

    def test_relayed_stream_finishes_direct(self):
        """
        A stream opened while the path is relayed (the first punch was
        blocked) turns direct in the middle of the transfer and finishes
        intact, on one QUIC connection, with no error.
        """
        pl = self.env
        block = self.router_block(pl.routers["aup"], pl.routers["bup"].public_ip)
        t0 = time.monotonic()
        # The punch goes on until the relay's reserve (3 s) and half a
        # second are left: with 7 s it gives up after 3.5 s instead of 11.5.
        a, path = self.connect("up", budget=7)
        self.assertEqual(path["mode"], "relayed", a.describe())
        source = self.source("up")
        self.wait_sent(source, 2 * STEP, timeout=30)
        block.lift()
        wait_event(a, "mode", timeout=30, where=lambda e: e.get("mode") == "direct")
        at_direct = self.sent(source)
        line = (f"cone -> symmetric-random: relayed first, direct with {at_direct / STEP:.0f}"
                f" of {SIZE / STEP:.0f} MB sent")
        result = self.check_transfer(a, source, line)
        measured(f"{line}; {SIZE / STEP:.0f} MB intact in {result['seconds']:.1f}s"
                 f" ({time.monotonic() - t0:.1f}s with the connect)")
        # The route changed mid-transfer: some of it was relayed, the rest direct.
        self.assertGreater(at_direct, 0, line)
        self.assertLess(at_direct, SIZE, line)
        a.stop()

    def test_conntrack_flush_on_each_side(self):
        """
        ``conntrack -F`` on alice's router, then on bob's, in the middle of
        one transfer: the bytes arrive intact, on one QUIC connection, and
        the application sees no error; after bob's, the path went through
        the relay and is direct again.
        """
        pl = self.env
        a, path = self.connect("fl")
        self.assertEqual(path["mode"], "direct", a.describe())
        source = self.source("fl")
        self.wait_sent(source, 3 * STEP, timeout=30)
        pl.lab.flush_conntrack(pl.routers["afl"])
        flushed_a = self.sent(source)
        self.wait_sent(source, flushed_a + 3 * STEP, timeout=40)
        modes_before = len(self.modes(a))
        pl.lab.flush_conntrack(pl.routers["bfl"])
        flushed_b = self.sent(source)
        line = (f"cone -> symmetric-random: conntrack -F on alice's NAT at"
                f" {flushed_a / STEP:.0f} MB, on bob's at {flushed_b / STEP:.0f} MB")
        result = self.check_transfer(a, source, line)
        b_events = events(pl.clients["bfl"].waiter.stdout())
        silent = [e for e in events(a.stdout()) + b_events if e.get("event") == "path-silent"]
        measured(f"{line}; {SIZE / STEP:.0f} MB intact in {result['seconds']:.1f}s;"
                 f" modes {self.modes(a)}, path-silent events {len(silent)}")
        # Bob's new random port is one alice's NAT filters: the relay carried
        # the connection until a new punch made the path direct again.
        self.assertEqual(self.modes(a)[modes_before:][:1], ["relayed"], line)
        self.assertEqual(self.modes(a)[-1:], ["direct"], line)
        a.stop()


# -- the TCP sink and source, run inside the lab's namespaces -------------------------------

def _emit(**fields):
    print(json.dumps(fields), flush=True)


def _sink(port):
    """Hash each connection's bytes; answer ``COUNT SHA256`` at its end."""
    server = socket.create_server(("127.0.0.1", port))
    _emit(event="listening", port=port)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(120)
            digest, count = hashlib.sha256(), 0
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                digest.update(data)
                count += len(data)
            conn.sendall(f"{count} {digest.hexdigest()}".encode())
            _emit(event="received", count=count, sha256=digest.hexdigest())


def _source(port):
    """Send SIZE bytes, printing progress; then read the sink's answer."""
    data = random.Random(SEED).randbytes(SIZE)
    t0 = time.monotonic()
    conn = socket.create_connection(("127.0.0.1", port), timeout=120)
    sent = 0
    while sent < SIZE:
        chunk = data[sent:sent + STEP]
        conn.sendall(chunk)
        sent += len(chunk)
        _emit(event="progress", sent=sent)
    conn.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        more = conn.recv(4096)
        if not more:
            break
        reply += more
    conn.close()
    _emit(event="done", sent=sent, sha256=hashlib.sha256(data).hexdigest(),
          reply=reply.decode(errors="replace"), seconds=round(time.monotonic() - t0, 3))


def main(argv=None):
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("role", choices=("sink", "source"))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    (_sink if args.role == "sink" else _source)(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
