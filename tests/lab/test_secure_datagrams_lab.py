"""
The path's datagrams on the encrypted channel across the kernel's real
NATs, in the NAT lab: ``p2pnat peer wait --echo`` (B) and ``p2pnat peer
connect B --send MARKER`` (A), both with certificates from ``client add``,
and a capture on B's router's WAN interface (every packet B exchanges,
with A or with the lobby), run by this module in the router's namespace
(``python -m tests.lab.test_secure_datagrams_lab --iface wan ...``).

- cone × cone: the path is direct, the echo comes back, and no packet on
  the wire carries the marker;
- cone × symmetric-random, with direct UDP between the two routers dropped
  on the internet switch: the path is relayed by the lobby, the echo comes
  back through it, and no packet to or from the lobby carries the marker.

In the clear (the path's own frames, before), the marker crossed B's WAN
in both cases.  The tests need root, ``ip``, ``nft`` and ``conntrack``;
they skip otherwise, and fail instead when ``CI`` is set.
"""

import argparse
import json
import signal
import sys
import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import UdpBlock, add_home
from tests.support.lab.running import events, first, start_python, wait_for_log

MARKER = "LAB-SECRET-MARKER-5d2c"
MODULE = "tests.lab.test_secure_datagrams_lab"


class SecureDatagramsLabTests(LabTestCase):
    """One lab: two cone routers and a symmetric-random one, a host behind each."""

    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir)

    @classmethod
    def build(cls, pl):
        cls.ra, cls.rb, cls.rr = (
            add_home(pl, cid, kind, router=router, host=f"h{cid}") for cid, kind, router in (
                ("sa", "cone", "ra"), ("sb", "cone", "rb"), ("sr", "symmetric-random", "rr")))
        pl.start_lobby()

    def setUp(self):
        super().setUp()
        self.pl = self.env

    def sniff(self, router):
        """A capture on C{router}'s WAN, listening; stop it with L{sniffed}."""
        proc = start_python(router, MODULE, "--iface", "wan", "--marker", MARKER,
                            "--duration", "60")
        self.addCleanup(proc.stop)
        wait_for_log(proc, r'"listening"')
        return proc

    def sniffed(self, proc):
        """What the capture saw: C{{"packets": N, "marker": [...]}}."""
        proc.stop()
        lines = [json.loads(line) for line in proc.stdout().splitlines() if line.startswith("{")]
        done = [e for e in lines if "packets" in e]
        self.assertTrue(done, proc.describe())
        return done[-1]

    def block_direct(self, x, y):
        """Drop UDP between the WAN addresses C{x} and C{y} on the internet switch."""
        self.addCleanup(UdpBlock.on_internet(self.lab, x, y, "securedirect").lift)

    def echo_through(self, a, b, b_router, mode):
        """A sends the marker to B's echo; the capture on B's router never sees it."""
        pl = self.pl
        waiter = pl.start_wait(b, "--echo")
        self.addCleanup(waiter.stop)
        pl.wait_login(b)
        capture = self.sniff(b_router)
        trial = pl.connect(a, b, "--send", MARKER, "--wait", "10", "--timeout", "8")
        path = trial.path
        self.assertIsNotNone(path, trial.describe())
        self.assertEqual((path["mode"], path.get("encrypted")), (mode, True), trial.describe())
        data = first(trial.events, "data")
        self.assertIsNotNone(data, trial.describe())
        self.assertEqual(data["text"], MARKER)
        seen = self.sniffed(capture)
        measured(f"{mode} in {path['seconds']:.2f}s; {seen['packets']} packets on B's WAN,"
                 f" {len(seen['marker'])} with the marker")
        self.assertGreater(seen["packets"], 4)
        self.assertEqual(seen["marker"], [])
        bob_path = first(events(waiter.stdout()), "path")
        self.assertEqual(bob_path.get("encrypted"), True, waiter.describe())
        return seen

    def test_cone_cone_direct(self):
        self.echo_through("sa", "sb", self.rb, "direct")

    def test_cone_random_relayed(self):
        """Direct UDP between the routers dropped: relayed, and the lobby sees only ciphertext."""
        self.block_direct(self.ra.wan_ip, self.rr.wan_ip)
        seen = self.echo_through("sa", "sr", self.rr, "relayed")
        self.assertGreater(seen["lobby"], 4, seen)


# -- the capture, run in a router's namespace -----------------------------------------------


def _capture(argv):
    """
    Capture UDP on ``--iface`` for at most ``--duration`` seconds (or until
    SIGTERM); print ``{"listening": IFACE}``, then at the end
    ``{"packets": N, "lobby": M, "marker": [...]}``: the packets seen, the
    ones to or from ``--lobby`` addresses, and the sources of those that
    carried ``--marker``.
    """
    from tests.support.lab import packets

    p = argparse.ArgumentParser()
    p.add_argument("--iface", required=True)
    p.add_argument("--marker", required=True)
    p.add_argument("--duration", type=float, default=60.0)
    args = p.parse_args(argv)
    marker = args.marker.encode()
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    capture = packets.Capture(args.iface)
    print(json.dumps({"listening": args.iface}), flush=True)
    count, lobby_ports, carried = 0, 0, []
    deadline = time.monotonic() + args.duration
    try:
        while not stop and time.monotonic() < deadline:
            for _, src, dst, payload in capture.udp(0.2):
                count += 1
                if {src.rsplit(":", 1)[1], dst.rsplit(":", 1)[1]} & {
                        str(port) for port in P.LOBBY_PORTS}:
                    lobby_ports += 1
                if marker in payload:
                    carried.append(f"{src}>{dst}")
                if stop:
                    break
    finally:
        capture.close()
        print(json.dumps({"packets": count, "lobby": lobby_ports, "marker": carried}),
              flush=True)


if __name__ == "__main__":
    sys.exit(_capture(sys.argv[1:]))
