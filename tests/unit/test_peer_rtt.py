"""
The round-trip estimator (L{p2pnat.peer.rtt.RttEstimator}) on a L{Clock}:
RFC 6298's smoothing, the bounds of every timer, and the fixed caps
before the first sample.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.rtt import MAX_SAMPLE, MIN_SAMPLE, RttEstimator


class SmoothingTests(SynchronousTestCase):
    def test_first_sample(self):
        """RFC 6298 2.2: srtt = R, rttvar = R / 2, rto = R + 4 rttvar = 3 R."""
        rtt = RttEstimator(Clock())
        self.assertFalse(rtt.known)
        rtt.sample(0.02)
        self.assertTrue(rtt.known)
        self.assertEqual((rtt.srtt, rtt.rttvar, rtt.samples), (0.02, 0.01, 1))
        self.assertAlmostEqual(rtt.rto(0.0, 10.0), 0.06)

    def test_later_samples(self):
        """RFC 6298 2.3: rttvar first (with the old srtt), then srtt; alpha 1/8, beta 1/4."""
        rtt = RttEstimator(Clock())
        rtt.sample(0.02)
        rtt.sample(0.04)
        self.assertAlmostEqual(rtt.rttvar, 0.75 * 0.01 + 0.25 * 0.02)
        self.assertAlmostEqual(rtt.srtt, 0.875 * 0.02 + 0.125 * 0.04)
        for _ in range(100):
            rtt.sample(0.03)
        # A steady RTT: srtt converges on it, the variation on zero.
        self.assertAlmostEqual(rtt.srtt, 0.03, places=4)
        self.assertLess(rtt.rttvar, 1e-4)

    def test_bad_samples(self):
        """Negative or NaN samples are ignored; the rest clamped into [MIN, MAX]."""
        rtt = RttEstimator(Clock())
        for bad in (-0.1, float("nan"), None):
            rtt.sample(bad)
        self.assertEqual(rtt.samples, 0)
        rtt.sample(0.0)
        self.assertEqual(rtt.srtt, MIN_SAMPLE)
        rtt = RttEstimator(Clock())
        rtt.sample(3600)
        self.assertEqual(rtt.srtt, MAX_SAMPLE)


    def test_since(self):
        """L{since} times a request from its send time on the injected clock."""
        clock = Clock()
        rtt = RttEstimator(clock)
        sent = clock.seconds()
        clock.advance(0.05)
        self.assertAlmostEqual(rtt.since(sent), 0.05)
        self.assertAlmostEqual(rtt.srtt, 0.05)


class TimerTests(SynchronousTestCase):
    def test_caps_before_a_sample(self):
        """Before the first sample every timer is its cap: the old fixed behaviour."""
        rtt = RttEstimator(Clock())
        self.assertEqual(rtt.rto(0.1, 0.5), 0.5)
        self.assertEqual(rtt.scaled(10, 1.0, 2.0), 2.0)
        self.assertEqual(rtt.to_json(), {"samples": 0})

    def test_floor_and_cap(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.0001)  # the NAT lab: every timer at its floor
        self.assertEqual(rtt.rto(0.03, 0.6), 0.03)
        self.assertEqual(rtt.scaled(10, 1.0, 2.0), 1.0)
        rtt = RttEstimator(Clock())
        rtt.sample(1.0)  # a slow path: every timer at its cap
        self.assertEqual(rtt.rto(0.03, 0.6), 0.6)
        self.assertEqual(rtt.scaled(10, 1.0, 2.0), 2.0)

    def test_scaled_between(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.02)  # rto 0.06
        self.assertAlmostEqual(rtt.scaled(10, 0.1, 2.0), 0.6)
        self.assertAlmostEqual(rtt.scaled(0.5, 0.0, 2.0), 0.03)

    def test_to_json(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.0205)
        self.assertEqual(rtt.to_json(), {"samples": 1, "srtt_ms": 20.5, "rttvar_ms": 10.25})
