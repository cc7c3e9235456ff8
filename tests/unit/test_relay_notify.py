"""
The notify exchange between a device agent and the relay, driven on a
L{Clock} through an in-memory network with a NAT.
"""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.agent.notifier import Notifier
from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import wire
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.notify import NotifyHandler
from tests.support.udp import FakeNetwork

KEY = bytes(range(32))
RELAY = ("198.18.0.1", 7478)
DEVICE_LAN = ("192.168.1.10", 40000)
DEVICE_PUBLIC = ("203.0.113.5", 61000)


class Harness:
    def __init__(self, testcase, period=300, b_interval=20.0):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.net = FakeNetwork()
        self.net.nat[DEVICE_LAN] = DEVICE_PUBLIC
        self.table = DeviceTable(period)
        self.table.put(DeviceState("dev-1", KEY))
        self.relay_metrics = Metrics("relay")
        self.relay_stamper = wire.Stamper(self.clock)
        self.handler = NotifyHandler(self.table, self.clock, self.relay_metrics)
        self.relay = self.net.attach(
            ControlProtocol(self.handler, self.clock, self.relay_metrics,
                            wire.ReplayGuard(self.clock), stamper=self.relay_stamper), *RELAY)
        self.connects = []
        # The device's clock is 1000 s off the relay's: it must learn the offset.
        self.device_clock = Clock()
        self.device_clock.advance(1_700_001_000)
        self.notifier = Notifier("dev-1", KEY, RELAY, self.device_clock, b_interval,
                                 lambda req, addr: self.connects.append(req))
        self.agent_metrics = Metrics("agent")
        self.agent = self.net.attach(
            ControlProtocol(self.notifier, self.device_clock, self.agent_metrics,
                            self.notifier.replay, stun_rate=0, stamper=self.notifier.stamper),
            *DEVICE_LAN)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        testcase.addCleanup(self.notifier.stop)

    def advance(self, seconds, step=1.0):
        t = 0.0
        while t < seconds:
            self.clock.advance(step)
            self.device_clock.advance(step)
            t += step

    def sent(self, cls):
        return [d for d, src, dst in self.net.log
                if d[0] == wire.MARKER and d[2] == cls.TYPE]


class NotifyExchangeTests(SynchronousTestCase):
    def test_period_then_notifies(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        self.assertEqual(h.notifier.period, 300)
        # Clock offset learnt despite 1000 s of skew.
        self.assertAlmostEqual(h.notifier.stamper.offset, -1000, delta=0.01)
        d = h.table.get("dev-1")
        self.assertEqual(d.addr, DEVICE_PUBLIC)
        self.assertEqual(d.local, DEVICE_LAN)
        self.assertEqual(d.last_access, h.clock.seconds())
        self.assertIs(d.socket, h.relay)
        self.assertEqual(h.notifier.public_addr, DEVICE_PUBLIC)
        self.assertEqual(list(h.table.take_pending()), ["dev-1"])

    def test_timers(self):
        h = Harness(self, period=300, b_interval=20)
        h.notifier.start(h.agent)
        h.advance(300)
        self.assertEqual(len(h.sent(wire.NotifyB)), 15)
        # Notify A at least three times per period (the first at once).
        self.assertEqual(len(h.sent(wire.NotifyA)), 4)
        self.assertLessEqual(h.clock.seconds() - h.table.get("dev-1").last_access, 100)

    def test_notify_b_keeps_last_access(self):
        h = Harness(self, period=300, b_interval=20)
        h.notifier.start(h.agent)
        h.table.take_pending()
        first = h.table.get("dev-1").last_access
        h.advance(60)
        self.assertEqual(h.table.get("dev-1").last_access, first)
        self.assertEqual(h.table.take_pending(), {})

    def test_notify_b_answered_only_when_the_device_must_act(self):
        """
        A notify B that changes nothing gets no answer (the device's own
        packet keeps its NAT mapping); one that shows a new mapping, or
        comes when the relay needs a notify A, gets a NotifyAck.
        """
        h = Harness(self, period=300, b_interval=20)
        h.notifier.start(h.agent)
        acks = len(h.sent(wire.NotifyAck))
        h.advance(60)  # three notify B, nothing new
        self.assertEqual(len(h.sent(wire.NotifyB)), 3)
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks)
        h.net.nat[DEVICE_LAN] = ("203.0.113.5", 62000)
        h.advance(20)
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks + 1)
        self.assertEqual(h.notifier.public_addr, ("203.0.113.5", 62000))
        h.advance(25)  # t = 105: the scheduled notify A (t = 100) is answered
        h.table.get("dev-1").last_access = None  # the relay needs a notify A
        acks = len(h.sent(wire.NotifyAck))
        sent_a = len(h.sent(wire.NotifyA))
        h.advance(20)  # the notify B at t = 120
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks + 2)  # B's ack, then A's
        self.assertEqual(len(h.sent(wire.NotifyA)), sent_a + 1)
        self.assertIsNotNone(h.table.get("dev-1").last_access)

    def test_new_mapping_taken_from_notify_b(self):
        h = Harness(self, b_interval=20)
        h.notifier.start(h.agent)
        h.net.nat[DEVICE_LAN] = ("203.0.113.5", 62000)  # the NAT forgot and re-mapped
        h.advance(20)
        self.assertEqual(h.table.get("dev-1").addr, ("203.0.113.5", 62000))
        self.assertEqual(h.notifier.public_addr, ("203.0.113.5", 62000))

    def test_period_request_retried_until_answered(self):
        h = Harness(self)
        lost = []
        h.net.drop = lambda data, src, dst: len(lost) < 3 and not lost.append(data)
        h.notifier.start(h.agent)
        self.assertIsNone(h.notifier.period)
        h.advance(10)
        self.assertEqual(h.notifier.period, 300)

    def test_relay_restart_forgets_device_asks_for_a(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        h.table.get("dev-1").last_access = None  # as after a restart with an old store
        h.table.get("dev-1").addr = None
        h.advance(20)
        d = h.table.get("dev-1")
        # The notify B's ack asked for a notify A, which came at once.
        self.assertEqual(d.addr, DEVICE_PUBLIC)
        self.assertEqual(d.last_access, h.clock.seconds())

    def test_connect_request_verified_once(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        req = wire.ConnectRequest(b"S" * 16, b"N" * 16, 7443, "relay.example.org")
        data = wire.seal(req, "dev-1", KEY, h.relay_stamper())
        h.relay.transport.write(data, DEVICE_PUBLIC)
        self.assertEqual(h.connects, [req])
        # The same datagram again (replay) and a retransmission with a new
        # timestamp both do nothing more.
        h.relay.transport.write(data, DEVICE_PUBLIC)
        h.relay.transport.write(wire.seal(req, "dev-1", KEY, h.relay_stamper()), DEVICE_PUBLIC)
        self.assertEqual(h.connects, [req])
        self.assertEqual(h.agent_metrics.value("p2pnat_udp_dropped_total", reason="replay"), 1)

    def test_forged_connect_request_ignored(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        req = wire.ConnectRequest(b"S" * 16, b"N" * 16, 7443, "evil.example")
        forged = wire.seal(req, "dev-1", bytes(32), h.relay_stamper())
        old = wire.seal(req, "dev-1", KEY, int((h.clock.seconds() - 3600) * 1e6))
        other = wire.seal(req, "dev-2", KEY, h.relay_stamper())
        for data in (forged, old, other):
            h.agent.datagramReceived(data, ("198.51.100.66", 1234))
        self.assertEqual(h.connects, [])
        value = h.agent_metrics.value
        self.assertEqual(value("p2pnat_udp_dropped_total", reason="bad-mac"), 1)
        # An hour-old frame is older than the last one seen, and out of the window.
        self.assertEqual(value("p2pnat_udp_dropped_total", reason="stale")
                         + value("p2pnat_udp_dropped_total", reason="replay"), 1)
        self.assertEqual(value("p2pnat_udp_dropped_total", reason="unknown-key"), 1)

    def test_unsolicited_period_ignored(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        data = wire.seal(wire.Period(1, 1, 0, 12345), "dev-1", KEY, h.relay_stamper())
        h.agent.datagramReceived(data, RELAY)
        self.assertEqual(h.notifier.period, 300)


class RelayDropTests(SynchronousTestCase):
    """What the relay does with datagrams that are not genuine notifies."""

    def setUp(self):
        self.h = Harness(self)
        self.src = ("198.51.100.7", 5555)

    def dropped(self, reason):
        return self.h.relay_metrics.value("p2pnat_udp_dropped_total", reason=reason)

    def send(self, data):
        self.h.relay.transport.written.clear()
        self.h.relay.datagramReceived(data, self.src)
        return self.h.relay.transport.written

    def test_malformed_each_dropped_and_logged(self):
        h = self.h
        good = wire.seal(wire.NotifyA(local=DEVICE_LAN), "dev-1", KEY, h.relay_stamper())
        cases = {
            "truncated": good[:20],
            "oversized": good + bytes(2000),
            "bad-mac": wire.seal(wire.NotifyA(local=DEVICE_LAN), "dev-1", bytes(32),
                                 h.relay_stamper()),
            "unknown-key": wire.seal(wire.NotifyA(local=DEVICE_LAN), "nobody", KEY,
                                     h.relay_stamper()),
            "unknown-protocol": b"\xffhello",
            "empty": b"",
            "bad-length": good + b"x",
        }
        for reason, data in cases.items():
            self.assertEqual(self.send(data), [], reason)
            self.assertEqual(self.dropped(reason), 1, reason)
            self.assertTrue(any(e.get("reason") == reason for e in h.events), reason)
        # Still serving: a genuine notify is answered.
        self.assertEqual(len(self.send(good)), 1)
        self.assertEqual(h.table.get("dev-1").addr, self.src)

    def test_replayed_notify_dropped(self):
        h = self.h
        good = wire.seal(wire.NotifyA(local=DEVICE_LAN), "dev-1", KEY, h.relay_stamper())
        self.assertEqual(len(self.send(good)), 1)
        self.assertEqual(self.send(good), [])
        self.assertEqual(self.dropped("replay"), 1)

    def test_revoked_device_refused(self):
        h = self.h
        h.table.get("dev-1").revoked = True
        good = wire.seal(wire.NotifyA(local=DEVICE_LAN), "dev-1", KEY, h.relay_stamper())
        self.assertEqual(self.send(good), [])
        self.assertEqual(self.dropped("unknown-key"), 1)

    def test_device_cannot_send_relay_messages(self):
        """A device key does not let one send a connect request to the relay."""
        h = self.h
        req = wire.ConnectRequest(b"S" * 16, b"N" * 16, 1, "x")
        self.assertEqual(self.send(wire.seal(req, "dev-1", KEY, h.relay_stamper())), [])
        self.assertEqual(self.dropped("unknown-key"), 1)

    def test_no_amplification(self):
        """An unpadded (short) request gets no answer larger than itself."""
        h = self.h
        short = wire.seal(wire.PeriodRequest(padding=0), "dev-1", KEY, h.relay_stamper())
        self.assertEqual(self.send(short), [])
        self.assertEqual(self.dropped("would-amplify"), 1)

    def test_log_flood_bounded(self):
        h = self.h
        before = len(h.events)
        for _ in range(1000):
            self.send(b"\xff")
        self.assertEqual(self.dropped("unknown-protocol"), 1000)
        self.assertLessEqual(len(h.events) - before, 10)
        h.advance(61)
        self.send(b"\xff")
        self.assertTrue(any("dropped {n} more" in (e.get("log_format") or "") and e["n"] == 990
                            for e in h.events))

    def test_handler_exception_contained(self):
        h = self.h

        def boom(*a):
            raise RuntimeError("bug")

        h.handler.handle = boom
        good = wire.seal(wire.NotifyA(local=DEVICE_LAN), "dev-1", KEY, h.relay_stamper())
        self.assertEqual(self.send(good), [])
        self.assertEqual(self.dropped("internal-error"), 1)
        self.flushLoggedErrors(RuntimeError)


class ProbeReplayTests(SynchronousTestCase):
    """
    The agent's clock probe (PeriodRequest) is exempt from the freshness
    window, since the device does not know the relay's clock yet; a
    captured one must still never be answered again (issue #9, item 2).
    """

    ATTACKER = ("198.51.100.66", 4444)

    def captured(self, h, cls):
        [data] = [d for d in h.sent(cls)][:1]
        return data

    def replay(self, h, data):
        h.relay.transport.written.clear()
        h.relay.datagramReceived(data, self.ATTACKER)
        return h.relay.transport.written

    def dropped(self, h, reason):
        return h.relay_metrics.value("p2pnat_udp_dropped_total", reason=reason)

    def test_captured_period_request_never_answered_again(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        self.assertEqual(h.notifier.period, 300)
        request = self.captured(h, wire.PeriodRequest)
        self.assertEqual(self.replay(h, request), [])
        h.clock.advance(86400)  # a day later, out of any window
        self.assertEqual(self.replay(h, request), [])
        self.assertEqual(self.dropped(h, "probe-replay"), 2)

    def test_captured_ping_never_answered_again(self):
        h = Harness(self)
        ping = wire.seal(wire.Ping(), "dev-1", KEY, wire.Stamper(h.device_clock).probe())
        h.relay.transport.written.clear()
        h.relay.datagramReceived(ping, DEVICE_PUBLIC)
        [(answer, to)] = h.relay.transport.written
        self.assertEqual(to, DEVICE_PUBLIC)
        self.assertIsInstance(wire.unseal(answer, lambda k, t: KEY)[1], wire.Pong)
        self.assertEqual(self.replay(h, ping), [])
        h.clock.advance(86400)
        self.assertEqual(self.replay(h, ping), [])

    def test_agent_restarting_with_its_clock_back_recovers(self):
        """
        The device rebooted with its clock at 1970 (no battery-backed
        clock): its probes are below the relay's mark, and it catches up
        in bounded time, not in 56 years.
        """
        h = Harness(self)
        h.notifier.start(h.agent)
        h.notifier.stop()
        h.table.get("dev-1").last_access = None
        h.device_clock = Clock()
        h.device_clock.advance(1)
        h.notifier = Notifier("dev-1", KEY, RELAY, h.device_clock)
        h.agent.handler = h.notifier
        h.agent.clock = h.device_clock
        h.agent.replay = h.notifier.replay
        h.agent.stamper = h.notifier.stamper
        self.addCleanup(h.notifier.stop)
        h.notifier.start(h.agent)
        h.advance(240)  # retries at 1, 2, 4 ... 30 s
        self.assertEqual(h.notifier.period, 300)
        self.assertGreater(self.dropped(h, "probe-replay"), 0)
        # And in step with the relay's clock: its notifies are accepted.
        self.assertIsNotNone(h.table.get("dev-1").last_access)
        self.assertEqual(self.dropped(h, "stale"), 0)


class RacedNotifyTests(SynchronousTestCase):
    """
    Issue #9, item 13a: someone who sees the device's notify sends a copy
    from another (spoofed) source that reaches the relay first.  Confirmed:
    the copy is accepted, the genuine notify is then a replay, and the
    relay's idea of the device's address (where connect requests go) is
    the copy's source.  The relay now notices the genuine notify arriving
    as a duplicate from elsewhere and asks both addresses for a fresh
    notify A, so the device takes its address back within a round trip,
    not at its next notify.
    """

    COPY_FROM = ("198.51.100.66", 4444)

    def race(self, h, cls):
        """Let the device's next C{cls} be overtaken by a copy from L{COPY_FROM}."""
        raced = []

        def overtake(data, src, dst):
            if dst == RELAY and data[2] == cls.TYPE and not raced:
                raced.append(data)
                h.relay.datagramReceived(data, self.COPY_FROM)
            return False

        h.net.drop = overtake
        return raced

    def test_copy_overtaking_a_notify_a(self):
        h = Harness(self)
        moved = []
        h.handler.on_moved = moved.append
        h.notifier.start(h.agent)
        raced = self.race(h, wire.NotifyA)
        h.notifier.notify_a()
        self.assertEqual(len(raced), 1)
        # The copy moved the device for a moment ...
        self.assertEqual(moved, ["dev-1", "dev-1"])
        self.assertEqual(h.relay_metrics.value("p2pnat_udp_dropped_total", reason="replay"), 1)
        # ... but the duplicate from the device's own address made the relay
        # ask for a fresh notify A, which put it back at once.
        d = h.table.get("dev-1")
        self.assertEqual(d.addr, DEVICE_PUBLIC)
        self.assertIs(d.socket, h.relay)
        self.assertEqual(len(h.sent(wire.NotifyA)), 3)

    def test_copy_overtaking_a_notify_b(self):
        h = Harness(self)
        h.notifier.start(h.agent)
        self.race(h, wire.NotifyB)
        h.advance(20)  # the first notify B
        self.assertEqual(h.table.get("dev-1").addr, DEVICE_PUBLIC)

    def test_replayed_copies_ask_once(self):
        """
        Only a duplicate of the latest notify counts, and it gets at most
        one answer per notify: replaying it again reflects nothing.
        """
        h = Harness(self)
        h.notifier.start(h.agent)
        [genuine] = h.sent(wire.NotifyA)
        h.relay.transport.written.clear()
        for _ in range(5):
            h.relay.datagramReceived(genuine, self.COPY_FROM)
        asked = [to for data, to in h.relay.transport.written
                 if wire.unseal(data, lambda k, t: KEY)[1].flags & wire.NEED_NOTIFY_A]
        self.assertEqual(asked, [DEVICE_PUBLIC, self.COPY_FROM])
        # The device answered with a fresh notify A, which settled it.
        self.assertEqual(h.table.get("dev-1").addr, DEVICE_PUBLIC)
        [period] = h.sent(wire.PeriodRequest)
        h.relay.transport.written.clear()
        h.relay.datagramReceived(period, self.COPY_FROM)  # not a notify
        self.assertEqual(h.relay.transport.written, [])
