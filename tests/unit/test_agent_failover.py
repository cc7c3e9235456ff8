"""
A device agent with several relays, on a L{Clock} and an in-memory network:
a relay that stops answering is found dead within C{agent.dead_after}
(retransmitted checks included), the agent moves to the next relay and is
online there, and it never moves back by itself; a relay that answers keeps
the agent, at a small cost to the relay.
"""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.agent import tap
from p2pnat.agent.notifier import Liveness, Notifier
from p2pnat.daemon import config as C
from p2pnat.daemon import logs
from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import wire
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.notify import NotifyHandler
from tests.support.udp import FakeNetwork, SimNet

KEY = bytes(range(32))
RELAY1 = ("198.18.0.1", 7478)
RELAY2 = ("2001:db8::2", 7478)
DEVICE = ("203.0.113.5", 61000)


class OldNotifyHandler(NotifyHandler):
    """A relay from before the ack flag: it ignores it."""

    def handle(self, frame, message, addr, proto):
        frame.flags = 0
        return super().handle(frame, message, addr, proto)


class Relay:
    """A relay's notify socket and device table, on C{net} at C{addr}."""

    def __init__(self, net, clock, addr, handler=NotifyHandler, period=300):
        self.net, self.addr = net, addr
        self.table = DeviceTable(period)
        self.table.put(DeviceState("dev-1", KEY))
        self.metrics = Metrics("relay")
        self.proto = ControlProtocol(handler(self.table, clock, self.metrics), clock,
                                     self.metrics, wire.ReplayGuard(clock),
                                     stamper=wire.Stamper(clock))

    @property
    def last_access(self):
        return self.table.get("dev-1").last_access


class FakeRelay(Relay):
    """A L{Relay} on a L{FakeNetwork} (delivery at once); C{kill} silences it."""

    def __init__(self, net, clock, addr, **kw):
        super().__init__(net, clock, addr, **kw)
        net.attach(self.proto, *addr)

    def kill(self):
        del self.net.endpoints[self.addr]

    def revive(self):
        self.net.endpoints[self.addr] = self.proto

    def datagrams(self, inbound=True, since=0):
        """How many datagrams reached (or left) it, from log entry C{since}."""
        return sum(1 for data, src, dst in self.net.log[since:]
                   if (dst if inbound else src) == self.addr)


def frames(net, to, since=0):
    """The (frame, message) of each frame sent to C{to}, from log entry C{since}."""
    return [wire.unseal(data, lambda k, t: KEY) for data, src, dst in net.log[since:]
            if dst == to]


class Harness:
    """One agent's L{Notifier} and the relays it may report to."""

    def __init__(self, testcase, dead_after=30.0, relays=(RELAY1,), handler=NotifyHandler,
                 b_interval=20.0):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = FakeNetwork()
        self.relays = {addr: FakeRelay(self.net, self.clock, addr, handler=handler)
                       for addr in relays}
        self.dead = []
        self.notifier = Notifier("dev-1", KEY, relays[0], self.clock, b_interval,
                                 dead_after=dead_after, on_dead=self.dead_at)
        self.agent = self.net.attach(
            ControlProtocol(self.notifier, self.clock, Metrics("agent"), self.notifier.replay,
                            stun_rate=0, stamper=self.notifier.stamper), *DEVICE)
        testcase.addCleanup(self.notifier.stop)
        self.on_dead = None

    def dead_at(self, addr):
        self.dead.append((addr, self.clock.seconds()))
        if self.on_dead is not None:
            self.on_dead(addr)

    def advance(self, seconds, step=0.25):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)


class LivenessScheduleTests(SynchronousTestCase):
    def test_default_schedule(self):
        live = Liveness(30)
        self.assertEqual((live.quiet, live.window), (20.0, 10.0))
        live.heard(100.0)
        steps = []
        while True:
            action, at = live.next(True)
            steps.append((action, round(at - 100, 3)))
            if action == "dead":
                break
            live.checked()
        self.assertEqual(steps, [("ack", 20.0), ("ping", 23.333), ("ping", 26.667),
                                 ("dead", 30.0)])
        self.assertEqual(live.next(False), ("dead", 130.0))

    def test_long_dead_after_checks_less_often_not_slower(self):
        live = Liveness(300)
        self.assertEqual((live.quiet, live.window), (290.0, 10.0))
        self.assertEqual(Liveness(6).window, 2.0)


class DetectionTests(SynchronousTestCase):
    def test_acks_keep_the_relay(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        h.advance(3600)
        self.assertEqual(h.dead, [])
        # The checks were notify B asking for an ack (at most one per quiet
        # time), which the relay answered: never a ping.
        asked = [f for f, m in frames(h.net, RELAY1)
                 if isinstance(m, wire.NotifyB) and f.flags & wire.ACK_REQUESTED]
        self.assertGreater(len(asked), 100)
        self.assertLessEqual(len(asked), 3600 / h.notifier.liveness.quiet + 1)
        self.assertEqual([m for f, m in frames(h.net, RELAY1) if isinstance(m, wire.Ping)], [])

    def test_relay_work_per_device_per_hour(self):
        """
        The relay receives as many datagrams as without the detection (the
        check is the notify B that was due) and sends one ack more per
        check: at most one per quiet time (20 s by default), fewer as the
        acks of notify A count too.
        """
        counts = {}
        for dead_after in (None, 30.0):
            h = Harness(self, dead_after=dead_after)
            h.notifier.start(h.agent)
            h.advance(3600)
            relay = h.relays[RELAY1]
            counts[dead_after] = relay.datagrams(True), relay.datagrams(False)
        (in_before, out_before), (in_after, out_after) = counts[None], counts[30.0]
        self.assertLessEqual(abs(in_after - in_before), 1)
        self.assertLessEqual(out_after - out_before, 3600 / 20 + 1)
        self.assertEqual((in_before, out_before), (1 + 36 + 1 + 180, 1 + 37))
        self.assertEqual(out_after - out_before, 180 - 36)  # a notify A was the check

    def test_long_dead_after_costs_the_relay_nothing(self):
        """From 120 s up, the acks of notify A (every 100 s) are proof enough."""
        counts = []
        for dead_after in (None, 120.0):
            h = Harness(self, dead_after=dead_after)
            h.notifier.start(h.agent)
            h.advance(3600, step=0.5)
            counts.append((h.relays[RELAY1].datagrams(True), h.relays[RELAY1].datagrams(False)))
        self.assertEqual(counts[0], counts[1])

    def test_silent_relay_dead_within_the_bound_after_retransmits(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        h.advance(95)
        h.relays[RELAY1].kill()
        killed, mark = h.clock.seconds(), len(h.net.log)
        h.advance(60)
        [(addr, when)] = h.dead
        self.assertEqual(addr, RELAY1)
        self.assertLessEqual(when - killed, 30.0)
        # Not on one lost datagram: the check and two retransmissions first.
        sent = [(m, f.flags) for f, m in frames(h.net, RELAY1, mark)]
        self.assertEqual([type(m).__name__ for m, flags in sent if flags or
                          isinstance(m, wire.Ping)], ["NotifyB", "Ping", "Ping"])

    def test_one_lost_answer_is_not_death(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        lost = []

        def lose_first_ack(data, src, dst):
            if src == RELAY1 and data[2] == wire.NotifyAck.TYPE and not lost:
                lost.append(data)
                return True
            return False

        h.advance(25)
        h.net.drop = lose_first_ack
        h.advance(600)
        self.assertEqual(len(lost), 1)
        self.assertEqual(h.dead, [])

    def test_dead_after_is_configurable(self):
        for dead_after in (10.0, 60.0, 300.0):
            h = Harness(self, dead_after=dead_after)
            h.notifier.start(h.agent)
            h.advance(100)
            h.relays[RELAY1].kill()
            killed = h.clock.seconds()
            h.advance(dead_after + 10)
            [(addr, when)] = h.dead
            self.assertEqual(addr, RELAY1)
            self.assertLessEqual(when - killed, dead_after)
            # Not long before: the relay was checked after a quiet spell.
            self.assertGreater(when - killed, h.notifier.liveness.window)

    def test_relay_dead_from_the_start(self):
        h = Harness(self)
        h.relays[RELAY1].kill()
        start = h.clock.seconds()
        h.notifier.start(h.agent)
        h.advance(40)
        self.assertEqual(h.dead, [(RELAY1, start + 30)])

    def test_old_relay_answers_the_retransmitted_ping(self):
        """A relay that ignores the ack flag answers pings: no move, no flapping."""
        h = Harness(self, handler=OldNotifyHandler)
        h.notifier.start(h.agent)
        h.advance(3600)
        self.assertEqual(h.dead, [])
        self.assertGreater(len([m for f, m in frames(h.net, RELAY1)
                                if isinstance(m, wire.Ping)]), 100)

    def test_without_dead_after_nothing_changes(self):
        h = Harness(self, dead_after=None)
        h.notifier.start(h.agent)
        h.relays[RELAY1].kill()
        h.advance(600)
        self.assertEqual(h.dead, [])
        self.assertEqual([f.flags for f, m in frames(h.net, RELAY1) if f.flags], [])


class SwitchTests(SynchronousTestCase):
    def harness(self):
        h = Harness(self, relays=(RELAY1, RELAY2))
        h.on_dead = lambda addr: h.notifier.switch(RELAY2 if addr == RELAY1 else RELAY1, h.agent)
        h.notifier.start(h.agent)
        h.advance(50)
        return h

    def test_moves_and_is_online_at_once(self):
        h = self.harness()
        h.relays[RELAY1].kill()
        killed, mark = h.clock.seconds(), len(h.net.log)
        h.advance(30)
        [(_, when)] = h.dead
        self.assertEqual(h.notifier.relay_addr, RELAY2)
        # Period asked and answered, then a notify A at once: relay 2 has
        # the device from the moment the agent moved.
        self.assertEqual(h.relays[RELAY2].last_access, when)
        self.assertEqual([type(m).__name__ for f, m in frames(h.net, RELAY2, mark)][:2],
                         ["PeriodRequest", "NotifyA"])
        self.assertLessEqual(when - killed, 30)

    def test_never_back_by_itself(self):
        h = self.harness()
        h.relays[RELAY1].kill()
        h.advance(30)
        h.relays[RELAY1].revive()
        mark = len(h.net.log)
        h.advance(3600)
        self.assertEqual(len(h.dead), 1)
        self.assertEqual(frames(h.net, RELAY1, mark), [])
        self.assertEqual(h.relays[RELAY2].table.get("dev-1").addr, DEVICE)

    def test_back_when_the_new_one_dies_too(self):
        h = self.harness()
        h.relays[RELAY1].kill()
        h.advance(30)
        h.relays[RELAY1].revive()
        h.relays[RELAY2].kill()
        h.advance(60)
        self.assertEqual([addr for addr, when in h.dead], [RELAY1, RELAY2])
        self.assertEqual(h.notifier.relay_addr, RELAY1)
        self.assertEqual(h.relays[RELAY1].last_access, h.dead[1][1])

    def test_late_ack_from_the_old_relay_is_no_sign_of_life(self):
        """
        After the move, an ack of a notify sent to the old relay does not
        keep the new one (silent here) alive.
        """
        h = self.harness()
        old_b = [f for f, m in frames(h.net, RELAY1) if isinstance(m, wire.NotifyB)][-1]
        h.relays[RELAY1].kill()
        h.relays[RELAY2].kill()
        h.advance(30)
        [(_, moved)] = h.dead
        h.advance(15)
        late = wire.seal(wire.NotifyAck(old_b.timestamp, DEVICE, 0), "dev-1", KEY,
                         h.relays[RELAY1].proto.stamper())
        h.agent.datagramReceived(late, RELAY1)
        h.advance(20)
        self.assertEqual(h.dead[1], (RELAY2, moved + 30))


class AgentServiceTests(SynchronousTestCase):
    """
    The whole agent on a simulated network: a name with an IPv6 and an
    IPv4 relay, the IPv6 one tried first on a socket bound for it.
    """

    V6 = ("2001:db8::2", 7478)
    V4 = ("198.18.0.1", 7478)

    def setUp(self):
        level = logs._threshold.level
        self.addCleanup(setattr, logs._threshold, "level", level)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = SimNet(self.clock)
        self.relays = {}
        for addr in (self.V6, self.V4):
            relay = self.relays[addr] = Relay(self.net, self.clock, addr)
            relay.port = self.net.listen(addr[0], relay.proto, addr[1])
        self.resolved = []
        self.no_route = set()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def resolve(self, name):
        from twisted.internet import defer
        self.resolved.append(name)
        return defer.succeed({"relays.test": ["198.18.0.1", "2001:db8::2"]}.get(name, []))

    def agent(self, relay="relays.test:7478"):
        config = C.load(None, tap.SCHEMA, {
            "agent.device_id": "dev-1", "agent.relay": relay,
            "udp.listen": "192.168.1.10:0", "metrics.listen": "", "log.json": "",
            # No gateway on this simulated network (tests.unit.test_agent_portmap).
            "agent.port_mapping": False})
        svc = tap.AgentService(config, KEY, self.net, services={}, tls=object(),
                               resolve=self.resolve, routable=lambda addr: addr not in self.no_route)
        svc.startService()

        def stop():
            svc.stopService()
            self.clock.advance(0)
        self.addCleanup(stop)
        return svc

    def advance(self, seconds, step=0.25):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)

    def test_moves_from_ipv6_to_ipv4_relay(self):
        svc = self.agent()
        self.advance(1)
        self.assertEqual(sorted(svc.sockets), [4, 6])
        # The IPv6 one bound for the IPv6 relay, a service of the agent's.
        self.assertEqual((svc.listeners[6].host, svc.listeners[6].portnum), ("::", 0))
        self.assertIs(svc.listeners[6].parent, svc)
        self.assertEqual(svc.notifier.relay_addr, self.V6)
        self.assertIsNotNone(self.relays[self.V6].last_access)
        self.assertIsNone(self.relays[self.V4].last_access)
        self.advance(60)

        self.relays[self.V6].port.reading = False  # the IPv6 relay dies
        killed = self.clock.seconds()
        self.advance(40, step=0.01)
        self.assertEqual(svc.notifier.relay_addr, self.V4)
        online = self.relays[self.V4].last_access
        # Detection, then a period request, its answer and the notify A,
        # each one on a later step of the clock.
        self.assertLessEqual(online - killed, 30.0 + 4 * 0.01 + 1e-6)
        self.assertIs(svc.notifier.proto, svc.sockets[4])
        self.assertEqual(svc.metrics.value("p2pnat_agent_relay_moves_total"), 1)
        [moved] = [e for e in self.events if "new_relay" in e]
        self.assertEqual((moved["old_relay"], moved["new_relay"], moved["log_level"].name),
                         ("[2001:db8::2]:7478", "198.18.0.1:7478", "warn"))
        self.assertEqual(self.resolved, ["relays.test"])

        # The IPv6 relay comes back: the agent stays where it is.
        self.relays[self.V6].port.reading = True
        sent = len(self.net.sent)
        self.advance(3600, step=1.0)
        self.assertEqual([s for s in self.net.sent[sent:] if s.dst == self.V6], [])
        self.assertEqual(svc.metrics.value("p2pnat_agent_relay_moves_total"), 1)

    def test_all_dead_goes_round_and_resolves_again(self):
        for relay in self.relays.values():
            relay.port.reading = False
        svc = self.agent()
        self.advance(125)
        # 30 s per relay: IPv6, IPv4, then the name again.
        self.assertEqual(self.resolved, ["relays.test"] * 3)
        self.assertEqual(svc.metrics.value("p2pnat_agent_relay_moves_total"), 4)
        self.relays[self.V4].port.reading = True
        self.advance(65)
        self.assertEqual(svc.notifier.relay_addr, self.V4)
        self.assertIsNotNone(self.relays[self.V4].last_access)

    def test_no_route_passed_over_at_once(self):
        """A host without IPv6: the IPv6 relay is not waited for."""
        self.no_route.add(self.V6)
        svc = self.agent()
        self.advance(1)
        self.assertEqual(svc.notifier.relay_addr, self.V4)
        self.assertIsNotNone(self.relays[self.V4].last_access)
        self.assertEqual(sorted(svc.sockets), [4])
        self.assertEqual(svc.metrics.value("p2pnat_agent_relay_moves_total"), 0)

    def test_network_down_waits_and_says_so_once(self):
        self.no_route.update((self.V6, self.V4))
        svc = self.agent()
        self.advance(60)
        self.assertIsNone(svc.notifier.relay_addr)
        said = [e.get("log_format") for e in self.events]
        self.assertEqual(said.count("no route to relay {relay}; trying the next"), 2)
        self.assertEqual(said.count("no relay address to report to; trying again every"
                                    " {secs:.0f}s"), 1)
        self.assertEqual(len(self.resolved), 13)  # at start, then every 5 s
        self.no_route.clear()
        self.advance(6)  # the next try, then its period request and notify A
        self.assertEqual(svc.notifier.relay_addr, self.V6)
        self.assertIsNotNone(self.relays[self.V6].last_access)

    def test_restarted_reports_afresh(self):
        """Stopped and started again (as a parent service may): notifies again, no move."""
        svc = self.agent()
        self.advance(5)
        svc.stopService()
        self.advance(100)
        before = self.relays[self.V6].last_access
        svc.startService()
        self.advance(5)
        self.assertGreater(self.relays[self.V6].last_access, before)
        self.assertEqual(svc.metrics.value("p2pnat_agent_relay_moves_total"), 0)
        said = [e.get("log_format") for e in self.events]
        self.assertEqual(said.count("device {device_id} reporting to relay {relay}"), 2)

    def test_literals_in_configured_order(self):
        svc = self.agent(["198.18.0.1:7478", "[2001:db8::2]:7478"])
        self.advance(1)
        self.assertEqual(self.resolved, [])
        self.assertEqual(svc.notifier.relay_addr, self.V4)
        self.assertEqual(sorted(svc.sockets), [4])  # no IPv6 socket until one is needed


class ResolveAllTests(SynchronousTestCase):
    def test_every_address_of_both_families(self):
        from twisted.internet.address import IPv4Address, IPv6Address

        asked = []

        class NameResolver:
            def resolveHostName(self, receiver, name, port, types, semantics):
                asked.append((name, set(types), semantics))
                receiver.resolutionBegan(None)
                receiver.addressResolved(IPv6Address("UDP", "2001:db8::2", 0))
                receiver.addressResolved(IPv4Address("UDP", "198.18.0.1", 0))
                receiver.resolutionComplete()

        class Reactor:
            nameResolver = NameResolver()

        found = self.successResultOf(tap.resolve_all(Reactor(), "relays.test"))
        self.assertEqual(found, ["2001:db8::2", "198.18.0.1"])
        self.assertEqual(asked, [("relays.test", {IPv4Address, IPv6Address}, "UDP")])


class RelayAnswerTests(SynchronousTestCase):
    """The relay's side of the check (p2pnat.relay.notify)."""

    def test_flagged_notify_b_acked_no_larger(self):
        """
        A notify B that changes nothing gets an ack only with the flag; the
        ack echoes it and is no larger than it.
        """
        clock = Clock()
        clock.advance(1_700_000_000)
        relay = FakeRelay(FakeNetwork(), clock, RELAY1)
        relay.table.notify_a("dev-1", DEVICE, DEVICE, relay.proto, clock.seconds())
        stamper = wire.Stamper(clock)
        answers = []
        for flags in (0, wire.ACK_REQUESTED, 0):
            clock.advance(20)
            relay.proto.transport.written.clear()
            stamp = stamper()
            b = wire.seal(wire.NotifyB(local=DEVICE), "dev-1", KEY, stamp, flags)
            relay.proto.datagramReceived(b, DEVICE)
            answers.append([(len(data) <= len(b), to, wire.unseal(data, lambda k, t: KEY)[1])
                            for data, to in relay.proto.transport.written])
            if flags:
                flagged = stamp
        self.assertEqual((answers[0], answers[2]), ([], []))
        [(no_larger, to, ack)] = answers[1]
        self.assertEqual((no_larger, to, type(ack), ack.echo, ack.observed),
                         (True, DEVICE, wire.NotifyAck, flagged, DEVICE))
        self.assertFalse(ack.flags & wire.NEED_NOTIFY_A)
