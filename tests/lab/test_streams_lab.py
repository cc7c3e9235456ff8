"""
TCP over p2pnat's QUIC streams between lab peers behind real NATs, as users
run it: ``p2pnat peer wait --service bulk=127.0.0.1:9099`` on B's host (a
sink that hashes what it reads), ``p2pnat peer connect B --forward-tcp
127.0.0.1:0=bulk`` on A's, and 20 MB pushed through A's port, with sha256
compared at both ends (:mod:`tests.support.lab.streams`).

- a direct pair: A behind a cone NAT, B behind a sequential symmetric one
  (the datagram matrix's ``predict`` punch), with 2 % loss on both WANs;
- a relayed pair: both behind random symmetric NATs (the lobby relays
  their path), with a capture on the lobby's interface for the whole
  transfer: the stream's plaintext (a 16-byte marker in every 64 bytes)
  never appears in it, while the capture did see the relayed traffic
  (more UDP payload than twice the transfer's size: both legs, in and
  out; and the lobby's own clear-text p2pnat frames).

The lobby runs with ``--lobby-relay-rate`` 64 MiB/s so that the relayed
20 MB fit the module's time budget (its default, 512 KiB/s per session,
would take 40 s).  The whole matrix, with and without loss, is
``bench/stream_matrix.py``.

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

from tests.support.lab import p2p as P
from tests.support.lab import streams as S
from tests.support.lab.cases import LabTestCase, measured

SIZE = 20_000_000
RELAY_RATE = 64 << 20


class StreamsLabTests(LabTestCase):
    """One lab: a lobby, a cone -> sequential pair and a random -> random pair."""

    @classmethod
    def make_env(cls, workdir):
        return S.StreamLab(workdir, relay_rate=RELAY_RATE)

    @classmethod
    def build(cls, sl):
        lab = sl.lab
        cls.hosts = {}
        for cid, kind in (("a-cone", "cone"), ("b-seq", "symmetric-sequential"),
                          ("a-rand", "symmetric-random"), ("b-rand", "symmetric-random")):
            router = lab.add_router(f"r{cid.replace('-', '')}", kind=kind)
            cls.hosts[cid] = lab.add_host(cid.replace("-", ""), behind=router)
            sl.add_client(cid, cls.hosts[cid])
        sl.start_lobby()
        for cid, kind in (("b-seq", "symmetric-sequential"), ("b-rand", "symmetric-random")):
            sl.serve(cid, P.EXPECTED_NAT[kind])

    def setUp(self):
        super().setUp()
        self.sl = self.env

    def check(self, result, route):
        self.assertTrue(result.ok, result.describe())
        self.assertEqual(result.route, route, result.describe())
        measured(f"{result.route}, {result.mbps:.1f} MB/s, {result.seconds:.1f}s,"
                 f" CPU a {result.cpu.get('a')}s b {result.cpu.get('b')}s"
                 f" lobby {result.cpu.get('lobby')}s")

    def test_direct_with_loss(self):
        """
        cone -> sequential symmetric, 2 % loss each way on both WANs: 20 MB
        arrive whole (sha256) over a direct path.
        """
        ips = [S.wan_ip(self.hosts[c]) for c in ("a-cone", "b-seq")]
        loss = S.Loss(self.lab, "streamloss", ips, 2).start()
        self.addCleanup(loss.stop)
        # About 1 MB/s here (QUIC halves its window at each loss): 20 s.
        result = self.sl.transfer("a-cone", "b-seq", SIZE, timeout=75)
        self.check(result, "direct")

    def test_relayed_never_shows_plaintext(self):
        """
        random -> random symmetric: 20 MB arrive whole over the lobby's
        relay, and the lobby's interface never carried the stream's marker,
        though it carried more than 2 x 20 MB of UDP payload and the lobby's
        own clear-text frames (the capture worked).
        """
        marker = S.new_marker()
        sniffer = S.Sniffer(self.sl.server, marker)
        try:
            result = self.sl.transfer("a-rand", "b-rand", SIZE, marker=marker, timeout=60)
        finally:
            seen = sniffer.stop()
        self.check(result, "relayed")
        measured(f"lobby's eth0: {seen['packets']} UDP packets, {seen['udp_bytes']} bytes,"
                 f" {seen['frames']} p2pnat frames, {seen['kernel_dropped']} dropped by the"
                 " kernel")
        self.assertEqual(seen["marker_packets"], 0, f"plaintext on the lobby's wire: {seen}")
        # Both legs (A to the lobby, the lobby to B) crossed this interface.
        self.assertGreater(seen["udp_bytes"], 2 * SIZE, seen)
        self.assertGreater(seen["frames"], 0, seen)
