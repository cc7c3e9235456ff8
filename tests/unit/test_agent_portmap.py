"""
The device agent's port mapping (L{p2pnat.agent.portmap}): a mapper for
the notify socket's port in the agent's service tree, its mapping told to
the relay, deleted when the agent stops, none at all when it is off.

The mapper is a double with L{p2pnat.portmap.PortMapper}'s interface; the
mapper itself is tested with its own module.
"""

from dataclasses import dataclass

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.agent import tap
from p2pnat.agent.portmap import NotifyPortMapping
from p2pnat.daemon import config as C
from p2pnat.daemon import logs
from p2pnat.protocol import wire
from tests.unit.test_taps import UDPMemoryReactor

KEY = bytes(range(32))
RELAY = ("198.18.0.1", 7478)
GRANTED = ("198.18.5.2", 45000)


@dataclass(frozen=True)
class Mapping:
    protocol: str
    external: tuple
    internal_port: int
    lifetime: float
    granted_at: float


class FakePortMapper(service.Service):
    """
    L{p2pnat.portmap.PortMapper}'s interface, with the gateway's answers
    given by the test (L{grant}, L{lose}); stopping it "deletes" the
    mapping when the test fires L{deleted}.
    """

    made = None  # the test's list of every mapper made

    def __init__(self, reactor, internal_port, *, transport="udp",
                 protocols=("pcp", "nat-pmp", "upnp"), gateway=None, budget=1.0,
                 lifetime=7200, log=None):
        self.reactor = reactor
        self.internal_port = internal_port
        self.transport = transport
        self.budget = budget
        self.current = None
        self.subscribers = []
        self.deleted = None
        self.made.append(self)

    def map(self):
        return succeed(self.current)

    def subscribe(self, callback):
        self.subscribers.append(callback)

    def _tell(self, mapping):
        self.current = mapping
        for callback in self.subscribers:
            callback(mapping)

    def grant(self, external, protocol="pcp"):
        self._tell(Mapping(protocol, external, self.internal_port, 7200.0,
                           self.reactor.seconds()))

    def lose(self):
        self._tell(None)

    def stopService(self):
        super().stopService()
        self.deleted = Deferred()
        return self.deleted


class AgentPortMappingTests(SynchronousTestCase):
    def setUp(self):
        self.made = []
        self.patch(FakePortMapper, "made", self.made)
        self.patch(NotifyPortMapping, "make_mapper", FakePortMapper)
        # The agent sets the process-wide log level from its configuration.
        self.addCleanup(setattr, logs._threshold, "level", logs._threshold.level)

    def agent(self, listen="192.168.1.10:0", **settings):
        """An agent service on a fake reactor (not started)."""
        self.reactor = UDPMemoryReactor()
        self.reactor.advance(1_700_000_000)
        config = C.load(None, tap.SCHEMA, {
            "agent.device_id": "dev-1", "agent.relay": f"{RELAY[0]}:{RELAY[1]}",
            "udp.listen": listen, **settings})
        return tap.AgentService(config, KEY, self.reactor, services={"": ("127.0.0.1", 80)},
                                tls=object())

    def start(self, agent):
        agent.startService()
        self.addCleanup(lambda: agent.running and agent.stopService())
        [self.port] = self.reactor.udpPorts
        return agent

    def answer_period(self, agent):
        """Answer the agent's period request as the relay would."""
        [(data, to)] = self.port.transport.written
        frame = wire.parse(data)
        now = int(self.reactor.seconds() * 1e6)
        self.port.transport.written.clear()
        self.port.protocol.datagramReceived(
            wire.seal(wire.Period(300, 25, now, frame.timestamp), "dev-1", KEY, now), RELAY)

    def sent(self):
        out = [wire.unseal(data, lambda k, t: KEY)[1] for data, to in self.port.transport.written]
        self.port.transport.written.clear()
        return out

    def test_mapper_for_the_notify_port(self):
        """
        Started, the agent maps its notify socket's port (known only once
        it listens), as a child of its service tree, with the budget of
        its configuration.
        """
        agent = self.start(self.agent(**{"agent.port_mapping_budget": "0.5"}))
        [mapper] = self.made
        self.assertEqual((mapper.internal_port, mapper.transport, mapper.budget),
                         (self.port.transport.port, "udp", 0.5))
        self.assertTrue(mapper.running)
        self.assertIs(mapper.parent, agent.port_mapping)
        self.assertIs(agent.port_mapping.parent, agent)

    def test_mapping_told_to_the_relay(self):
        """
        A granted mapping's external address goes into the notifies, once
        the relay's NotifyAck says it takes it; a new one and its loss are
        told at once.
        """
        agent = self.start(self.agent())
        [mapper] = self.made
        mapper.grant(GRANTED)
        self.assertEqual(agent.notifier.mapped, GRANTED)
        self.answer_period(agent)
        [notify_a] = self.sent()
        self.assertIsInstance(notify_a, wire.NotifyA)
        self.assertIsNone(notify_a.mapped)  # the relay has not said it takes one yet
        now = int(self.reactor.seconds() * 1e6)
        self.port.protocol.datagramReceived(
            wire.seal(wire.NotifyAck(now, ("198.18.5.2", 61000), wire.TAKES_MAPPED), "dev-1",
                      KEY, now + 1), RELAY)
        [notify_b] = self.sent()
        self.assertEqual((type(notify_b), notify_b.mapped), (wire.NotifyB, GRANTED))
        self.reactor.advance(20)
        self.assertEqual([m.mapped for m in self.sent()], [GRANTED])
        mapper.grant(("198.18.5.2", 45001), protocol="upnp")
        self.assertEqual([m.mapped for m in self.sent()], [("198.18.5.2", 45001)])
        mapper.lose()
        [notify_b] = self.sent()
        self.assertIsNone(notify_b.mapped)
        self.assertIsNone(agent.notifier.mapped)

    def test_mapping_deleted_on_exit(self):
        """
        Stopping the agent stops the mapper (which deletes the mapping) and
        waits for it; what the mapper tells while stopping is not sent.
        """
        agent = self.start(self.agent())
        [mapper] = self.made
        mapper.grant(GRANTED)
        stopped = agent.stopService()
        self.assertFalse(mapper.running)
        self.assertNoResult(stopped)
        mapper.lose()
        self.assertEqual(agent.notifier.mapped, GRANTED)
        mapper.deleted.callback(None)
        self.successResultOf(stopped)
        self.assertIsNone(agent.port_mapping.mapper)
        self.assertEqual(list(agent.port_mapping), [])

    def test_restart_maps_again(self):
        agent = self.start(self.agent())
        stopped = agent.stopService()
        self.made[0].deleted.callback(None)
        self.successResultOf(stopped)
        agent.startService()
        self.addCleanup(lambda: agent.running and self.stop(agent))
        self.assertEqual(len(self.made), 2)
        self.assertTrue(self.made[1].running)

    def stop(self, agent):
        d = agent.stopService()
        self.made[-1].deleted.callback(None)
        return d

    def test_switched_off(self):
        """agent.port_mapping = false: no mapper, nothing asked of the gateway."""
        agent = self.start(self.agent(**{"agent.port_mapping": "false"}))
        self.assertIsNone(agent.port_mapping)
        self.assertEqual(self.made, [])
        self.assertFalse([s for s in agent if isinstance(s, NotifyPortMapping)])

    def test_on_by_default(self):
        self.assertIsInstance(self.agent().port_mapping, NotifyPortMapping)

    def test_loopback_socket_asks_nothing(self):
        agent = self.start(self.agent(listen="127.0.0.1:0"))
        self.assertEqual(self.made, [])
        self.successResultOf(agent.stopService())

    def test_bad_budget(self):
        for bad in ("0", "-1"):
            with self.assertRaises(C.ConfigError):
                C.load(None, tap.SCHEMA, {"agent.port_mapping_budget": bad})
