"""
Tests for L{p2pnat.protocol.strategy}: what each side does for each pair of
NATs, and that the two sides' actions fit together.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol.p2p import NatInfo
from p2pnat.protocol.strategy import CANDIDATE_ROUND, SPREAD, actions_for, with_candidates

PUBLIC = NatInfo("none", "none", "preserving")
CONE = NatInfo("endpoint-independent", "address-and-port-dependent", "preserving")
SEQ = NatInfo("address-and-port-dependent", "address-and-port-dependent", "sequential", 1, 0.0)
SEQ3 = NatInfo("address-and-port-dependent", "address-and-port-dependent", "sequential", 3, 0.0)
BUSY = NatInfo("address-and-port-dependent", "address-and-port-dependent", "sequential", 1, 40.0)
RANDOM = NatInfo("address-and-port-dependent", "address-and-port-dependent", "random")

A_PUBLIC = ("203.0.113.1", 20000)  # A's fresh mapping P+b, as B learns it
B_PUBLIC = ("198.51.100.2", 30000)  # B's fresh mapping Q+d, as A learns it
A_LOCAL, B_LOCAL = ("10.0.0.2", 40000), ("10.1.0.2", 50000)


def both(a_nat, b_nat, same=False):
    b_public = A_PUBLIC[0] if same else B_PUBLIC[0]
    a = actions_for("a", a_nat, b_nat, (b_public, B_PUBLIC[1]), B_LOCAL, (A_PUBLIC[0], 1))
    b = actions_for("b", b_nat, a_nat, A_PUBLIC, A_LOCAL, (b_public, 2))
    return a, b


class StrategyTests(SynchronousTestCase):
    def test_cone_pair_simultaneous_open(self):
        (a, pa, _), (b, pb, _) = both(CONE, CONE)
        self.assertEqual((pa.strategy, pb.strategy), ("simultaneous-open",) * 2)
        self.assertEqual((a.from_fresh, b.from_fresh), ([B_PUBLIC], [A_PUBLIC]))

    def test_same_nat_local_first(self):
        (a, pa, _), (b, pb, _) = both(CONE, CONE, same=True)
        self.assertEqual(pa.strategy, "direct")
        self.assertEqual(a.from_fresh[0], B_LOCAL)
        self.assertEqual(b.from_fresh[0], A_LOCAL)

    def test_seed_both_sequential(self):
        """A opens n new ports to Q+d+1…; B sends one packet to P+b+n from a new port."""
        (a, pa, _), (b, pb, _) = both(SEQ, SEQ)
        self.assertEqual((pa.strategy, pb.strategy), ("predict", "predict"))
        n = pa.params.n
        self.assertEqual(a.new_sockets, n)
        self.assertEqual(a.new_to, [(B_PUBLIC[0], B_PUBLIC[1] + k) for k in range(1, SPREAD + 1)])
        self.assertEqual((b.new_sockets, b.new_to), (1, [(A_PUBLIC[0], A_PUBLIC[1] + n)]))
        self.assertEqual(a.from_fresh + b.from_fresh, [])

    def test_window_follows_step_and_rate(self):
        (a, pa, _), (b, _, _) = both(SEQ3, CONE)
        self.assertEqual(b.from_fresh, [(A_PUBLIC[0], A_PUBLIC[1] + 3 * pa.params.n)])
        self.assertEqual(a.new_to, [B_PUBLIC])
        (a_busy, p_busy, _), _ = both(BUSY, SEQ)
        (a_idle, p_idle, _), _ = both(SEQ, SEQ)
        self.assertGreater(p_busy.params.n, p_idle.params.n)
        self.assertEqual(a_busy.new_sockets, p_busy.params.n)

    def test_cone_against_sequential(self):
        """The sequential side opens the window, whoever asked."""
        (a, pa, _), (b, pb, _) = both(CONE, SEQ)
        self.assertEqual(pa.strategy, "predict")
        n = pa.params.n
        self.assertEqual((a.from_fresh, a.new_sockets), ([(B_PUBLIC[0], B_PUBLIC[1] + n)], 0))
        self.assertEqual((b.new_sockets, b.new_to), (n, [A_PUBLIC]))

    def test_birthday(self):
        for a_nat, b_nat in ((RANDOM, CONE), (CONE, RANDOM)):
            (a, pa, ta), (b, pb, tb) = both(a_nat, b_nat)
            self.assertEqual(pa.strategy, "birthday")
            rnd, easy = (a, b) if a_nat is RANDOM else (b, a)
            self.assertEqual(rnd.new_sockets, 256)
            # The easy side sprays the random side's public IP.
            self.assertEqual(easy.spray_ip, (A_PUBLIC if rnd is a else B_PUBLIC)[0])
            self.assertGreaterEqual(easy.spray_rate, 500)
            self.assertGreater(ta, 1)

    def test_public_against_random_direct(self):
        (a, pa, _), (b, pb, _) = both(PUBLIC, RANDOM)
        self.assertEqual(pa.strategy, "direct")
        self.assertEqual(b.from_fresh, [A_PUBLIC])

    def test_relay_pairs(self):
        for pair in ((RANDOM, RANDOM), (RANDOM, SEQ), (SEQ, RANDOM)):
            (a, pa, _), (b, pb, _) = both(*pair)
            self.assertEqual(pa.strategy, "relay", pair)
            self.assertTrue(a.idle and b.idle)


MAPPED = ("198.51.100.9", 41000)
A6, B6 = ("2001:2:0:1::10", 40000), ("2001:2:0:2::10", 50000)


class CandidateTests(SynchronousTestCase):
    """L{with_candidates}: the candidates' part of a round, the same on both sides."""

    def test_none_changes_nothing(self):
        for a_nat, b_nat in [(CONE, CONE), (RANDOM, RANDOM), (SEQ, RANDOM)]:
            (actions, plan, deadline), _ = both(a_nat, b_nat)
            self.assertEqual(with_candidates(actions, deadline, [], []), (actions, deadline))
            # IPv6 on one side only: nothing to pair it with.
            self.assertEqual(with_candidates(actions, deadline, [A6], []), (actions, deadline))
            self.assertEqual(with_candidates(actions, deadline, [], [B6]), (actions, deadline))

    def test_mapped_makes_random_pairs_punch(self):
        (a, _, a_deadline), (b, _, b_deadline) = both(RANDOM, RANDOM)
        self.assertTrue(a.idle and b.idle)  # the relay, without candidates
        # A offered its port mapping: A waits for probes on it, B probes it.
        a, a_deadline = with_candidates(a, a_deadline, [MAPPED], [])
        b, b_deadline = with_candidates(b, b_deadline, [], [MAPPED])
        self.assertTrue(a.take_mapped)
        self.assertEqual((a.to_candidates, a.to_candidates6), ([], []))
        self.assertEqual((b.to_candidates, b.take_mapped), ([MAPPED], False))
        self.assertEqual(a_deadline, b_deadline)
        self.assertEqual(a_deadline, CANDIDATE_ROUND)
        self.assertFalse(a.idle or b.idle)

    def test_ipv6_both_sides_probe(self):
        (a, _, a_deadline), (b, _, b_deadline) = both(CONE, CONE)
        a2, a_deadline2 = with_candidates(a, a_deadline, [A6], [B6, MAPPED])
        b2, b_deadline2 = with_candidates(b, b_deadline, [B6, MAPPED], [A6])
        self.assertEqual((a2.to_candidates6, a2.to_candidates, a2.take_mapped),
                         ([B6], [MAPPED], False))
        self.assertEqual((b2.to_candidates6, b2.to_candidates, b2.take_mapped), ([A6], [], True))
        # The plan's own probes and round stay as they were.
        self.assertEqual((a2.from_fresh, a_deadline2), (a.from_fresh, a_deadline))
        self.assertEqual((b2.from_fresh, b_deadline2), (b.from_fresh, b_deadline))
