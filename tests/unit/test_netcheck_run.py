"""
``p2pnat netcheck``'s measurements (:mod:`p2pnat.peer.netcheck`) on a
L{Clock}: a real lobby's sockets (siblings) and a relay socket on a
simulated network, hosts behind simulated NATs of every kind, a port
mapping probe double; and how the command picks its servers.
"""

import socket
from types import SimpleNamespace

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cli import CommandError
from p2pnat.cli.netcheck import plan_servers
from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol
from p2pnat.peer import netcheck as NC
from p2pnat.protocol.nat import APD, EI
from tests.support.udp import SimNat
from tests.unit.test_discovery import A1, FOUR_ORDER, WAN, Harness, NoHandler

RELAY = ("198.18.1.9", 7478)
V6 = ("2001:db8::1", 3478)
PORTMAP = {"pcp": False, "nat-pmp": True, "upnp": True, "external": WAN}


class ExpiringNat(SimNat):
    """A L{SimNat} whose mappings go after C{timeout} seconds without outbound traffic."""

    def __init__(self, clock, timeout, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.timeout, self.used = clock, timeout, {}

    def outbound(self, src, dst):
        key = self._key(src, dst)
        now = self.clock.seconds()
        if key in self.by_key and now - self.used[key] > self.timeout:
            port = self.by_key.pop(key)
            self.owner.pop(port, None)
            self.sent_to.pop(port, None)
        self.used[key] = now
        return super().outbound(src, dst)


class Run(Harness):
    """The discovery harness's lobby and NATs, plus a relay socket and a netcheck run."""

    def __init__(self, testcase, nat=None, **kwargs):
        super().__init__(testcase, nat, **kwargs)
        self.relay = ControlProtocol(NoHandler(), self.clock, Metrics("relay"), None,
                                     name="relay.udp")
        self.net.listen(RELAY[0], self.relay, RELAY[1])

    def listen(self, proto, server):
        if ":" in server[0]:
            raise OSError(101, "Network is unreachable")
        return self.net.listen(self.host, proto)

    def check(self, servers=None, discovery=FOUR_ORDER, limit=5.0, step=0.001, **options):
        if servers is None:
            servers = [NC.Server("lobby", f"{A1}:3478", [FOUR_ORDER[0], V6]),
                       NC.Server("relay", "relay:7478", [RELAY])]
        d = NC.NetCheck(self.clock, self.listen, servers, discovery, **options).run()
        return self.wait(d, step, limit)


class KindsTests(SynchronousTestCase):
    def test_every_kind(self):
        """The kind, hairpinning and reachability behind each simulated NAT."""
        cases = [
            ("public", lambda c: None, "no-nat", True),
            # The simulated NAT hairpins whenever its filter lets the packet
            # in: an endpoint-independent mapping keeps its port towards its
            # own address, so the filter has seen that destination.
            ("cone", lambda c: SimNat(WAN), "cone", True),
            ("full cone", lambda c: SimNat(WAN, filtering=EI), "cone", True),
            ("sequential", lambda c: SimNat(WAN, APD, APD, "sequential"),
             "symmetric-sequential", False),
            ("random", lambda c: SimNat(WAN, APD, APD, "random"), "symmetric-random", False),
        ]
        for name, make, kind, hairpin in cases:
            h = Run(self)
            h.nat = make(h.clock)
            if h.nat is not None:
                h.host = "10.0.1.2"
                h.net.nats[h.host] = h.nat
            r = h.check(budget=2.5)
            self.assertEqual(r.kind, kind, name)
            self.assertIs(r.hairpin, hairpin, name)
            self.assertTrue(r.answered)
            fam = r.families
            self.assertEqual(fam["ipv4"].reachable, True, name)
            self.assertEqual(fam["ipv4"].public[0], WAN if h.nat else h.host, name)
            self.assertEqual(fam["ipv6"].reachable, False, name)
            by_role = {(s.role, s.family): s for s in r.servers}
            self.assertEqual(by_role[("lobby", "ipv6")].error,
                             "Network is unreachable")
            for key in (("lobby", "ipv4"), ("relay", "ipv4")):
                s = by_role[key]
                self.assertEqual((s.answered, s.asked), (3, 3), (name, key))
                # 2 ms each way on the simulated network.
                self.assertEqual([round(t, 4) for t in s.rtts], [0.004] * 3, (name, key))
            # Well within the budget: the pause plus the filtering test.
            self.assertLess(r.elapsed, 1.0, name)
            self.assertIsNone(r.portmap)
            self.assertIsNone(r.lifetime)
            self.assertEqual(r.notes, (), name)

    def test_timers(self):
        self.assertEqual(NC.timers(0.001), ((0.0, 0.1, 0.3), 0.6))  # discovery's own
        self.assertEqual(NC.timers(0.1), ((0.0, 0.2, 0.6), 0.9))
        self.assertEqual(NC.timers(1.0), ((0.0, 0.5, 1.5), 4.5))

    def test_timers_from_rtt(self):
        """
        Over a slower path (50 ms each way) the retransmission timers
        stretch with the RTT, so filtering is still told right, within the
        budget.
        """
        h = Run(self, SimNat(WAN), latency=0.05)
        r = h.check(budget=2.5)
        self.assertEqual((r.behaviour.mapping, r.behaviour.filtering), (EI, APD))
        self.assertEqual(r.notes, ())
        self.assertLessEqual(r.elapsed, 2.5 - NC.MARGIN)
        relay = next(s for s in r.servers if s.role == "relay")
        self.assertEqual([round(t, 2) for t in relay.rtts], [0.1] * 3)

    def test_slow_path_cut_at_the_budget(self):
        """
        At 300 ms each way a full discovery does not fit the budget: the
        run ends in time and says what was cut.
        """
        h = Run(self, SimNat(WAN), latency=0.3)
        r = h.check(budget=2.5)
        self.assertLessEqual(r.elapsed, 2.5)
        self.assertTrue(r.answered)
        self.assertEqual(r.notes, ("NAT discovery: cut short by the budget of 2.5 s "
                                   "(retransmissions after 0.5 s): some tests were not run",))
        # The first round trip came after a retransmission, the others did not.
        for s in r.servers:
            if s.reachable:
                self.assertEqual([round(t, 2) for t in s.rtts], [0.6, 0.6], s)
        h.clock.advance(1)  # the datagrams still on their way

    def test_lobby_unreachable(self):
        """Nothing answers: a report saying so after one request's retries."""
        h = Run(self, SimNat(WAN))
        h.net.lose = lambda src, dst, data: True
        r = h.check()
        self.assertFalse(r.answered)
        self.assertIsNone(r.behaviour)
        self.assertIn(f"the lobby at {A1}:3478 did not answer: NAT not measured", r.notes)
        self.assertAlmostEqual(r.elapsed, NC.FIRST_GIVE_UP, places=2)

    def test_relay_only(self):
        h = Run(self, SimNat(WAN))
        r = h.check([NC.Server("relay", "relay:7478", [RELAY]),
                     NC.Server("relay", "nowhere:1", [], "Name or service not known")], [])
        self.assertTrue(r.answered)
        self.assertEqual(r.kind, "unknown")
        self.assertIn("relay nowhere:1: Name or service not known", r.notes)


class PortmapTests(SynchronousTestCase):
    def test_offer(self):
        budgets = []

        def probe(budget):
            budgets.append(budget)
            return defer.succeed(dict(PORTMAP, extra="ignored"))

        r = Run(self, SimNat(WAN)).check(portmap=probe)
        self.assertEqual(r.portmap, PORTMAP)
        self.assertEqual(budgets, [1.0])

    def test_slow_probe_cut_at_the_budget(self):
        r = Run(self, SimNat(WAN)).check(portmap=lambda budget: defer.Deferred(), budget=1.5)
        self.assertIsNone(r.portmap)
        self.assertEqual(r.portmap_note, "the probe gave no answer")
        self.assertIn("the port mapping probe: not finished within the budget of 1.5 s", r.notes)
        self.assertAlmostEqual(r.elapsed, 1.5 - NC.MARGIN, places=2)
        self.assertEqual(r.kind, "cone")

    def test_failing_probe(self):
        r = Run(self, SimNat(WAN)).check(
            portmap=lambda budget: defer.fail(RuntimeError("no gateway")))
        self.assertIsNone(r.portmap)
        self.assertIn("port mapping probe failed: no gateway", r.notes)

    def test_not_tested(self):
        r = Run(self).check(portmap_note="turned off by --no-portmap")
        self.assertEqual((r.portmap, r.portmap_note), (None, "turned off by --no-portmap"))


class LifetimeTests(SynchronousTestCase):
    def test_bracketed_and_stopped_early(self):
        """
        A sequential NAT that drops idle mappings after 10 s: kept at 8 s,
        gone at 15 s; the 30-120 s intervals stop there.
        """
        h = Run(self)
        h.host = "10.0.1.2"
        h.nat = h.net.nats[h.host] = ExpiringNat(h.clock, 10.0, WAN, APD, APD, "sequential")
        r = h.check(lifetime=120.0, limit=30.0, step=0.005)
        self.assertEqual((r.lifetime.at_least, r.lifetime.at_most), (8.0, 15.0))
        self.assertEqual([t for t, _ in r.lifetime.tested], [1.0, 2.0, 4.0, 8.0, 15.0])
        self.assertLess(r.elapsed, 17.0)

    def test_port_preserving_not_run(self):
        h = Run(self, ExpiringNat(None, 10.0, WAN))
        h.nat.clock = h.clock
        r = h.check(lifetime=120.0)
        self.assertEqual(r.lifetime.tested, ())
        self.assertIn("keeps the local port", r.lifetime.note)
        self.assertLess(r.elapsed, 1.0)


class BoundsTests(SynchronousTestCase):
    def test_bad_options(self):
        h = Run(self)
        for options in ({"budget": 0.1}, {"budget": 100}, {"samples": 0}, {"samples": 11}):
            self.assertRaises(ValueError, NC.NetCheck, h.clock, h.listen, **options)


def resolver(table):
    def lookup(host, port):
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM, 17, "",
                 (ip, port) if ":" not in ip else (ip, port, 0, 0)) for ip in table[host]]
    return lookup


def args(**kw):
    base = {"lobby": None, "relay": None, "config": None}
    base.update(kw)
    return SimpleNamespace(**base)


class ServersTests(SynchronousTestCase):
    """What ``p2pnat netcheck`` measures against."""

    names = staticmethod(resolver({"lobby.example": ["198.18.1.1", "2001:db8::1"],
                      "relay.example": ["198.18.1.9"], "198.18.1.2": ["198.18.1.2"],
                      "198.18.1.1": ["198.18.1.1"]}))

    def test_one_lobby(self):
        """Its every address for reachability; it and the next port for discovery."""
        lobbies, relays, discovery, interface = plan_servers(
            args(lobby=["lobby.example:3478"], relay=["relay.example:7478"]), self.names)
        self.assertEqual([s.addresses for s in lobbies],
                         [[("198.18.1.1", 3478), ("2001:db8::1", 3478)]])
        self.assertEqual([s.addresses for s in relays], [[("198.18.1.9", 7478)]])
        self.assertEqual(discovery, [("198.18.1.1", 3478), ("198.18.1.1", 3479)])
        self.assertIsNone(interface)

    def test_several_lobbies(self):
        _, _, discovery, _ = plan_servers(
            args(lobby=["198.18.1.1:3478", "198.18.1.2:3478", "lobby.example:3479"]), self.names)
        self.assertEqual(discovery, [("198.18.1.1", 3478), ("198.18.1.2", 3478),
                                     ("198.18.1.1", 3479)])

    def test_unresolvable(self):
        lobbies, _, discovery, _ = plan_servers(args(lobby=["nowhere.example:3478"]), self.names)
        self.assertEqual((lobbies[0].addresses, lobbies[0].error),
                         ([], "Name or service not known"))
        self.assertEqual(discovery, [])

    def test_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[client]\nid = "a"\nlobby = "lobby.example:3478"\ninterface = "10.0.1.2"\n'
                    'discovery = ["198.18.1.1:3478", "198.18.1.2:3478"]\n')
        lobbies, _, discovery, interface = plan_servers(args(config=path), self.names)
        self.assertEqual(lobbies[0].name, "lobby.example:3478")
        self.assertEqual(discovery, [("198.18.1.1", 3478), ("198.18.1.2", 3478)])
        self.assertEqual(interface, "10.0.1.2")
        # --lobby wins over the file's lobby.
        lobbies, _, discovery, _ = plan_servers(args(config=path, lobby=["198.18.1.2:3478"]),
                                                self.names)
        self.assertEqual(discovery, [("198.18.1.2", 3478), ("198.18.1.2", 3479)])

    def test_errors(self):
        e = self.assertRaises(CommandError, plan_servers, args(), self.names)
        self.assertIn("give --lobby HOST:PORT", str(e))
        e = self.assertRaises(CommandError, plan_servers, args(lobby=["lobby.example"]),
                              self.names)
        self.assertIn("--lobby lobby.example: expected host:port", str(e))
        e = self.assertRaises(CommandError, plan_servers, args(lobby=["lobby.example:0"]),
                              self.names)
        self.assertIn("bad port", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[client]\nid = "a"\n')
        e = self.assertRaises(CommandError, plan_servers, args(config=path), self.names)
        self.assertIn("client.lobby is not set; give --lobby HOST:PORT", str(e))
        e = self.assertRaises(CommandError, plan_servers, args(config=path + "-missing"),
                              self.names)
        self.assertIn("-missing", str(e))
