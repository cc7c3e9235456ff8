"""
Tests for L{p2pnat.protocol.wire}: test vectors, round trips, every rejection.
"""

import hashlib
import hmac
import random
import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import wire

KEY = bytes(range(32))
TS = 1_700_000_000_123_456

# Test vectors: key 00 01 .. 1f, key ID "dev-1", timestamp 1700000000123456 µs.
VECTORS = {
    "notify_a": (
        wire.NotifyA(local=("192.168.1.10", 40000)),
        "0c01120000060a2418202240056465762d31001f049c40c0a8010a00000000000000000000000000"
        "00000000000000000000002704a661ecf3f5e6379e86355c2beeae"),
    "period": (
        wire.Period(300, 25, 1_700_000_000_000_000, 1_700_000_000_000_001),
        "0c01110000060a2418202240056465762d3100180000012c0000001900060a24181e400000060a24"
        "181e40019b06a84787a261d7651548db4e143c3c"),
    "connect": (
        wire.ConnectRequest(bytes(range(16)), bytes(range(16, 32)), 7443, "relay.example.org"),
        "0c01150000060a2418202240056465762d310034000102030405060708090a0b0c0d0e0f10111213"
        "1415161718191a1b1c1d1e1f1d131172656c61792e6578616d706c652e6f7267af60251f34cd57d6"
        "96f2ec542f8bc1e9"),
}


class VectorTests(SynchronousTestCase):
    def test_vectors_encode(self):
        for name, (message, hexdata) in VECTORS.items():
            self.assertEqual(wire.seal(message, "dev-1", KEY, TS).hex(), hexdata, name)

    def test_vectors_decode(self):
        for name, (message, hexdata) in VECTORS.items():
            frame, decoded = wire.unseal(bytes.fromhex(hexdata), lambda k, t: KEY)
            self.assertEqual(decoded, message, name)
            self.assertEqual((frame.key_id, frame.timestamp), ("dev-1", TS))

    def test_layout_by_hand(self):
        """
        The documented layout, checked field by field with struct and hmac
        rather than with the module itself.
        """
        data = bytes.fromhex(VECTORS["notify_a"][1])
        marker, version, mtype, flags, ts, klen = struct.unpack_from("!BBBBQB", data)
        self.assertEqual((marker, version, mtype, flags, ts, klen), (0x0C, 1, 0x12, 0, TS, 5))
        self.assertEqual(data[13:18], b"dev-1")
        (blen,) = struct.unpack_from("!H", data, 18)
        body = data[20:20 + blen]
        self.assertEqual(body[:3], struct.pack("!BH", 4, 40000))
        self.assertEqual(body[3:7], bytes([192, 168, 1, 10]))
        self.assertEqual(len(data), 20 + blen + 16)
        self.assertEqual(data[-16:], hmac.new(KEY, data[:-16], hashlib.sha256).digest()[:16])


class RoundTripTests(SynchronousTestCase):
    MESSAGES = [
        wire.Ping(), wire.Ping(padding=0),
        wire.Pong(5, ("2001:db8::1", 443), 7), wire.Pong(1, ("203.0.113.9", 1), 2),
        wire.PeriodRequest(), wire.Period(60, 20, 3, 4),
        wire.NotifyA(local=("10.0.0.2", 5)), wire.NotifyB(local=("::1", 6)),
        wire.NotifyAck(9, ("198.51.100.1", 65535), wire.NEED_NOTIFY_A),
        wire.ConnectRequest(b"s" * 16, b"n" * 16, 1, ""),
    ]

    def test_round_trip(self):
        for m in self.MESSAGES:
            data = wire.seal(m, "a.b-c_9", KEY, 42)
            frame, decoded = wire.unseal(data, lambda k, t: KEY)
            self.assertEqual(decoded, m)
            self.assertEqual(frame.type, m.TYPE)

    def test_answers_not_larger_than_requests(self):
        """
        With their default padding, requests are at least as large as the
        answers they get, even when the answer carries an IPv6 address and
        the request an IPv4 one: answering never amplifies.
        """
        v6 = ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
        pairs = [
            (wire.Ping(), wire.Pong(1, v6, 2)),
            (wire.PeriodRequest(), wire.Period(1, 2, 3, 4)),
            (wire.NotifyA(local=("10.0.0.1", 1)), wire.NotifyAck(1, v6, 1)),
            (wire.NotifyB(local=("10.0.0.1", 1)), wire.NotifyAck(1, v6, 1)),
        ]
        for request, answer in pairs:
            self.assertLessEqual(len(wire.seal(answer, "d", KEY, 1)),
                                 len(wire.seal(request, "d", KEY, 1)), type(request).__name__)


class RejectionTests(SynchronousTestCase):
    def good(self):
        return bytearray(wire.seal(wire.NotifyB(local=("10.0.0.1", 9)), "dev-1", KEY, TS))

    def reason(self, data, key=KEY):
        with self.assertRaises(wire.WireError) as cm:
            wire.unseal(bytes(data), lambda k, t: key)
        return cm.exception.reason

    def test_truncated(self):
        data = self.good()
        for n in range(len(data)):
            self.assertIn(self.reason(data[:n]), ("truncated", "bad-length"), n)

    def test_oversized(self):
        self.assertEqual(self.reason(self.good() + bytes(wire.MAX_DATAGRAM)), "oversized")

    def test_trailing_bytes(self):
        self.assertEqual(self.reason(self.good() + b"x"), "bad-length")

    def test_marker_version_type(self):
        for offset, value, reason in [(0, 0x0D, "bad-marker"), (1, 2, "bad-version"),
                                      (2, 0xEE, "bad-type")]:
            data = self.good()
            data[offset] = value
            self.assertEqual(self.reason(data), reason)

    def test_key_id(self):
        for kid in (b"-x", b"a b", b"\xff"):
            data = self.good()
            data[13:18] = kid.ljust(5, b"a")
            self.assertIn(self.reason(data), ("bad-key-id",))

    def test_every_bit_flip_refused(self):
        """Flipping any single bit makes the frame fail somewhere."""
        data = self.good()
        for i in range(len(data) * 8):
            bad = bytearray(data)
            bad[i // 8] ^= 1 << (i % 8)
            self.assertRaises(wire.WireError, wire.unseal, bytes(bad), lambda k, t: KEY)

    def test_wrong_key(self):
        self.assertEqual(self.reason(self.good(), key=bytes(32)), "bad-mac")

    def test_unknown_key(self):
        self.assertEqual(self.reason(self.good(), key=None), "unknown-key")

    def test_nonzero_padding(self):
        m = wire.PeriodRequest()
        data = bytearray(wire.seal(m, "d", KEY, 1))
        body_at = 13 + 1 + 2
        data[body_at] = 1
        data[-16:] = wire.mac(KEY, bytes(data[:-16]))
        self.assertEqual(self.reason(data), "bad-body")

    def test_garbage_only_wire_errors(self):
        """Random and mutated input raises WireError and nothing else."""
        rnd = random.Random(1234)
        base = bytes(self.good())
        for _ in range(3000):
            kind = rnd.random()
            if kind < 0.3:
                data = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 80)))
            else:
                data = bytearray(base)
                for _ in range(rnd.randrange(1, 6)):
                    data[rnd.randrange(len(data))] = rnd.getrandbits(8)
                data = bytes(data[:rnd.randrange(len(data) + 1)])
            try:
                wire.unseal(data, lambda k, t: KEY)
            except wire.WireError:
                pass

    def test_seal_refuses_bad_key_id_and_oversize(self):
        self.assertRaises(wire.WireError, wire.seal, wire.Ping(), "bad id", KEY, 1)
        self.assertRaises(wire.WireError, wire.seal, wire.Ping(padding=2000), "d", KEY, 1)


class ReplayGuardTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.guard = wire.ReplayGuard(self.clock, window=60, max_keys=3)
        self.now = 1000 * 1_000_000

    def test_fresh_then_replay(self):
        self.assertIsNone(self.guard.check("a", self.now))
        self.assertEqual(self.guard.check("a", self.now), "replay")
        self.assertEqual(self.guard.check("a", self.now - 1), "replay")
        self.assertIsNone(self.guard.check("a", self.now + 1))

    def test_keys_independent(self):
        self.assertIsNone(self.guard.check("a", self.now))
        self.assertIsNone(self.guard.check("b", self.now))

    def test_stale_both_ways(self):
        self.assertEqual(self.guard.check("a", self.now - 61_000_000), "stale")
        self.assertEqual(self.guard.check("a", self.now + 61_000_000), "stale")
        self.assertIsNone(self.guard.check("a", self.now - 59_000_000))

    def test_probe_answered_once_whatever_its_age(self):
        """
        A clock probe is exempt from the window (its sender does not know
        our clock) but answered only above the highest probe accepted for
        its key: a captured probe is never answered again.
        """
        self.assertIsNone(self.guard.check_probe("a", 5))  # a clock at 1970
        self.assertEqual(self.guard.check_probe("a", 5), "probe-replay")
        self.assertEqual(self.guard.check_probe("a", 4), "probe-replay")
        self.assertIsNone(self.guard.check_probe("a", 6))
        self.assertIsNone(self.guard.check_probe("b", 5))
        # Probes and ordinary frames are checked apart: neither moves the other.
        self.assertIsNone(self.guard.check("a", self.now))
        self.assertIsNone(self.guard.check_probe("a", 7))
        self.assertEqual(self.guard.check("a", self.now), "replay")

    def test_admit_by_kind(self):
        admit = self.guard.admit
        self.assertIsNone(admit(wire.PeriodRequest, "a", 5))
        self.assertEqual(admit(wire.PeriodRequest, "a", 5), "probe-replay")
        self.assertEqual(admit(wire.NotifyA, "a", 5), "stale")
        # An answer's echo is the handler's to check.
        self.assertIsNone(admit(wire.Period, "a", 5))
        self.assertIsNone(admit(wire.Period, "a", 5))

    def test_bounded(self):
        for k in "abcde":
            self.guard.check(k, self.now)
        self.assertEqual(len(self.guard._last), 3)
        # A forgotten key's old frame is still caught by ordering only if
        # remembered; the window keeps it bounded in time.
        self.assertIsNone(self.guard.check("a", self.now))
        for k in "abcde":
            self.guard.check_probe(k, 1)
        self.assertEqual(len(self.guard._probes), 3)


class StamperTests(SynchronousTestCase):
    def test_strictly_increasing_even_if_clock_stalls(self):
        clock = Clock()
        s = wire.Stamper(clock)
        stamps = [s() for _ in range(5)]
        self.assertEqual(stamps, sorted(set(stamps)))

    def test_sync_offset(self):
        clock = Clock()
        clock.advance(100)
        s = wire.Stamper(clock)
        # Sent at 100, answered at 102, server said 500 at mid-flight (101).
        s.sync(100.0, 102.0, 500_000_000)
        self.assertAlmostEqual(s.offset, 399.0)
        self.assertEqual(s(), 499_000_000)

    def test_probe_counter_ignores_the_offset(self):
        """Learning the receiver's clock never makes a probe look older than one sent."""
        clock = Clock()
        clock.advance(1000)
        s = wire.Stamper(clock)
        first = s.probe()
        s.sync(1000.0, 1000.0, 10_000_000)  # the receiver's clock is 990 s behind ours
        self.assertEqual(s.probe(), first + 1)
        self.assertEqual(s(), 10_000_000)

    def test_probe_catches_up_in_bounded_steps(self):
        """
        A sender whose clock went back 56 years (a device booting at 1970)
        gets over the receiver's mark in a bounded number of probes; the
        probes it could not send do not count.
        """
        clock = Clock()
        guard = wire.ReplayGuard(clock)
        now = 1_700_000_000
        self.assertIsNone(guard.check_probe("d", now * 1_000_000))
        clock.advance(1)  # the device rebooted at 1970 (1 s after the epoch)
        s = wire.Stamper(clock)
        s.probe()
        s.probe_unsent()  # no route yet: not an unanswered probe
        sent = 1
        while guard.check_probe("d", s.probe()) is not None:
            sent += 1
            self.assertLess(sent, 16)
        # Three plain, then 1 s, 16 s ... 2**28 s (8.5 years) ahead, then 2**32 s.
        self.assertEqual(sent, 3 + 9)
        # Answered: the next probes are plain again.
        s.sync(0.0, 0.0, now * 1_000_000)
        self.assertEqual(s.probe() - s._last_probe, 0)
        self.assertLess(s.probe(), (now + 2 ** 32 + 2) * 1_000_000)

    def test_sync_backwards_resets(self):
        clock = Clock()
        clock.advance(1000)
        s = wire.Stamper(clock)
        s()
        s.sync(1000.0, 1000.0, 10_000_000)  # the receiver's clock is 990 s behind ours
        self.assertEqual(s(), 10_000_000)


class OptimisticStampTests(SynchronousTestCase):
    """
    A login stamped on a guessed clock (ours) before the receiver's clock
    is known: after L{wire.Stamper.sync}, the next stamps are accepted
    whether or not the receiver accepted the guessed one.
    """

    def exchange(self, skew):
        """
        Our clock is C{skew} seconds ahead of the receiver's: one stamp on
        our own clock, then a 20 ms exchange that tells the receiver's
        clock, then keepalives.  The receiver's verdicts on each.
        """
        ours, theirs = Clock(), Clock()
        theirs.advance(1_700_000_000)
        ours.advance(1_700_000_000 + skew)
        guard = wire.ReplayGuard(theirs)
        s = wire.Stamper(ours)
        verdicts = [guard.check("c", s())]  # the optimistic login
        sent = ours.seconds()
        ours.advance(0.01)
        theirs.advance(0.01)
        server_time = int(theirs.seconds() * 1_000_000)
        ours.advance(0.01)
        theirs.advance(0.01)
        s.sync(sent, ours.seconds(), server_time)
        self.assertAlmostEqual(s.offset, -skew, places=3)
        for _ in range(3):  # the next login or keepalives, a second apart
            verdicts.append(guard.check("c", s()))
            ours.advance(1)
            theirs.advance(1)
        return verdicts, s

    def test_clock_ahead_within_the_window(self):
        """
        30 s ahead: the receiver accepted the guessed stamp, so later stamps
        stay above it (before, they stepped back and were replays for 30 s).
        """
        verdicts, _ = self.exchange(30)
        self.assertEqual(verdicts, [None, None, None, None])

    def test_clock_behind_within_the_window(self):
        verdicts, s = self.exchange(-30)
        self.assertEqual(verdicts, [None, None, None, None])

    def test_clock_two_minutes_ahead(self):
        """
        Beyond the window: the guessed stamp was refused, and the next ones
        step back onto the receiver's clock instead of staying stale.
        """
        verdicts, s = self.exchange(120)
        self.assertEqual(verdicts, ["stale", None, None, None])
        self.assertLess(abs(s() / 1_000_000 - s.seconds()), 0.01)

    def test_clock_two_minutes_behind(self):
        verdicts, _ = self.exchange(-120)
        self.assertEqual(verdicts, ["stale", None, None, None])

    def test_step_back_only_beyond_the_window_and_the_error(self):
        """
        A stamp just within the window plus the exchange's uncertainty (half
        its round trip) may have been accepted: it is kept.
        """
        clock = Clock()
        clock.advance(1000)
        s = wire.Stamper(clock)
        s._last = int((1000 + 60.05) * 1_000_000)
        s.sync(999.9, 1000.0, 1000 * 1_000_000 - 50_000)  # receiver = ours, 0.1 s exchange
        self.assertGreater(s(), int(1060 * 1_000_000))
        s._last = int((1000 + 60.1) * 1_000_000)
        s.sync(999.99, 1000.0, 1000 * 1_000_000 - 5_000)  # a 10 ms exchange
        self.assertLess(s(), int(1001 * 1_000_000))


class AddressTests(SynchronousTestCase):
    def test_pack_unpack(self):
        for addr in [("1.2.3.4", 0), ("::", 65535), ("fe80::1", 80)]:
            self.assertEqual(wire.unpack_addr(wire.pack_addr(*addr))[0], addr)

    def test_bad_family(self):
        self.assertRaises(wire.WireError, wire.unpack_addr, b"\x05\x00\x01" + bytes(16))
