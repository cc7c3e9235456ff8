"""
The answering side's probes around the moment the asker's first probe
opens its NAT (L{p2pnat.peer.punch.CATCH_RTTS}), on a simulated 20 ms RTT
between two filtering NATs: the asker has the path from one of them,
about half a round trip after its own first probe, instead of a full
round trip later from the answer to that probe.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.punch import CATCH_RTTS
from p2pnat.protocol.strategy import Actions
from tests.support.udp import SimNat
from tests.unit.test_peer_punch import APD, World

ONE_WAY = 0.010


class CatchTests(SynchronousTestCase):

    def punch(self, rtt_known=True, samples=(2 * ONE_WAY,)):
        """
        B (role b) starts its punch at 0 (its first probe dies at A's NAT);
        A starts at one RTT (the Introduce's arrival).  When A had its path
        (seconds after B's start), and the probes B sent.
        """
        w = World(self, latency=ONE_WAY)
        a = w.side("alice", "a", "10.0.1.2", SimNat("203.0.113.1", filtering=APD))
        b = w.side("bob", "b", "10.0.2.2", SimNat("198.51.100.1", filtering=APD))
        for side in (a, b):
            for sample in samples if rtt_known else ():
                side.client.rtt.sample(sample)
        a_pub, b_pub = ("203.0.113.1", a.local[1]), ("198.51.100.1", b.local[1])
        t0 = w.clock.seconds()
        b.start(Actions(from_fresh=[a_pub], interval=0.2))
        w.advance(2 * ONE_WAY)
        a.start(Actions(from_fresh=[b_pub], interval=0.2))
        when = None
        for _ in range(100):
            w.clock.advance(0.001)
            if a.result and when is None:
                when = w.clock.seconds() - t0
        self.assertEqual(a.result, [(a.fresh, b_pub)])
        self.assertEqual(b.result, [(b.fresh, a_pub)])
        return when, w.probes(src=b_pub)

    def test_asker_has_the_path_half_a_round_trip_after_its_probe(self):
        when, probes = self.punch()
        # A probed at 20 ms; B's probe sent at 15 ms (0.75 RTT) passes A's
        # NAT at 25 ms.  Without it: B's answer to A's probe, at 40 ms.
        self.assertLessEqual(when, 0.026)
        self.assertGreater(when, 0.020)
        # B's probes: the first, and those of CATCH_RTTS sent before it had
        # the path (A's probe reached it at 30 ms, before its 30 ms one).
        self.assertEqual(len(probes), 1 + len([k for k in CATCH_RTTS if k * 0.02 < 0.030]))

    def test_timed_on_the_shortest_sample(self):
        """
        A busy start inflated the first sample (100 ms): the smoothed RTT
        is still far above the path's, the catching probes follow the
        shortest sample.
        """
        when, _ = self.punch(samples=(0.1, 2 * ONE_WAY))
        self.assertLessEqual(when, 0.026)

    def test_not_without_an_rtt(self):
        """Before the RTT to the lobby is known, B probes as before: A waits for its answer."""
        when, probes = self.punch(rtt_known=False)
        self.assertGreaterEqual(when, 0.039)
