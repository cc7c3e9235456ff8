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


class NotifyFlagsTests(SynchronousTestCase):
    def test_direct_capability_reaches_the_relay(self):
        """
        The handler tells C{on_flags} each authenticated notify's frame
        flags: a device that takes direct requests says so with every
        notify, and one that stops taking them stops saying so.
        """
        h = Harness(self)
        told = []
        h.handler.on_flags = lambda device_id, flags: told.append((device_id, flags))
        h.notifier.take_direct(lambda request, addr: None)
        h.notifier.start(h.agent)
        h.advance(40)
        self.assertTrue(told)
        self.assertTrue(all(i == "dev-1" and f & wire.DIRECT_CAPABLE for i, f in told))
        h.notifier.take_direct(None)
        del told[:]
        h.advance(40)
        self.assertTrue(told)
        self.assertFalse(any(f & wire.DIRECT_CAPABLE for _, f in told))


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


MAPPED = ("203.0.113.5", 45000)  # what the device's gateway granted by port mapping


class NotifyMappedCodecTests(SynchronousTestCase):
    """The optional port-mapped address of a notify (L{wire.Notify.mapped})."""

    def test_without_mapped_the_old_bytes(self):
        """
        A notify with no mapped address is byte for byte the one devices
        sent before port mapping (the local address, then 24 zero bytes),
        and those bytes still decode, with no mapped address.
        """
        for cls in (wire.NotifyA, wire.NotifyB):
            for local in (DEVICE_LAN, ("2001:db8::2", 7)):
                old = wire.pack_addr(*local) + bytes(24)
                self.assertEqual(cls(local=local).encode_body(), old)
                decoded = cls.decode_body(old)
                self.assertEqual((decoded.local, decoded.mapped), (local, None))
                self.assertEqual(cls.decode_body(wire.pack_addr(*local)).mapped, None)

    def test_mapped_round_trip(self):
        for cls in (wire.NotifyA, wire.NotifyB):
            for mapped in (MAPPED, ("2001:db8::5", 1)):
                sent = cls(local=DEVICE_LAN, mapped=mapped)
                data = wire.seal(sent, "dev-1", KEY, 1)
                self.assertEqual(wire.unseal(data, lambda k, t: KEY)[1], sent)

    def test_malformed_mapped_refused(self):
        local = wire.pack_addr(*DEVICE_LAN)
        mapped = wire.pack_addr(*MAPPED)
        for body in (local + b"\x05" + bytes(24),  # no such family
                     local + mapped[:5],  # truncated
                     local + mapped + b"\x01" + bytes(3),  # padding must be zero
                     local + mapped + mapped):  # at most one
            with self.assertRaises(wire.WireError) as e:
                wire.NotifyA.decode_body(body)
            self.assertEqual(e.exception.reason, "bad-body")

    def test_mapped_under_the_mac(self):
        data = bytearray(wire.seal(wire.NotifyB(local=DEVICE_LAN, mapped=MAPPED), "dev-1",
                                   KEY, 1))
        data[data.index(wire.pack_addr(*MAPPED)) + 2] ^= 1  # another port
        with self.assertRaises(wire.WireError) as e:
            wire.unseal(bytes(data), lambda k, t: KEY)
        self.assertEqual(e.exception.reason, "bad-mac")


class UsableMappedTests(SynchronousTestCase):
    """Which port-mapped addresses the relay sends to (L{devices.usable_mapped})."""

    def test_kept(self):
        from p2pnat.relay.devices import usable_mapped
        for observed, mapped, kept in [
                (DEVICE_PUBLIC, MAPPED, MAPPED),
                (("8.8.4.4", 9), ("8.8.4.4", 10), ("8.8.4.4", 10)),
                (("::ffff:203.0.113.5", 9), MAPPED, ("::ffff:203.0.113.5", MAPPED[1])),
                (("2001:db8::1", 9), ("2001:db8::2", 10), ("2001:db8::2", 10)),
                (("127.0.0.1", 9), ("127.0.0.1", 10), ("127.0.0.1", 10))]:
            self.assertEqual(usable_mapped(observed, mapped), kept, (observed, mapped))

    def test_refused(self):
        from p2pnat.relay.devices import usable_mapped
        for observed, mapped in [
                (DEVICE_PUBLIC, None),
                (DEVICE_PUBLIC, DEVICE_PUBLIC),  # one copy is enough
                (("::ffff:203.0.113.5", 61000), DEVICE_PUBLIC),
                (DEVICE_PUBLIC, ("203.0.113.5", 0)),
                (DEVICE_PUBLIC, ("0.0.0.0", 9)),
                (DEVICE_PUBLIC, ("224.0.0.1", 9)),
                (DEVICE_PUBLIC, ("255.255.255.255", 9)),
                (DEVICE_PUBLIC, ("127.0.0.1", 9)),
                (DEVICE_PUBLIC, ("169.254.1.1", 9)),
                (("8.8.4.4", 9), ("10.0.0.1", 9)),  # more local than where it came from
                (("8.8.4.4", 9), ("100.64.0.1", 9)),
                (DEVICE_PUBLIC, ("2001:db8::2", 10)),  # not from this socket
                (("2001:db8::1", 9), MAPPED),
                (("::ffff:203.0.113.5", 9), ("2001:db8::2", 10))]:
            self.assertIsNone(usable_mapped(observed, mapped), (observed, mapped))


class MappedAddressTests(SynchronousTestCase):
    """
    The relay keeps the port-mapped address a device's notifies tell, and
    sends each connect request there as well as to the notifies' source:
    a device whose NAT dropped the notifies' mapping early is still
    reached through the mapping its gateway granted.
    """

    def setUp(self):
        from p2pnat.deployment.registry import Registry
        from p2pnat.relay.core import Relay, synchronous
        from p2pnat.relay.http import Tokens

        self.h = h = Harness(self)
        registry = Registry(":memory:")
        self.addCleanup(registry.close)
        self.core = Relay(h.clock, Metrics("relay"), h.table, registry,
                          Tokens(b"s" * 32, h.clock), hostname="relay.test", tunnel_port=7443,
                          run_blocking=synchronous)
        self.moved = []
        h.handler.on_moved = self.moved.append

    def start(self, mapped=MAPPED):
        h = self.h
        h.notifier.set_mapped(mapped)
        h.notifier.start(h.agent)
        return h.table.get("dev-1")

    def connect_requests(self):
        return [(data, to) for data, to in self.h.relay.transport.written
                if data[2] == wire.ConnectRequest.TYPE]

    def test_recorded_from_notifies(self):
        """
        The first notify A, sent before the relay said it takes a mapped
        address, leaves it out; its ack (L{wire.TAKES_MAPPED}) makes the
        agent tell it at once with a notify B, and every notify after.
        """
        h = self.h
        d = self.start()
        [first, *later] = [wire.unseal(data, lambda k, t: KEY)[1]
                           for data in h.sent(wire.NotifyA) + h.sent(wire.NotifyB)]
        self.assertIsNone(first.mapped)
        self.assertEqual([m.mapped for m in later], [MAPPED])
        self.assertEqual(d.mapped, MAPPED)
        self.assertEqual(d.targets(), (DEVICE_PUBLIC, MAPPED))
        h.advance(120)
        told = [wire.unseal(data, lambda k, t: KEY)[1].mapped
                for data in h.sent(wire.NotifyA) + h.sent(wire.NotifyB)]
        self.assertEqual(told[1:], [MAPPED] * (len(told) - 1))
        self.assertEqual(self.moved, [])

    def test_change_and_loss_told_without_store_writes(self):
        """
        A new mapped address, or its loss, is a change: a notify B tells
        it at once, the relay answers it, and still writes nothing to the
        store; a notify B that tells the same one is not answered.
        """
        h = self.h
        d = self.start()
        h.advance(25)  # past the first notify B
        h.table.take_pending()
        acks = len(h.sent(wire.NotifyAck))
        h.advance(20)
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks)  # the same: no answer
        h.notifier.set_mapped(("203.0.113.5", 45001))
        self.assertEqual(d.mapped, ("203.0.113.5", 45001))
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks + 1)
        h.notifier.set_mapped(None)
        self.assertIsNone(d.mapped)
        self.assertEqual(d.targets(), (DEVICE_PUBLIC,))
        self.assertEqual(len(h.sent(wire.NotifyAck)), acks + 2)
        self.assertEqual(h.table.take_pending(), {})
        self.assertEqual(self.moved, [])
        self.assertTrue(any("no port-mapped address" in (e.get("log_format") or "")
                            for e in h.events))

    def test_connect_request_sent_to_both(self):
        """
        The same datagram, no larger than before, to the notifies' source
        and to the mapped address; the agent acts on the first copy only.
        """
        h = self.h
        self.start()
        self.core.request_tunnel("dev-1")
        [(one, to_one), (two, to_two)] = self.connect_requests()
        self.assertEqual((to_one, to_two), (DEVICE_PUBLIC, MAPPED))
        self.assertEqual(one, two)
        frame, message = wire.unseal(one, lambda k, t: KEY)
        alone = wire.seal(message, "dev-1", KEY, frame.timestamp)
        self.assertEqual(len(one), len(alone))
        self.assertEqual(len(h.connects), 1)  # the copy to the observed address
        h.agent.datagramReceived(two, RELAY)  # the gateway forwards the other
        self.assertEqual(len(h.connects), 1)
        # Retransmissions go to both too.
        h.relay.transport.written.clear()
        h.clock.advance(0.25)
        self.assertEqual([to for _, to in self.connect_requests()], [DEVICE_PUBLIC, MAPPED])

    def test_reached_when_the_notify_mapping_is_gone(self):
        h = self.h
        self.start()

        def nat_forgot_notify_mapping(data, src, dst):
            if dst == MAPPED:  # the gateway's port mapping forwards it
                h.agent.datagramReceived(data, src)
            return dst in (DEVICE_PUBLIC, MAPPED)

        h.net.drop = nat_forgot_notify_mapping
        self.core.request_tunnel("dev-1")
        self.assertEqual(len(h.connects), 1)

    def test_without_mapping_one_copy(self):
        h = self.h
        d = self.start(mapped=None)
        self.assertIsNone(d.mapped)
        self.core.request_tunnel("dev-1")
        self.assertEqual([to for _, to in self.connect_requests()], [DEVICE_PUBLIC])
        self.assertEqual(len(h.connects), 1)  # and the agent acted on it

    def test_forged_or_replayed_never_recorded(self):
        """
        Only an authenticated, fresh notify sets the mapped address: a
        forged one (wrong key), one for an unknown device, and a replayed
        copy from elsewhere are all dropped without touching it.
        """
        h = self.h
        d = self.start()
        evil = ("198.51.100.66", 4444)
        for data in (wire.seal(wire.NotifyA(local=DEVICE_LAN, mapped=evil), "dev-1",
                               bytes(32), h.relay_stamper()),
                     wire.seal(wire.NotifyB(local=DEVICE_LAN, mapped=evil), "dev-2", KEY,
                               h.relay_stamper())):
            h.relay.datagramReceived(data, evil)
        self.assertEqual(d.mapped, MAPPED)
        # A genuine notify B that told no mapped address, replayed later:
        # the relay refuses it, so the address it would clear stays.
        h.notifier.set_mapped(None)
        [genuine] = h.sent(wire.NotifyB)[-1:]
        h.notifier.set_mapped(MAPPED)
        self.assertEqual(d.mapped, MAPPED)
        h.relay.datagramReceived(genuine, DEVICE_PUBLIC)
        self.assertEqual(d.mapped, MAPPED)
        self.assertEqual(h.relay_metrics.value("p2pnat_udp_dropped_total", reason="replay"), 1)
        self.assertEqual(h.relay_metrics.value("p2pnat_udp_dropped_total", reason="bad-mac"), 1)

    def test_refused_address_not_recorded(self):
        h = self.h
        d = self.start(mapped=("127.0.0.1", 22))
        self.assertIsNone(d.mapped)
        self.assertEqual(d.targets(), (DEVICE_PUBLIC,))
        self.assertTrue(any("does not send to" in (e.get("log_format") or "")
                            for e in h.events))

    def test_kept_when_the_store_reloads(self):
        h = self.h
        self.start()
        h.table.put(DeviceState("dev-1", KEY))
        self.assertEqual(h.table.get("dev-1").mapped, MAPPED)


    def test_kept_through_a_raced_notify(self):
        """
        A copy of the device's notify from elsewhere makes the relay ask
        for a fresh notify A (L{RacedNotifyTests}); that ask, too, says the
        relay takes the mapped address, so the fresh notify A tells it.
        """
        h = self.h
        d = self.start()
        [genuine] = h.sent(wire.NotifyB)[-1:]
        h.relay.transport.written.clear()
        h.relay.datagramReceived(genuine, ("198.51.100.66", 4444))
        self.assertTrue(all(wire.unseal(data, lambda k, t: KEY)[1].flags & wire.TAKES_MAPPED
                            for data, to in h.relay.transport.written))
        last_a = wire.unseal(h.sent(wire.NotifyA)[-1], lambda k, t: KEY)[1]
        self.assertEqual(last_a.mapped, MAPPED)
        self.assertEqual(d.mapped, MAPPED)

class OlderRelayTests(SynchronousTestCase):
    """
    An agent never tells its mapped address to a relay that did not say it
    takes one: an older relay refuses such a notify as a bad body.
    """

    def older_relay(self, h):
        """Make the relay answer as one that knows nothing of port mapping."""
        handle = h.handler.handle

        def old_handle(frame, message, addr, proto):
            if isinstance(message, (wire.NotifyA, wire.NotifyB)) and message.mapped:
                h.relay.drop("bad-body", addr)
                return None
            reply = handle(frame, message, addr, proto)
            if isinstance(reply, wire.NotifyAck):
                reply.flags &= ~wire.TAKES_MAPPED
            return reply

        h.handler.handle = old_handle

    def test_older_relay_never_told(self):
        h = Harness(self)
        self.older_relay(h)
        h.notifier.set_mapped(MAPPED)
        h.notifier.start(h.agent)
        h.advance(300)
        told = [wire.unseal(data, lambda k, t: KEY)[1].mapped
                for data in h.sent(wire.NotifyA) + h.sent(wire.NotifyB)]
        self.assertEqual(set(told), {None})
        self.assertEqual(h.relay_metrics.value("p2pnat_udp_dropped_total", reason="bad-body"),
                         0)
        self.assertEqual(h.clock.seconds() - h.table.get("dev-1").last_access, 0)

    def test_relay_replaced_by_an_older_one(self):
        """
        The relay took the mapped address, then an older one answers at its
        address: the notify A that told it goes unanswered, so the next
        leaves it out, and the device stays online.
        """
        h = Harness(self)
        h.notifier.set_mapped(MAPPED)
        h.notifier.start(h.agent)
        self.assertEqual(h.table.get("dev-1").mapped, MAPPED)
        self.older_relay(h)
        h.advance(300)
        self.assertLessEqual(h.clock.seconds() - h.table.get("dev-1").last_access, 100)
        last_a = wire.unseal(h.sent(wire.NotifyA)[-1], lambda k, t: KEY)[1]
        self.assertIsNone(last_a.mapped)

