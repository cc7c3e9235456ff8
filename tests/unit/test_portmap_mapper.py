"""
Tests for p2pnat.portmap.PortMapper and probe on a task.Clock with fake
gateways (PCP/NAT-PMP over the fake reactor's UDP, UPnP through a fake
miniupnpc): the race and its preferences, giving back the losers, the
budget, renewal, loss, deletion at stop, and the probe.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.portmap import Mapping, PortMapper, mapper, probe
from p2pnat.portmap.upnp import UpnpClient
from tests.unit.test_portmap_clients import (
    GATEWAY,
    PUBLIC,
    RTT,
    FakeGateway,
    FakeIGD,
    FakeReactor,
    Held,
    run_now,
)


class Base(SynchronousTestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.reactor = FakeReactor(self.gw)
        self.igd = FakeIGD()
        self.runner = run_now

        def upnp(reactor, gateway, transport="udp", log=None):
            return UpnpClient(reactor, gateway, transport, log, run=lambda f, *a: self.runner(f, *a),
                              igd_factory=self.igd)

        self.patch(mapper, "UpnpClient", upnp)
        self.seen = []

    def mapper(self, **kw):
        kw.setdefault("gateway", GATEWAY)
        m = PortMapper(self.reactor, 4000, **kw)
        m.subscribe(self.seen.append)
        return m

    def tearDown(self):
        self.assertEqual(self.reactor.open_ports(), [])


class RaceTests(Base):
    def test_pcp_preferred_and_upnp_given_back(self):
        m = self.mapper()
        d = m.map()
        self.assertNoResult(d)
        self.reactor.advance(RTT)
        mapping = self.successResultOf(d)
        self.assertEqual(mapping, Mapping("pcp", (PUBLIC, 30000), 4000, 7200.0, RTT))
        self.assertEqual(m.current, mapping)
        self.assertEqual(self.seen, [mapping])
        self.assertEqual(self.igd.table, {})  # the UPnP grant was deleted
        self.assertEqual(list(self.gw.mappings.values()), [(30000, 7200, "pcp")])
        # NAT-PMP was never asked: PCP answered.
        self.assertEqual({data[0] for data, to in self.reactor.sent if to[1] == 5351}, {2})

    def test_same_mapping_from_two_protocols_is_kept(self):
        self.gw.next_port = 4000  # the gateway gives the same port to PCP and UPnP
        self.igd.table = {}
        m = self.mapper()
        d = m.map()
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).external, (PUBLIC, 4000))
        self.assertNotIn(("delete", 4000), self.igd.calls)

    def test_natpmp_after_pcp_unsupported(self):
        self.gw.pcp = False
        m = self.mapper(protocols=("pcp", "nat-pmp"))
        d = m.map()
        self.reactor.advance(RTT)  # PCP: "unsupported version" from a NAT-PMP server
        self.assertNoResult(d)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).protocol, "nat-pmp")
        self.assertLess(self.reactor.seconds(), 0.1)

    def test_natpmp_after_pcp_silence(self):
        m = self.mapper(protocols=("pcp", "nat-pmp"))
        self.gw.pcp = False
        self.gw.natpmp = False  # the gateway drops PCP...
        d = m.map()
        self.gw.natpmp = True  # ...and answers NAT-PMP
        self.reactor.advance(1 / 3)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).protocol, "nat-pmp")
        self.assertAlmostEqual(self.reactor.seconds(), 1 / 3 + RTT)  # not the whole budget
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_natpmp_beats_upnp(self):
        self.gw.pcp = False
        m = self.mapper()
        d = m.map()
        self.reactor.advance(RTT)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).protocol, "nat-pmp")
        self.assertEqual(self.igd.table, {})

    def test_upnp_only(self):
        m = self.mapper(protocols=("upnp",))
        d = m.map()
        self.reactor.advance(RTT)
        mapping = self.successResultOf(d)
        self.assertEqual(mapping.protocol, "upnp")
        self.assertEqual(self.gw.requests, [])

    def test_upnp_when_the_gateway_mutes(self):
        self.gw.mute = True
        m = self.mapper()
        d = m.map()
        self.reactor.advance(0.999)
        self.assertNoResult(d)  # PCP and NAT-PMP may still answer
        self.reactor.advance(0.001)
        self.assertEqual(self.successResultOf(d).protocol, "upnp")

    def test_nothing_within_the_budget(self):
        self.gw.mute = True
        self.igd.fail = "No UPnP device discovered"
        m = self.mapper(budget=0.5)
        d = m.map()
        self.reactor.advance(0.499)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.seen, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_nothing_there_ends_early(self):
        self.gw.refuse = True  # ICMP port unreachable
        self.igd.fail = "No UPnP device discovered"
        d = self.mapper().map()
        self.reactor.advance(RTT)
        self.reactor.advance(RTT)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_switched_off(self):
        self.assertIsNone(self.successResultOf(self.mapper(protocols=()).map()))
        self.assertEqual(self.reactor.sent, [])

    def test_late_upnp_is_given_back(self):
        self.gw.mute = True
        held = self.runner = Held()
        d = self.mapper().map()
        self.reactor.advance(1.0)
        self.assertIsNone(self.successResultOf(d))
        held.release()
        held.release()
        self.assertEqual(self.igd.table, {})
        self.assertIn(("delete", 4000), self.igd.calls)

    def test_concurrent_calls_share_one_race(self):
        m = self.mapper(protocols=("pcp",))
        d1, d2 = m.map(), m.map()
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))
        self.assertEqual(len(self.gw.requests), 1)

    def test_bad_arguments(self):
        for kw in ({"internal_port": 0}, {"transport": "sctp"}, {"protocols": ("smtp",)},
                   {"protocols": "pcp"}, {"budget": 0}, {"budget": 31}, {"lifetime": 1},
                   {"gateway": "router.lan"}):
            args = {"internal_port": 4000, **kw}
            with self.subTest(kw=kw):
                self.assertRaises(ValueError, lambda args=args: PortMapper(self.reactor, **args))


class ServiceTests(Base):
    def start(self, **kw):
        m = self.mapper(**kw)
        m.startService()
        self.reactor.advance(RTT)
        return m

    def test_renewal_keeps_the_address_quietly(self):
        m = self.start(protocols=("pcp",), lifetime=100)
        self.assertEqual(len(self.seen), 1)
        self.reactor.advance(50)
        self.reactor.advance(RTT)
        self.assertAlmostEqual(m.current.granted_at, 50 + 2 * RTT)
        self.assertEqual(len(self.seen), 1)
        self.assertEqual(len(self.gw.requests), 2)
        d = m.stopService()
        self.reactor.advance(RTT)
        self.successResultOf(d)

    def test_renewal_with_a_new_address_is_told(self):
        m = self.start(protocols=("nat-pmp",), lifetime=100)
        self.gw.mappings.clear()  # the gateway restarted and forgot us
        self.gw.next_port = 31000
        self.reactor.advance(50)
        self.reactor.advance(RTT)
        self.assertEqual([s.external[1] for s in self.seen], [30000, 31000])
        self.assertEqual(m.current.external, (PUBLIC, 31000))
        m.stopService()
        self.reactor.advance(RTT)

    def test_upnp_renewal(self):
        m = self.start(protocols=("upnp",), lifetime=100)
        self.reactor.advance(50)
        self.assertEqual(self.igd.calls.count(("add", 4000, 100)), 2)
        self.assertAlmostEqual(m.current.granted_at, 50 + RTT)
        self.successResultOf(m.stopService())
        self.assertEqual(self.igd.table, {})

    def test_lost_then_mapped_again(self):
        m = self.start(protocols=("pcp",), lifetime=100)
        self.gw.mute = True
        self.reactor.pump([1.0] * 101)  # renewals fail until the mapping expires
        self.assertIsNone(m.current)
        self.assertEqual(self.seen[-1], None)
        self.gw.mute = False
        self.reactor.advance(mapper.RETRY_INTERVAL)
        self.reactor.advance(RTT)
        self.assertIsNotNone(m.current)
        self.assertEqual(self.seen[-1], m.current)
        m.stopService()
        self.reactor.advance(RTT)

    def test_retry_when_nothing_granted(self):
        self.gw.mute = True
        self.igd.fail = "none"
        m = self.start()
        self.reactor.advance(1.0)
        self.assertIsNone(m.current)
        self.gw.mute = False
        self.reactor.advance(mapper.RETRY_INTERVAL)
        self.reactor.advance(RTT)
        self.assertEqual(m.current.protocol, "pcp")
        m.stopService()
        self.reactor.advance(RTT)

    def test_gateway_gone(self):
        """A mapping on a gateway that is no longer ours is lost, not an error."""
        self.patch(mapper, "default_gateway", lambda: GATEWAY)
        m = self.start(gateway=None, protocols=("pcp",), lifetime=100)
        self.assertIsNotNone(m.current)
        self.patch(mapper, "default_gateway", lambda: None)  # the route went away
        self.assertIsNone(self.successResultOf(m.map()))
        self.reactor.pump([1.0] * 101)
        self.assertIsNone(m.current)
        self.assertEqual(self.seen[-1], None)
        self.successResultOf(m.stopService())

    def test_stop_deletes(self):
        m = self.start()
        self.assertEqual(len(self.gw.mappings), 1)
        d = m.stopService()
        self.assertNoResult(d)
        self.reactor.advance(RTT)
        self.successResultOf(d)
        self.assertEqual(self.gw.mappings, {})
        self.assertIsNone(m.current)
        self.assertEqual(self.seen[-1], None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_is_bounded_by_the_budget(self):
        m = self.start(protocols=("pcp",))
        self.gw.mute = True
        d = m.stopService()
        self.reactor.advance(1.0)
        self.successResultOf(d)

    def test_stop_during_the_race_gives_the_grant_back(self):
        m = self.mapper(protocols=("pcp",))
        m.startService()
        d = m.stopService()
        self.reactor.advance(RTT)  # granted...
        self.assertNoResult(d)
        self.reactor.advance(RTT)  # ...and deleted
        self.successResultOf(d)
        self.assertIsNone(m.current)
        self.assertEqual(self.gw.mappings, {})

    def test_a_failing_subscriber_does_not_stop_the_others(self):
        m = self.mapper(protocols=("pcp",))
        m.subscribe(lambda mapping: 1 / 0)
        later = []
        m.subscribe(later.append)
        m.map()
        self.reactor.advance(RTT)
        self.assertEqual(len(later), 1)
        m.stopService()
        self.reactor.advance(RTT)
        self.assertEqual(later[-1], None)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class ProbeTests(Base):
    def test_everything(self):
        d = probe(self.reactor, GATEWAY)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d),
                         {"pcp": True, "nat-pmp": True, "upnp": True, "external": PUBLIC})
        self.assertEqual(self.gw.mappings, {})

    def test_nothing(self):
        self.gw.refuse = True
        self.igd.fail = "none"
        d = probe(self.reactor, GATEWAY, budget=0.5)
        self.reactor.advance(0.5)
        self.assertEqual(self.successResultOf(d),
                         {"pcp": False, "nat-pmp": False, "upnp": False, "external": None})

    def test_natpmp_only(self):
        self.gw.pcp = False
        self.igd.fail = "none"
        d = probe(self.reactor, GATEWAY)
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d),
                         {"pcp": False, "nat-pmp": True, "upnp": False, "external": PUBLIC})
