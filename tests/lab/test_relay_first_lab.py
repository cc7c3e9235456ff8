"""
Relay first where the punch is uncertain, across the Linux kernel's real
NATs (:meth:`RelayFirstTests.test_carrier_nat_first_echo_within_the_relay_time`):
two homes (cone routers) behind one carrier-grade NAT (a random-port
symmetric NAT), which does not hairpin: one public IP for both, local
addresses in other homes.  A's first echo from B comes back within the
time a relayed path takes (measured in the same test: C, behind a NAT of
its own, connects to the same B with a plan that can only relay).
Before, the punch to the local addresses ran its rounds until only the
relay's reserve was left: about 10 s.

The presence keepalive S learns from its NAT is in
tests.lab.test_keepalive_learnt_lab.

The test needs root, ``ip``, ``nft`` and ``conntrack``; it skips
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import add_home
from tests.support.lab.running import first

#: What the first echo over a relay-first path may take beyond a relayed
#: path's: the answering side learns the relay is ready at its next bind
#: (every 0.25 s), in both cases; the rest is scheduling noise.
MARGIN = 0.5
RANDOM_NAT = "address-and-port-dependent/random"


def first_echo(trial):
    """Seconds from the connect call to the first echo, or None."""
    path, echo = trial.path, first(trial.events, "data")
    if path is None or echo is None:
        return None
    return echo["t"] - path["t"] + path["seconds"]


class RelayFirstTests(LabTestCase):
    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir)

    @classmethod
    def build(cls, pl):
        cgn = pl.lab.add_router("cgn", kind="symmetric-random")
        for side in ("a", "b"):
            add_home(pl, side, "cone", behind=cgn)
        add_home(pl, "c", "cone")
        pl.start_lobby()
        pl.start_wait("b", "--echo")
        pl.wait_login("b")

    def connect(self, cid, peer, *args):
        return self.env.connect(cid, peer, "--nat", RANDOM_NAT, "--send", "ping", "--wait",
                                "4", *args)

    def test_carrier_nat_first_echo_within_the_relay_time(self):
        relayed, first_hand = [], []
        for _ in range(2):
            relayed.append(self.connect("c", "b"))
            first_hand.append(self.connect("a", "b"))
        for t in relayed:
            self.assertEqual((t.returncode, t.mode, t.path["strategy"]), (0, "relayed", "relay"),
                             t.describe())
        for t in first_hand:
            self.assertEqual(t.returncode, 0, t.describe())
            self.assertEqual(t.path["strategy"], "relay first (direct)", t.describe())
        relay_time = max(first_echo(t) for t in relayed)
        took = [first_echo(t) for t in first_hand]
        line = (f"two homes behind one carrier NAT, no hairpinning: first echo in"
                f" {', '.join(f'{s:.3f}' for s in took)}s; a relayed path's first echo"
                f" {', '.join(f'{first_echo(t):.3f}' for t in relayed)}s")
        measured(line)
        self.assertLessEqual(max(took), relay_time + MARGIN, line)
