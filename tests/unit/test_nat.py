"""
NAT behaviour classification, port prediction and strategy choice
(:mod:`p2pnat.protocol.nat`): tables of cases, no sockets.
"""

import itertools
import json
import math
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import nat
from p2pnat.protocol.nat import (
    AD,
    APD,
    EI,
    NONE,
    UNKNOWN,
    Birthday,
    Direct,
    NatBehaviour,
    Observations,
    Predict,
    Probe,
    Role,
    classify,
    plan,
)

A1, A2 = "198.18.1.1", "198.18.1.2"
ONE_IP = ((A1, 3478), (A1, 3479))
TWO_IPS = ((A1, 3478), (A2, 3478), (A2, 3479), (A1, 3479))
LAN = "10.0.1.2"
WAN = "198.18.2.1"


def observe(main, fresh=(), changes=None, servers=ONE_IP, wan=WAN, filt=None, main_local=40000):
    """
    Observations as a discovery run makes them.

    - ``main``: the main socket's mapped port at each of ``servers`` (None:
      no answer), sent at t = 0, 1, 2... ms;
    - ``fresh``: ``(sent, local port, mapped port or None)`` for each fresh
      socket, one probe each to the primary;
    - ``filt``: ``(sent, local port, mapped port)`` of the filtering socket,
      whose change-request probes come out as ``changes``: {change: "answered"
      | "silent" | "refused"}.
    """
    probes = []
    local = (LAN if wan != LAN else wan, main_local)
    for i, (server, port) in enumerate(zip(servers, main)):
        probes.append(Probe(0, local, server, i * 0.001, (wan, port) if port else None))
    sock = 1
    for sent, lport, mport in fresh:
        probes.append(Probe(sock, (local[0], lport), servers[0], sent,
                            (wan, mport) if mport else None))
        sock += 1
    if filt is not None:
        sent, lport, mport = filt
        flocal = (local[0], lport)
        probes.append(Probe(sock, flocal, servers[0], sent, (wan, mport)))
        for change, state in (changes or {}).items():
            probes.append(Probe(sock, flocal, servers[0], sent + 0.001,
                                (wan, mport) if state == "answered" else None, change,
                                refused=state == "refused"))
    probes.sort(key=lambda p: p.sent)
    return Observations(tuple(servers), tuple(probes))


def burst(t, locals_, ports, dt=0.001):
    return [(t + i * dt, lp, mp) for i, (lp, mp) in enumerate(zip(locals_, ports))]


LOCALS = [51000 + 7 * i for i in range(8)]
ONE_IP_APD = {"port": "silent", "ip+port": "refused", "ip": "refused"}
ONE_IP_OPEN = {"port": "answered", "ip+port": "refused", "ip": "refused"}
TWO_IP_APD = {"port": "silent", "ip+port": "silent", "ip": "silent"}
TWO_IP_AD = {"port": "answered", "ip+port": "silent", "ip": "silent"}
TWO_IP_EI = {"port": "answered", "ip+port": "answered", "ip": "answered"}


def preserved(t):
    return burst(t, LOCALS[:4], LOCALS[:4])


class ClassifyTests(SynchronousTestCase):
    #: name, observations, (mapping, filtering, allocation, step)
    CASES = [
        ("public, two IPs", observe([40000] * 4, preserved(0.01), TWO_IP_EI, TWO_IPS, wan=LAN,
                                    filt=(0.02, 52000, 52000)),
         (NONE, NONE, "preserving", 0)),
        ("public with a firewall", observe([40000] * 4, preserved(0.01), TWO_IP_APD, TWO_IPS,
                                           wan=LAN, filt=(0.02, 52000, 52000)),
         (NONE, APD, "preserving", 0)),
        ("cone (Linux masquerade), one IP", observe([40000, 40000], preserved(0.01), ONE_IP_APD,
                                                    filt=(0.02, 52000, 52000)),
         (EI, APD, "preserving", 0)),
        ("cone, two IPs", observe([40000] * 4, preserved(0.01), TWO_IP_APD, TWO_IPS,
                                  filt=(0.02, 52000, 52000)),
         (EI, APD, "preserving", 0)),
        ("full cone", observe([40000] * 4, preserved(0.01), TWO_IP_EI, TWO_IPS,
                              filt=(0.02, 52000, 52000)),
         (EI, EI, "preserving", 0)),
        ("restricted cone", observe([40000] * 4, preserved(0.01), TWO_IP_AD, TWO_IPS,
                                    filt=(0.02, 52000, 52000)),
         (EI, AD, "preserving", 0)),
        ("restricted cone, one IP", observe([40000] * 2, preserved(0.01), ONE_IP_OPEN,
                                            filt=(0.02, 52000, 52000)),
         (EI, AD, "preserving", 0)),
        ("cone allocating sequentially",
         observe([30000, 30000], burst(0.01, LOCALS, range(30001, 30009)), ONE_IP_APD,
                 filt=(0.02, 52000, 30009)),
         (EI, APD, "sequential", 1)),
        ("symmetric sequential (the seed's router)",
         observe([20000, 20001], burst(0.01, LOCALS, range(20002, 20010)), ONE_IP_APD,
                 filt=(0.02, 52000, 20010)),
         (APD, APD, "sequential", 1)),
        ("symmetric sequential, step 3, two IPs",
         observe([30000, 30003, 30006, 30009], burst(0.01, LOCALS, range(30012, 30036, 3)),
                 TWO_IP_APD, TWO_IPS, filt=(0.02, 52000, 30036)),
         (APD, APD, "sequential", 3)),
        ("address-dependent mapping",
         observe([20000, 20001, 20001, 20000], burst(0.01, LOCALS, range(20002, 20010)),
                 TWO_IP_AD, TWO_IPS, filt=(0.02, 52000, 20010)),
         (AD, AD, "sequential", 1)),
        ("symmetric random", observe([43117, 2291], burst(0.01, LOCALS, [61234, 17003, 33333, 8121,
                                                                       50002, 1200, 39999, 24680]),
                                     ONE_IP_APD, filt=(0.02, 52000, 11111)),
         (APD, APD, "random", 0)),
        ("random, by chance two close ports",
         observe([43117, 43120], burst(0.01, LOCALS, [61234, 17003, 33333, 8121, 50002, 1200,
                                                     39999, 24680]), ONE_IP_APD),
         (APD, UNKNOWN, "random", 0)),
        ("sequential wrapping around its range",
         observe([21996, 21997], burst(0.01, LOCALS, [21998, 21999, 20000, 20001, 20002, 20003,
                                                     20004, 20005]), ONE_IP_APD),
         (APD, UNKNOWN, "sequential", 1)),
        ("preserving except one collision",
         observe([40000, 40000], burst(0.01, LOCALS[:5], LOCALS[:4] + [1025]), ONE_IP_APD,
                 filt=(0.02, 52000, 52000)),
         (EI, APD, "preserving", 0)),
    ]

    def test_table(self):
        for name, obs, want in self.CASES:
            b = classify(obs)
            self.assertEqual((b.mapping, b.filtering, b.allocation, b.step), want, name)

    def test_public_and_local(self):
        b = classify(self.CASES[2][1])
        self.assertEqual((b.public, b.local), ((WAN, 40000), (LAN, 40000)))
        self.assertTrue(b.nat)
        b = classify(self.CASES[0][1])
        self.assertEqual(b.public, b.local)
        self.assertFalse(b.nat)
        self.assertIsNone(classify(Observations(ONE_IP)).nat)

    def test_notes_for_what_one_ip_cannot_tell(self):
        b = classify(self.CASES[2][1])
        self.assertTrue(any("address-dependent mapping would look" in n for n in b.notes), b.notes)
        b = classify(self.CASES[6][1])
        self.assertTrue(any("endpoint-independent filtering would look" in n for n in b.notes))
        b = classify(self.CASES[3][1])
        self.assertEqual(b.notes, ())

    def test_no_answer(self):
        b = classify(observe([None, None], burst(0.01, LOCALS[:3], [None] * 3)))
        self.assertEqual((b.mapping, b.filtering, b.allocation, b.public), (UNKNOWN,) * 3 + (None,))
        self.assertEqual(b.notes, ("no answer from the lobby",))

    def test_one_server(self):
        """With one lobby address the mapping is not tested, allocation still is."""
        b = classify(observe([20000], burst(0.01, LOCALS, range(20001, 20009)), servers=ONE_IP[:1]))
        self.assertEqual((b.mapping, b.allocation, b.step), (UNKNOWN, "sequential", 1))
        self.assertIn("only one lobby address answered: mapping not tested", b.notes)

    def test_too_few_mappings(self):
        b = classify(observe([20000, 20001]))
        self.assertEqual(b.allocation, UNKNOWN)

    def test_filtering_table(self):
        """Change-request results -> filtering, behind a NAT."""
        table = [
            (TWO_IP_EI, EI),
            ({"port": "answered", "ip+port": "answered"}, EI),
            ({"ip": "answered", "port": "answered", "ip+port": "silent"}, EI),
            (TWO_IP_AD, AD),
            (TWO_IP_APD, APD),
            (ONE_IP_OPEN, AD),
            (ONE_IP_APD, APD),
            ({"port": "refused", "ip+port": "silent"}, APD),
            ({"port": "refused", "ip+port": "refused", "ip": "refused"}, UNKNOWN),
            ({}, UNKNOWN),
        ]
        for changes, want in table:
            obs = observe([40000] * 2, preserved(0.01), changes, filt=(0.02, 52000, 52000))
            self.assertEqual(classify(obs).filtering, want, changes)

    def test_rate(self):
        """
        Two bursts half a second apart with ports taken in between: the
        rate is what others took, not counting our own mappings (the
        filtering socket's included).
        """
        for rate, step in ((0, 1), (20, 1), (40, 1), (20, 3)):
            others = int(rate * 0.5)
            first = burst(0.010, LOCALS[:4], [20000 + step * (2 + i) for i in range(4)])
            filt_port = 20000 + step * 6
            base = filt_port + step * (1 + others)
            second = burst(0.510, LOCALS[4:], [base + step * i for i in range(4)])
            obs = observe([20000, 20000 + step], first + second, ONE_IP_APD,
                          filt=(0.02, 52000, filt_port))
            b = classify(obs)
            self.assertEqual((b.allocation, b.step), ("sequential", step))
            # Over the whole run (0.513 s), not only the pause.
            self.assertLessEqual(abs(b.rate - others / 0.5), 0.1 + rate * 0.05,
                                 (rate, step, b.rate))

    def test_rate_lost_flow(self):
        """A fresh socket that got no answer still took a port: not counted as others'."""
        fresh = burst(0.01, LOCALS[:5], [20002, 20003, None, 20005, 20006])
        b = classify(observe([20000, 20001], fresh, ONE_IP_APD))
        self.assertEqual((b.allocation, b.step, b.rate), ("sequential", 1, 0.0))

    def test_rate_only_for_sequential(self):
        for name, obs, want in self.CASES:
            b = classify(obs)
            if b.allocation != "sequential":
                self.assertIsNone(b.rate, name)

    def test_wildcard_local(self):
        obs = Observations(ONE_IP, (Probe(0, ("0.0.0.0", 40000), ONE_IP[0], 0.0, (WAN, 40000)),
                                     Probe(0, ("0.0.0.0", 40000), ONE_IP[1], 0.1, (WAN, 40000))))
        b = classify(obs)
        self.assertEqual(b.mapping, NONE)
        self.assertTrue(any("wildcard" in n for n in b.notes))

    def test_json(self):
        for _, obs, _ in self.CASES:
            self.assertEqual(Observations.from_json(json.loads(json.dumps(obs.to_json()))), obs)
            b = classify(obs)
            self.assertEqual(NatBehaviour.from_json(json.loads(json.dumps(b.to_json()))), b)
        self.assertEqual(classify(self.CASES[2][1]).to_json()["public"], f"{WAN}:40000")

    def test_values_checked(self):
        self.assertRaises(ValueError, NatBehaviour, mapping="symmetric")
        self.assertRaises(ValueError, NatBehaviour, filtering="cone")
        self.assertRaises(ValueError, NatBehaviour, allocation="linear")
        self.assertEqual(nat.MAPPINGS, ("unknown", "none", EI, AD, APD))


class PredictionTests(SynchronousTestCase):
    def test_window_size(self):
        # rate, delay, n
        table = [(0, 1.0, 4), (None, 1.0, 4), (1, 1.0, 4), (5, 0.5, 6), (10, 1.0, 21),
                 (20, 1.0, 41), (20, 0.5, 21), (31.5, 1.0, 64), (100, 1.0, 64), (-3, 1.0, 4)]
        for rate, delay, n in table:
            self.assertEqual(nat.window_size(rate, delay), n, (rate, delay))
        self.assertEqual(nat.window_size(10, 1.0, margin=1.0), 11)
        self.assertEqual(nat.window_size(0, 1.0, low=1), 1)
        self.assertEqual(nat.window_size(1000, 1.0, high=200), 200)

    def test_hit_probability(self):
        self.assertEqual(nat.window_hit_probability(0, 1.0, 1), 1.0)
        self.assertEqual(nat.window_hit_probability(10, 1.0, 0), 0.0)
        # Poisson(1) <= 0: e^-1
        self.assertAlmostEqual(nat.window_hit_probability(1, 1.0, 1), math.exp(-1))
        self.assertAlmostEqual(nat.window_hit_probability(2, 1.0, 2), 3 * math.exp(-2))
        # The default window is comfortably enough.
        for rate in (1, 5, 10, 20, 30):
            n = nat.window_size(rate, 1.0)
            self.assertGreater(nat.window_hit_probability(rate, 1.0, n), 0.98, rate)
        # Beyond the bound it is not.
        self.assertLess(nat.window_hit_probability(100, 1.0, nat.window_size(100, 1.0)), 0.01)

    def test_predict_ports(self):
        self.assertEqual(nat.predict_ports(20000, 1, 4), [20001, 20002, 20003, 20004])
        self.assertEqual(nat.predict_ports(30000, 3, 3, start=2), [30006, 30009, 30012])
        self.assertEqual(nat.predict_ports(65534, 1, 3), [65535, 1024, 1025])
        self.assertEqual(nat.predict_ports(20000, 1, 0), [])

    def test_birthday_numbers(self):
        # 256 sockets in 64512 ports: ~1740 probes for 99.9 %.
        self.assertEqual(nat.birthday_probes(256), 1738)
        self.assertAlmostEqual(nat.birthday_hit_probability(256, 1738), 0.999, places=3)
        self.assertAlmostEqual(nat.birthday_hit_probability(256, 1000), 0.981, places=3)
        self.assertEqual(nat.birthday_probes(64512), 1)
        self.assertEqual(nat.birthday_hit_probability(256, 0), 0.0)


def behaviour(kind, rate=0.0, step=1, public=None):
    """A NatBehaviour of a named kind."""
    kinds = {
        "public": (NONE, NONE, "preserving"),
        "firewall": (NONE, APD, "preserving"),
        "full-cone": (EI, EI, "preserving"),
        "restricted": (EI, AD, "preserving"),
        "cone": (EI, APD, "preserving"),
        "cone-unknown": (EI, UNKNOWN, "preserving"),
        "symmetric-preserving": (APD, APD, "preserving"),
        "sequential": (APD, APD, "sequential"),
        "ad-sequential": (AD, APD, "sequential"),
        "random": (APD, APD, "random"),
        "unknown": (UNKNOWN, UNKNOWN, UNKNOWN),
    }
    mapping, filtering, allocation = kinds[kind]
    return NatBehaviour(mapping, filtering, allocation,
                        step=step if allocation == "sequential" else 0,
                        rate=rate if allocation == "sequential" else None, public=public)


KINDS = ["public", "firewall", "full-cone", "restricted", "cone", "cone-unknown",
         "symmetric-preserving", "sequential", "ad-sequential", "random", "unknown"]


class PlanTests(SynchronousTestCase):
    #: mine, peer -> strategy, mine's action, peer's action, mine low-TTL, peer low-TTL
    #: (this side is the one that asked: the seed's A)
    TABLE = [
        ("public", "public", "direct", "send", "answer", False, False),
        ("public", "random", "direct", "answer", "send", False, False),
        ("random", "public", "direct", "send", "answer", False, False),
        ("full-cone", "random", "direct", "answer", "send", False, False),
        ("sequential", "full-cone", "direct", "send", "answer", False, False),
        ("public", "firewall", "direct", "answer", "send", False, False),
        ("restricted", "random", "direct", "open-ip", "send", True, False),
        ("random", "restricted", "direct", "send", "open-ip", False, True),
        ("restricted", "restricted", "direct", "send", "open-ip", False, True),
        ("restricted", "full-cone", "direct", "send", "answer", False, False),
        ("cone", "cone", "simultaneous-open", "send", "send", True, True),
        ("cone", "firewall", "simultaneous-open", "send", "send", True, True),
        ("cone-unknown", "cone", "simultaneous-open", "send", "send", True, True),
        ("symmetric-preserving", "cone", "simultaneous-open", "send", "send", True, True),
        ("cone", "sequential", "predict", "one-packet", "window", True, False),
        ("sequential", "cone", "predict", "window", "one-packet", False, True),
        ("sequential", "sequential", "predict", "window", "one-packet", False, True),
        ("ad-sequential", "sequential", "predict", "window", "one-packet", False, True),
        ("firewall", "sequential", "predict", "one-packet", "window", True, False),
        ("random", "cone", "birthday", "sockets", "spray", True, False),
        ("cone", "random", "birthday", "spray", "sockets", False, True),
        ("firewall", "random", "birthday", "spray", "sockets", False, True),
        ("unknown", "cone", "birthday", "sockets", "spray", True, False),
        ("random", "random", "relay", "relay", "relay", False, False),
        ("random", "sequential", "relay", "relay", "relay", False, False),
        ("sequential", "random", "relay", "relay", "relay", False, False),
        ("unknown", "unknown", "relay", "relay", "relay", False, False),
        ("unknown", "sequential", "relay", "relay", "relay", False, False),
    ]

    def test_table(self):
        for mine, peer, strategy, a, b, low_a, low_b in self.TABLE:
            p = plan(behaviour(mine), behaviour(peer))
            self.assertEqual((p.strategy, p.mine, p.peer),
                             (strategy, Role(a, low_a), Role(b, low_b)), (mine, peer))
            self.assertIn(p.strategy, nat.STRATEGIES)
            self.assertIn(p.mine.action, nat.ACTIONS)

    def test_table_covers_every_pair(self):
        """Every pair of kinds has a plan, and every chain ends with the relay."""
        for mine, peer in itertools.product(KINDS, KINDS):
            for same in (False, True):
                chain = plan(behaviour(mine), behaviour(peer), same).chain()
                self.assertEqual(chain[-1].strategy, "relay", (mine, peer))
                self.assertTrue(all(p.reason for p in chain), (mine, peer))

    def test_both_sides_agree(self):
        """The peer, planning from its side, gets the same plan mirrored."""
        for mine, peer in itertools.product(KINDS, KINDS):
            for same in (False, True):
                a = plan(behaviour(mine, 10, public=(WAN, 20000)),
                         behaviour(peer, 3, public=("198.18.2.2", 30000)), same)
                b = plan(behaviour(peer, 3, public=("198.18.2.2", 30000)),
                         behaviour(mine, 10, public=(WAN, 20000)), same, initiator=False)
                self.assertEqual(b.mirrored(), a, (mine, peer, same))
                self.assertEqual(a.mirrored().mirrored(), a)

    def test_same_public_ip(self):
        p = plan(behaviour("sequential"), behaviour("cone"), same_public_ip=True)
        self.assertEqual((p.strategy, p.params, p.mine.action, p.peer.action),
                         ("direct", Direct("both", local=True), "send-local", "send-local"))
        self.assertEqual([q.strategy for q in p.chain()], ["direct", "predict", "relay"])

    def test_direct_initiator(self):
        self.assertEqual(plan(behaviour("public"), behaviour("public")).params, Direct("mine"))
        self.assertEqual(plan(behaviour("public"), behaviour("public"), initiator=False).params,
                         Direct("peer"))
        self.assertEqual(plan(behaviour("public"), behaviour("cone")).params, Direct("peer"))

    def test_predict_one_sequential(self):
        """The window is on the sequential side; n follows its rate."""
        for rate, n in ((0, 4), (5, 11), (20, 41), (50, 64), (100, 64)):
            p = plan(behaviour("sequential", rate, public=(WAN, 20000)),
                     behaviour("cone", public=("198.18.2.2", 40000)))
            self.assertEqual(p.params, Predict("mine", n, 1, 0, 20000, 40000,
                                               p.params.hit_probability))
            self.assertEqual(p.params.one_packet_target, 20000 + n)  # where the peer aims
            self.assertEqual(p.params.window_target, 40000)  # the cone's fixed mapping
            self.assertEqual(p.params.window_ports, list(range(20001, 20001 + n)))
            self.assertEqual(p.params.hit_probability,
                             round(nat.window_hit_probability(rate, 1.0, n), 4))
        self.assertLess(p.params.hit_probability, 0.01)  # 100/s is beyond the window's bound

    def test_predict_both_sequential(self):
        """As in the seed: the asker (A) opens the window, the other sends the one packet."""
        a = behaviour("sequential", 10, 1, public=(WAN, 20000))
        b = behaviour("sequential", 2, 3, public=("198.18.2.2", 30000))
        p = plan(a, b, delay=0.5)
        self.assertEqual(p.params.window_side, "mine")
        self.assertEqual((p.params.n, p.params.step, p.params.one_step), (11, 1, 3))
        self.assertEqual(p.params.one_packet_target, 20011)  # P+b+n
        self.assertEqual(p.params.one_packet_source, 30003)  # Q+d+step
        self.assertEqual(p.params.window_target, 30003)
        q = plan(b, a, initiator=False, delay=0.5)
        self.assertEqual(q.params.window_side, "peer")
        self.assertEqual(q.mine.action, "one-packet")
        # Rebased on the ports the lobby saw at request time.
        r = p.params.rebase(window_base=20100, one_base=30300)
        self.assertEqual((r.one_packet_target, r.window_target), (20111, 30303))
        self.assertEqual(p.params.rebase(one_base=1).window_base, 20000)

    def test_predict_without_addresses(self):
        """Behaviours without addresses (the wire's NatInfo) plan all the same."""
        info = SimpleNamespace(mapping=APD, filtering=APD, allocation="sequential", step=2,
                               rate=4.0)
        cone = SimpleNamespace(mapping=EI, filtering=APD, allocation="preserving", step=0,
                               rate=0.0)
        p = plan(cone, info)
        self.assertEqual((p.strategy, p.params.window_side, p.params.step), ("predict", "peer", 2))
        self.assertIsNone(p.params.one_packet_target)
        self.assertEqual(p.params.rebase(window_base=20000, one_base=7).one_packet_target,
                         20000 + 2 * 9)  # n = 1 + 4/s * 1 s * 2
        self.assertEqual(plan(info, SimpleNamespace(mapping=APD, filtering=APD,
                                                    allocation="random", step=0,
                                                    rate=0.0)).strategy, "relay")

    def test_birthday(self):
        p = plan(behaviour("random"), behaviour("cone", public=("198.18.2.2", 40000)))
        self.assertEqual(p.params, Birthday("mine", 256, 1000.0, 1.738, (1024, 65535),
                                            ("198.18.2.2", 40000), 0.999, 0.252))
        p = plan(behaviour("random"), behaviour("cone"), sockets=64, spray_rate=500, max_spray=2.0)
        self.assertEqual((p.params.duration, p.params.sockets), (2.0, 64))
        self.assertAlmostEqual(p.params.hit_probability, 0.6294, places=3)  # 1000 probes

    def test_relay_reasons(self):
        self.assertIn("both sides' ports are unpredictable",
                      plan(behaviour("random"), behaviour("random")).reason)
        self.assertIn("sequential NAT whose port moves",
                      plan(behaviour("random"), behaviour("sequential")).reason)
        self.assertIsNone(plan(behaviour("random"), behaviour("random")).fallback)

    def test_json(self):
        p = plan(behaviour("sequential"), behaviour("cone"), same_public_ip=True)
        d = json.loads(json.dumps(p.to_json()))
        self.assertEqual(d["strategy"], "direct")
        self.assertEqual(d["fallback"]["strategy"], "predict")
        self.assertEqual(d["fallback"]["params"]["window_side"], "mine")
        relay = {"action": "relay", "low_ttl": False}
        self.assertEqual(d["fallback"]["fallback"], {"strategy": "relay", "mine": relay,
                                                     "peer": relay,
                                                     "reason": "if the prediction fails"})

    def test_classified_lab_kinds(self):
        """What classify() gives for the lab's routers plans as expected."""
        cone = classify(ClassifyTests.CASES[3][1])
        seq = classify(ClassifyTests.CASES[8][1])
        rnd = classify(ClassifyTests.CASES[11][1])
        public = classify(ClassifyTests.CASES[0][1])
        self.assertEqual(plan(cone, cone).strategy, "simultaneous-open")
        self.assertEqual(plan(seq, cone).strategy, "predict")
        self.assertEqual(plan(seq, seq).strategy, "predict")
        self.assertEqual(plan(rnd, cone).strategy, "birthday")
        self.assertEqual(plan(rnd, seq).strategy, "relay")
        self.assertEqual(plan(rnd, public).strategy, "direct")
