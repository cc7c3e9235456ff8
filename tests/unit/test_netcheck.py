"""
``p2pnat netcheck``'s verdicts and report (:mod:`p2pnat.protocol.netcheck`):
tables of cases, no sockets, no clock.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import netcheck as V
from p2pnat.protocol.nat import AD, APD, EI, NONE, UNKNOWN, NatBehaviour, plan
from p2pnat.protocol.p2p import NatInfo
from p2pnat.protocol.strategy import PREDICTION_DELAY

PUBLIC = ("198.18.2.1", 20000)
LOCAL = ("10.0.1.2", 40000)

#: A behaviour of each kind, as discovery classifies the lab's routers.
BEHAVIOURS = {
    "public": NatBehaviour(NONE, NONE, "preserving", public=LOCAL, local=LOCAL),
    "cone": NatBehaviour(EI, APD, "preserving", public=PUBLIC, local=LOCAL),
    "sequential": NatBehaviour(APD, APD, "sequential", 1, 0.0, public=PUBLIC, local=LOCAL),
    "random": NatBehaviour(APD, APD, "random", public=PUBLIC, local=LOCAL),
}


def server(family="ipv4", public=PUBLIC, rtts=(0.01,), role="lobby", name="lobby:3478",
           address=("198.18.1.1", 3478)):
    return V.ServerResult(role, name, address, family, public, tuple(rtts),
                          1 if public else 0, 1)


class KindTests(SynchronousTestCase):
    def test_every_kind(self):
        cases = [
            ((UNKNOWN, UNKNOWN, UNKNOWN), "unknown"),
            ((UNKNOWN, APD, "random"), "unknown"),
            ((NONE, NONE, "preserving"), "no-nat"),
            ((NONE, UNKNOWN, "preserving"), "no-nat"),
            ((NONE, APD, "preserving"), "firewall"),
            ((NONE, AD, "preserving"), "firewall"),
            ((EI, APD, "preserving"), "cone"),
            ((EI, EI, "random"), "cone"),
            ((APD, APD, "preserving"), "symmetric-preserving"),
            ((APD, APD, "sequential"), "symmetric-sequential"),
            ((AD, AD, "sequential"), "symmetric-sequential"),
            ((APD, APD, "random"), "symmetric-random"),
            ((APD, APD, UNKNOWN), "symmetric"),
        ]
        for (mapping, filtering, allocation), want in cases:
            kind = V.nat_kind(NatBehaviour(mapping, filtering, allocation))
            self.assertEqual(kind, want, (mapping, filtering, allocation))
            self.assertIn(kind, V.KINDS)
        self.assertEqual({want for _, want in cases}, set(V.KINDS))


class HairpinTests(SynchronousTestCase):
    def test_verdicts(self):
        self.assertIs(V.hairpin_verdict(PUBLIC, True), True)
        self.assertIs(V.hairpin_verdict(PUBLIC, False), False)
        self.assertIsNone(V.hairpin_verdict(None, False))
        self.assertIsNone(V.hairpin_verdict(PUBLIC, None))


class LifetimeTests(SynchronousTestCase):
    seq = BEHAVIOURS["sequential"]

    def results(self, lifetime, intervals=(1.0, 2.0, 4.0, 8.0, 15.0)):
        a, b = ("198.18.2.1", 20000), ("198.18.2.1", 20007)
        return [(t, a, a if t < lifetime else b) for t in intervals]

    def test_intervals_bounded(self):
        self.assertEqual(V.lifetime_intervals(10), (1.0, 2.0, 4.0, 8.0))
        self.assertEqual(V.lifetime_intervals(0.5), ())
        self.assertEqual(V.lifetime_intervals(1000), V.LIFETIME_INTERVALS)

    def test_bracketed(self):
        lt = V.lifetime_verdict(self.results(10), self.seq)
        self.assertEqual((lt.at_least, lt.at_most, lt.note), (8.0, 15.0, ""))
        self.assertEqual(lt.tested, ((1.0, True), (2.0, True), (4.0, True), (8.0, True),
                                     (15.0, False)))

    def test_all_kept(self):
        lt = V.lifetime_verdict(self.results(100), self.seq)
        self.assertEqual((lt.at_least, lt.at_most), (15.0, None))
        self.assertIn("every interval tested (up to 15 s) kept its mapping", lt.note)

    def test_shortest_lost(self):
        lt = V.lifetime_verdict(self.results(0.5), self.seq)
        self.assertEqual((lt.at_least, lt.at_most), (None, 1.0))

    def test_not_a_plain_timer(self):
        results = self.results(3)
        results[-1] = (15.0, results[0][1], results[0][1])  # the longest kept after all
        lt = V.lifetime_verdict(results, self.seq)
        self.assertEqual((lt.at_least, lt.at_most), (2.0, 4.0))
        self.assertIn("not a plain one", lt.note)

    def test_unanswered_intervals_ignored(self):
        results = self.results(10) + [(30.0, None, None), (60.0, PUBLIC, None)]
        lt = V.lifetime_verdict(results, self.seq)
        self.assertEqual((lt.at_least, lt.at_most), (8.0, 15.0))
        lt = V.lifetime_verdict([(1.0, None, None)], self.seq)
        self.assertEqual((lt.at_least, lt.at_most, lt.tested), (None, None, ()))
        self.assertIn("no interval could be tested", lt.note)

    def test_untestable(self):
        for name in ("public", "cone"):
            b = BEHAVIOURS[name]
            self.assertTrue(V.lifetime_untestable(b), name)
            lt = V.lifetime_verdict(self.results(10), b)
            self.assertEqual((lt.at_least, lt.at_most, lt.tested), (None, None, ()), name)
            self.assertEqual(lt.note, V.lifetime_untestable(b))
        self.assertEqual(V.lifetime_untestable(self.seq), "")
        self.assertEqual(V.lifetime_untestable(BEHAVIOURS["random"]), "")

    def test_json(self):
        lt = V.lifetime_verdict(self.results(10, (4.0, 15.0)), self.seq)
        self.assertEqual(lt.to_json(), {"at_least": 4.0, "at_most": 15.0,
                                        "tested": [[4.0, True], [15.0, False]], "note": ""})


class LatencyTests(SynchronousTestCase):
    def test_clean_rtts(self):
        """Karn's rule: an answer after a retransmission does not count."""
        self.assertEqual(V.clean_rtts([0.01, None, 0.3, 0.1], 0.25), [0.01, 0.1])

    def test_median_ms(self):
        self.assertEqual(V.latency([0.003, 0.001, 0.0021]), 2.1)
        self.assertEqual(V.latency([0.001, 0.003]), 2.0)
        self.assertIsNone(V.latency([]))
        self.assertIsNone(V.latency([None]))


class FamilyTests(SynchronousTestCase):
    def test_none_configured(self):
        f = V.family_verdict("ipv6", [server()])
        self.assertEqual(f.to_json(), {"reachable": None, "public": None, "servers": 0,
                                       "latency_ms": None})

    def test_reachable(self):
        v6 = ("2001:db8::2", 40000)
        results = [server("ipv6", None, (), address=("2001:db8::1", 3478)),
                   server("ipv6", v6, (0.02, 0.03), address=("2001:db8::1", 3479)),
                   server("ipv6", v6, (0.005,), address=("2001:db8::3", 3478)),
                   server()]
        f = V.family_verdict("ipv6", results)
        self.assertEqual(f.to_json(), {"reachable": True, "public": "[2001:db8::2]:40000",
                                       "servers": 3, "latency_ms": 5.0})

    def test_unreachable(self):
        f = V.family_verdict("ipv4", [server(public=None, rtts=())])
        self.assertEqual((f.reachable, f.public, f.servers), (False, None, 1))


class PathTests(SynchronousTestCase):
    def test_same_plan_as_the_client(self):
        """Each peer kind's strategy is the planner's, with the client's parameters."""
        for name, b in BEHAVIOURS.items():
            mine = NatInfo(b.mapping, b.filtering, b.allocation, b.step, b.rate or 0.0)
            for p in V.expected_paths(b):
                if p.peer == "same-nat":
                    want = plan(mine, mine, True, initiator=True, delay=PREDICTION_DELAY)
                else:
                    want = plan(mine, V.PEERS[p.peer][1], False, initiator=True,
                                delay=PREDICTION_DELAY)
                self.assertEqual((p.strategy, p.reason), (want.strategy, want.reason),
                                 (name, p.peer))

    def test_the_lab_matrix(self):
        """The verdicts the README's matrix shows, peer by peer."""
        want = {
            "public": {"no-nat": "direct", "cone": "direct", "symmetric-sequential": "direct",
                       "symmetric-random": "direct"},
            "cone": {"no-nat": "direct", "cone": "simultaneous-open",
                     "symmetric-sequential": "predict", "symmetric-random": "birthday",
                     "same-nat": "direct"},
            "sequential": {"no-nat": "direct", "cone": "predict",
                           "symmetric-sequential": "predict", "symmetric-random": "relay",
                           "same-nat": "direct"},
            "random": {"no-nat": "direct", "cone": "birthday", "symmetric-sequential": "relay",
                       "symmetric-random": "relay", "same-nat": "direct"},
        }
        for name, b in BEHAVIOURS.items():
            got = {p.peer: p.strategy for p in V.expected_paths(b)}
            self.assertEqual(got, want[name], name)
            for p in V.expected_paths(b):
                self.assertEqual(p.direct, p.strategy != "relay")

    def test_words(self):
        p = {x.peer: x for x in V.expected_paths(BEHAVIOURS["random"])}
        self.assertEqual(p["symmetric-random"].words,
                         "a peer behind a symmetric NAT with random ports: relayed through the "
                         "lobby; both sides' ports are unpredictable: no direct method")
        self.assertTrue(p["cone"].words.startswith(
            "a peer behind a cone NAT (most home routers): direct, by a birthday punch; "))
        j = p["cone"].to_json()
        self.assertEqual(set(j), {"peer", "description", "strategy", "direct", "reason", "words"})


class ReportTests(SynchronousTestCase):
    def report(self, name="cone", **kw):
        kw.setdefault("servers", (server(), server("ipv6", None, (),
                                                   address=("2001:db8::1", 3478))))
        return V.Report(BEHAVIOURS[name] if name else None, **kw)

    def test_json_fields(self):
        """Every field docs/netcheck.rst documents, and no other."""
        r = self.report(hairpin=False, portmap={"pcp": False, "nat-pmp": True, "upnp": False,
                                                "external": "198.18.2.1"},
                        elapsed=1.23456, budget=2.5, notes=("a note",))
        j = json.loads(json.dumps(r.to_json()))
        self.assertEqual(set(j), {"version", "summary", "nat", "hairpin", "lifetime", "ipv4",
                                  "ipv6", "portmap", "portmap_note", "servers", "paths",
                                  "elapsed", "budget", "notes"})
        self.assertEqual(set(j["nat"]), {"kind", "mapping", "filtering", "allocation", "step",
                                         "rate", "public", "local", "notes"})
        self.assertEqual(set(j["servers"][0]), {"role", "name", "address", "family",
                                                "reachable", "public", "latency_ms",
                                                "answered", "asked", "error"})
        self.assertEqual(j["nat"]["kind"], "cone")
        self.assertEqual(j["nat"]["public"], "198.18.2.1:20000")
        self.assertIs(j["hairpin"], False)
        self.assertIsNone(j["lifetime"])
        self.assertEqual(j["ipv4"]["reachable"], True)
        self.assertEqual(j["ipv6"]["reachable"], False)
        self.assertEqual(j["portmap"]["nat-pmp"], True)
        self.assertEqual((j["elapsed"], j["budget"], j["notes"]), (1.235, 2.5, ["a note"]))
        self.assertEqual(len(j["paths"]), 5)

    def test_summary(self):
        self.assertEqual(self.report("public").summary(),
                         "No NAT: this host's own address is its public one, nothing filtered;"
                         " direct paths with every kind of peer.")
        self.assertEqual(self.report("sequential").summary(),
                         "A symmetric NAT handing out ports in sequence; relayed paths with peers"
                         " behind a symmetric NAT with random ports, direct with the others.")

    def test_nothing_answered(self):
        r = self.report(None, servers=(server(public=None, rtts=()),))
        self.assertFalse(r.answered)
        self.assertEqual(r.kind, "unknown")
        self.assertEqual(r.summary(), "No server answered: nothing could be measured.")
        self.assertEqual(r.to_json()["paths"], [])
        self.assertNotIn("Paths", r.to_text())

    def test_text(self):
        lifetime = V.Lifetime(8.0, 15.0, ((8.0, True), (15.0, False)))
        r = self.report("sequential", hairpin=True, lifetime=lifetime,
                        portmap={"pcp": True, "nat-pmp": True, "upnp": False,
                                 "external": "198.18.2.1"}, elapsed=1.5)
        text = r.to_text()
        for line in ("NAT:           symmetric-sequential (a symmetric NAT handing out ports in "
                     "sequence)",
                     "  ports:       sequential, step 1, 0 ports/s taken by others",
                     "  public:      198.18.2.1:20000 (local 10.0.1.2:40000)",
                     "  hairpinning: yes",
                     "  lifetime:    between 8 s and 15 s",
                     "IPV4:          yes, as 198.18.2.1:20000",
                     "IPV6:          no (none of 1 server addresses answered)",
                     "Port mapping:  PCP, NAT-PMP (external address 198.18.2.1)",
                     "  lobby lobby:3478 (198.18.1.1:3478): 10 ms",
                     "(1.50 s)"):
            self.assertIn(line + "\n" if line != "(1.50 s)" else line, text)
        self.assertIn("relayed through the lobby", text)
        untested = self.report("cone", portmap_note="turned off by --no-portmap").to_text()
        self.assertIn("Port mapping:  not tested (turned off by --no-portmap)", untested)
        self.assertIn("IPV4:          yes", untested)
        self.assertIn("  hairpinning: not tested", untested)
        self.assertNotIn("lifetime", untested)


class MappingHelpsTests(SynchronousTestCase):
    """When a port mapping the gateway offers makes a path direct (as p2pnat peer uses one)."""

    OFFERED = {"pcp": True, "nat-pmp": False, "upnp": False, "external": None}

    def test_offered_behind_a_nat(self):
        self.assertTrue(V.mapping_helps(BEHAVIOURS["random"], self.OFFERED))
        self.assertTrue(V.mapping_helps(BEHAVIOURS["random"], dict(self.OFFERED, external=PUBLIC[0])))

    def test_not_offered(self):
        self.assertFalse(V.mapping_helps(BEHAVIOURS["random"], dict(self.OFFERED, pcp=False)))
        self.assertFalse(V.mapping_helps(BEHAVIOURS["random"], None))

    def test_no_nat_or_unknown(self):
        self.assertFalse(V.mapping_helps(BEHAVIOURS["public"], self.OFFERED))
        self.assertFalse(V.mapping_helps(None, self.OFFERED))

    def test_gateway_behind_another_nat(self):
        """A home router behind a carrier-grade NAT maps a port of an address nobody reaches."""
        self.assertFalse(V.mapping_helps(BEHAVIOURS["random"], dict(self.OFFERED, external="100.64.0.7")))
