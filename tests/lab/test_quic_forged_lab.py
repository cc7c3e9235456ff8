"""
Forged and replayed QUIC packets do nothing, across the Linux kernel's real
NATs: A and B, each behind a cone NAT, have a direct path, and a stream of
40 MB (about 5 s here) goes through ``p2pnat peer connect --forward-tcp`` (A) to ``peer
wait --service`` (B) (:class:`tests.support.lab.streams.StreamLab`).

In the middle of the transfer a genuine QUIC packet from A to B is
captured on B's router's WAN (the lab's ``sniff --quic``), and a third host
on the internet segment sends to B's punched mapping, with A's mapping as
its spoofed source: that packet again (replays), the packet with one byte
of its protected payload flipped, random bytes under B's connection ID,
and the packet under a random connection ID; then some of them from a new
source address that B's NAT lets in (the lobby's address and port that B's
socket talks to), where a genuine packet raced ahead of A's copy would
come from.

What must hold: the transfer completes with the same sha256 at both ends
and no error, on one QUIC connection; B's route did not change (no ``mode``
event, no "now sends from" in its log); B's log shows each drop
(``unauthenticated``, ``unknown-connection``, and ``oversized`` or
``unknown-protocol`` for the stray one from the new source); a
capture on B's router saw every injected packet on its way to B (so the
checks above are about packets that arrived), and B's packets going out
(so it would see B's answers); and B sent no QUIC packet toward the new
source address (nothing there passed authentication, so nothing, not even
a path challenge, is due).

The test needs root, ``ip``, ``nft`` and ``conntrack``; it skips
otherwise, and fails instead when the environment variable ``CI`` is set.
"""

import hashlib
import re
import signal

from p2pnat.protocol import wire
from tests.support.lab import packets
from tests.support.lab import streams as S
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import add_home
from tests.support.lab.running import (
    events,
    finish_python,
    run_tool,
    start_python,
    start_tool,
    wait_event,
    wait_for_log,
    wait_output,
)

#: Bytes the stream carries: long enough to outlast the capture and the attack.
SIZE = 40_000_000


def _sha(payload):
    return hashlib.sha256(payload).hexdigest()


class ForgedQuicTests(LabTestCase):
    """One lab: a lobby, A and B behind cone NATs, an attacker on the internet segment."""

    @classmethod
    def make_env(cls, workdir):
        return S.StreamLab(workdir)

    @classmethod
    def build(cls, sl):
        cls.ra = add_home(sl, "fqa", "cone", router="fqra")
        cls.rb = add_home(sl, "fqb", "cone", router="fqrb")
        cls.evil = sl.lab.add_host("fqevil")
        sl.start_lobby()
        sl.serve("fqb")

    # -- helpers ---------------------------------------------------------------------

    def lobby_mapping(self, b_mapping):
        """
        The lobby address and port that B's mapping ``b_mapping`` talks to
        (from B's router's conntrack table): a source other than A that
        B's NAT lets in to B's socket.  The lobby's main address (B's
        presence keepalives keep that entry) if B's mapping has it, else
        another with traffic both ways.
        """
        ip, port = b_mapping.rsplit(":", 1)
        table = self.lab.conntrack(self.rb)
        found = []
        for line in table.splitlines():
            # The reply tuple: the remote's address and port to our mapping.
            reply = re.findall(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", line)
            if line.startswith("udp") and len(reply) == 2:
                rsrc, rdst, rsport, rdport = reply[1]
                if (rdst, rdport) == (ip, port) and rsrc in self.env.server.ips:
                    found.append((f"{rsrc}:{rsport}" != self.env.lobby_addr,
                                  "ASSURED" not in line, f"{rsrc}:{rsport}"))
        if not found:
            raise AssertionError(f"no lobby mapping of B's {b_mapping} in:\n{table}")
        return min(found)[2]

    def capture(self, a_ip, timeout=30):
        """The sniff tool on B's WAN, for the first QUIC packets from A's router."""
        sniff = start_tool(self.rb, "sniff", "--iface", "wan", "--quic", "--src", a_ip,
                           "--count", "40", "--timeout", str(timeout))
        wait_for_log(sniff, r'"listening"', timeout=20)
        return sniff

    def genuine(self, sniff):
        """The largest short-header packet ``sniff`` captured (a stream packet): its event."""
        sniff.wait(30)
        short = [e for e in events(sniff.stdout()) if "packet" in e
                 and not packets.udp_payload(bytes.fromhex(e["packet"]))[0] & 0x80]
        self.assertTrue(short, sniff.describe(3000))
        return max(short, key=lambda e: len(e["packet"]))

    def wait_count(self, proc, text, count, start):
        """Wait until ``proc``'s log from ``start`` on has ``text`` ``count`` times."""
        wait_output(proc, lambda log: log[start:].count(text) >= count,
                    f"{count} times {text!r}", timeout=10, stream="stderr")

    # -- the test ----------------------------------------------------------------------

    def test_forged_and_replayed_quic_packets_do_nothing(self):
        """
        Replays, a flipped byte, random bytes under B's connection ID and a
        random connection ID, from A's spoofed mapping and from a new
        source that B's NAT lets in, injected mid-transfer toward B's
        mapping: each is dropped and counted by B, B's route stays, B
        answers the new source nothing, and the stream arrives intact.
        """
        sl = self.env
        b = sl.clients["fqb"].waiter
        a = sl.start_connect("fqa", "fqb", "--forward-tcp", f"127.0.0.1:0={S.SERVICE}",
                             "--exit-after", "90")
        path = wait_event(a, "path", timeout=30)
        self.assertEqual(path["mode"], "direct", a.describe())
        forward = wait_event(a, "forward-tcp", timeout=20)
        b_events_before = len(events(b.stdout()))

        sniff = self.capture(self.ra.public_ip)
        # The capture sees B's side too: a packet from B to A going out.
        outgoing = start_tool(self.rb, "sniff", "--iface", "wan", "--quic", "--src",
                              self.rb.public_ip, "--dst", self.ra.public_ip, "--timeout", "30")
        wait_for_log(outgoing, r'"listening"', timeout=20)
        source = start_python(sl.clients["fqa"].host, S.MODULE, "source", "--host",
                              "127.0.0.1", "--port", forward["port"], "--size", SIZE,
                              "--marker", S.new_marker().hex())
        genuine = self.genuine(sniff)
        payload = packets.udp_payload(bytes.fromhex(genuine["packet"]))
        self.assertGreater(len(payload), 1000, genuine)  # one carrying stream data
        a_map, b_map = genuine["src"], genuine["dst"]
        self.assertIn("packet", finish_python(outgoing, timeout=30), outgoing.describe(3000))
        new = self.lobby_mapping(b_map)

        spoofed = [payload] * 3 + [packets.quic_forgery(payload, "flip"),
                                   packets.quic_forgery(payload, "random")]
        unknown_cid = [packets.quic_forgery(payload, "cid") for _ in range(2)]
        from_new = [payload] * 2 + [packets.quic_forgery(payload, "flip")]
        new_unknown_cid = [packets.quic_forgery(payload, "cid")]
        sends = ([(a_map, p) for p in spoofed + unknown_cid]
                 + [(new, p) for p in from_new + new_unknown_cid])

        # On B's WAN: every injected packet on its way to B, and whatever
        # QUIC B sends to the new source.
        seen = start_tool(self.rb, "sniff", "--iface", "wan", "--quic", "--dst", b_map,
                          "--count", "0", "--timeout", "60",
                          *[arg for _, p in sends for arg in ("--payload-sha256", _sha(p))])
        answers = start_tool(self.rb, "sniff", "--iface", "wan", "--quic", "--src", b_map,
                             "--dst", new, "--count", "0", "--timeout", "60")
        for proc in (seen, answers):
            wait_for_log(proc, r'"listening"', timeout=20)
        log_start = len(b.stderr())
        run_tool(self.evil, "inject", *[arg for src, p in sends for arg in (
            "--hex", packets.ip_udp_packet(packets.hostport(src), packets.hostport(b_map),
                                           p).hex())])
        # The attack must land while the stream is under way.
        self.assertIsNone(source.poll(), "the transfer ended before the attack: raise SIZE")

        # B dropped them: what reached the connection failed authentication.
        unauth = spoofed + from_new
        # Each was dropped and counted: B's drop log lists the first ten of
        # each reason a minute (fewer than ten are sent here).  QUIC counts
        # a packet under the path's peer address whatever its source: those
        # from the new source that reach the connection are under A's too.
        drop = f"dropped datagram from {a_map}: "
        self.wait_count(b, drop + "unauthenticated", len(unauth), log_start)
        self.wait_count(b, drop + "unknown-connection", len(unknown_cid), log_start)
        # The one under an unknown connection ID from the new source reaches
        # no connection: B's socket drops it, as oversized for its own frames
        # when it is larger than they may be (QUIC packets grow to 1452 bytes
        # once the route was probed), else as an unknown protocol.
        [stray] = new_unknown_cid
        reason = (f"oversized {len(stray)} bytes" if len(stray) > wire.MAX_DATAGRAM
                  else "unknown-protocol first byte 0x")
        self.wait_count(b, f"dropped datagram from {new}: {reason}", 1, log_start)

        result = finish_python(source, timeout=60)
        b_log = b.stderr()[log_start:]
        for proc in (seen, answers):
            proc.popen.send_signal(signal.SIGTERM)
        seen_total = finish_python(seen, timeout=10)
        answered = finish_python(answers, timeout=10)
        line = (f"{len(sends)} injected ({len(spoofed + unknown_cid)} as A's {a_map},"
                f" {len(from_new + new_unknown_cid)} from {new}); {seen_total['captured']} seen"
                f" on B's WAN; B's drops: {b_log.count(drop + 'unauthenticated')} unauthenticated,"
                f" {b_log.count(drop + 'unknown-connection')} unknown-connection; B sent"
                f" {answered['bytes']} bytes of QUIC to {new}")
        measured(f"{line}; {SIZE / 1e6:.0f} MB intact in {result['seconds']:.1f}s")

        # The injected packets all reached B's router on their way to B.
        self.assertEqual(seen_total["captured"], len(sends), seen.describe(3000))
        self.assertEqual(answered["kernel_dropped"], 0, answers.describe(3000))
        # B answered the new source nothing: no packet from there passed
        # authentication (a genuine one raced ahead of A's copy would cost
        # a path challenge, at most three times what came from there).
        self.assertEqual((answered["captured"], answered["bytes"]), (0, 0), line)
        # The stream is intact, with no error, on one connection.
        sink = result.get("sink") or {}
        self.assertIsNone(result.get("error"), result)
        self.assertEqual((result["sent"], sink.get("received"), sink.get("sha256")),
                         (SIZE, SIZE, result["sha256"]), result)
        self.assertIsNone(sink.get("error"), result)
        closed = wait_event(a, "stream-closed", timeout=10)
        self.assertNotIn("error", closed, a.describe())
        self.assertEqual(len([e for e in events(a.stdout()) if e.get("event") == "quic"]), 1,
                         a.describe())
        # B's route did not move: no mode change, no "now sends from".
        b_after = events(b.stdout())[b_events_before:]
        self.assertEqual([e for e in b_after if e.get("event") == "mode"], [], b.describe())
        self.assertNotIn("now sends from", b_log)
        a.stop()
