"""
Tests for p2pnat.protocol.stun: RFC 5769 test vectors, round trips, malformed input
(fuzzed) and the Binding server and client rules. No sockets.
"""

import os
import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import stun
from p2pnat.protocol.stun import Attr, MessageClass, Method, StunError

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is in the test extras; fall back to random
    given = None


def h(text: str) -> bytes:
    """Hex as RFC 5769 prints it (spaces, line breaks) to bytes."""
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2, byte for byte (padding of SOFTWARE/USERNAME in 2.1-2.3
# is 0x20, as printed in the RFC). The MESSAGE-INTEGRITY and FINGERPRINT
# checks below would fail on any mistyped byte.
SAMPLE_REQUEST = h(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
SAMPLE_IPV4_RESPONSE = h(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
SAMPLE_IPV6_RESPONSE = h(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
SAMPLE_LONG_TERM_REQUEST = h(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
    53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)
VECTORS = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM_REQUEST]
TXID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
PRIORITY = 0x0024
ICE_CONTROLLED = 0x8029

# What Debian's `stun` (0.97) sends first: a cookie-less Binding request with
# a 128-bit id and CHANGE-REQUEST 0 (as captured against our server).
DEBIAN_STUN_TEST1 = h("0001000801a4287e30986f41f8607c0d83cb1b250003000400000000")


def classic_request(change=None, tid=None):
    tid = tid or bytes(range(0x10, 0x20))
    attrs = []
    if change is not None:
        attrs.append((Attr.CHANGE_REQUEST, struct.pack("!I", change)))
    return stun.encode_message(stun.Message(Method.BINDING, MessageClass.REQUEST, tid, attrs))


def request(*attrs, fingerprint=False, tid=TXID):
    return stun.encode_message(
        stun.Message(Method.BINDING, MessageClass.REQUEST, tid, list(attrs)),
        fingerprint=fingerprint,
    )


class RFC5769Tests(SynchronousTestCase):
    """The test vectors of RFC 5769 section 2."""

    def test_sample_request(self):
        msg = stun.parse_message(SAMPLE_REQUEST)
        self.assertEqual((msg.method, msg.msg_class), (Method.BINDING, MessageClass.REQUEST))
        self.assertEqual(msg.transaction_id, TXID)
        self.assertFalse(msg.classic)
        self.assertEqual(stun.decode_text(msg.get(Attr.SOFTWARE)), "STUN test client")
        self.assertEqual(stun.decode_text(msg.get(Attr.USERNAME)), "evtj:h6vY")
        self.assertEqual(msg.get(PRIORITY), h("6e 00 01 ff"))
        self.assertEqual(msg.get(ICE_CONTROLLED), h("93 2f f9 b1 51 26 3b 36"))
        self.assertEqual(msg.types(), [Attr.SOFTWARE, PRIORITY, ICE_CONTROLLED, Attr.USERNAME])
        self.assertTrue(msg.has_fingerprint)
        key = stun.short_term_key(SHORT_TERM_PASSWORD)
        self.assertTrue(stun.verify_integrity(msg, key))
        self.assertFalse(stun.verify_integrity(msg, b"VOkJxbRl1RmTxUk/WvJxBT"))

    def test_sample_request_reencoded(self):
        """
        Re-encoding pads with zeros where the RFC padded with spaces, so the
        bytes differ but the integrity covers our bytes and verifies.
        """
        msg = stun.parse_message(SAMPLE_REQUEST)
        key = stun.short_term_key(SHORT_TERM_PASSWORD)
        again = stun.encode_message(
            stun.Message(msg.method, msg.msg_class, msg.transaction_id, msg.attributes),
            integrity_key=key,
            fingerprint=True,
        )
        self.assertEqual(len(again), len(SAMPLE_REQUEST))
        parsed = stun.parse_message(again)
        self.assertEqual(parsed.attributes, msg.attributes)
        self.assertTrue(stun.verify_integrity(parsed, key))

    def test_sample_ipv4_response(self):
        msg = stun.parse_message(SAMPLE_IPV4_RESPONSE)
        self.assertEqual((msg.method, msg.msg_class), (Method.BINDING, MessageClass.SUCCESS))
        self.assertEqual(stun.decode_text(msg.get(Attr.SOFTWARE)), "test vector")
        xma = msg.get(Attr.XOR_MAPPED_ADDRESS)
        self.assertEqual(stun.decode_xor_address(xma, msg.xor_key), ("192.0.2.1", 32853))
        self.assertEqual(stun.encode_xor_address("192.0.2.1", 32853, msg.xor_key), xma)
        self.assertTrue(stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD)))
        self.assertTrue(msg.has_fingerprint)
        result = stun.parse_binding_response(SAMPLE_IPV4_RESPONSE, TXID)
        self.assertEqual(result, stun.BindingResult(("192.0.2.1", 32853)))

    def test_sample_ipv6_response(self):
        msg = stun.parse_message(SAMPLE_IPV6_RESPONSE)
        mapped = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
        xma = msg.get(Attr.XOR_MAPPED_ADDRESS)
        self.assertEqual(stun.decode_xor_address(xma, msg.xor_key), mapped)
        self.assertEqual(stun.encode_xor_address(*mapped, msg.xor_key), xma)
        self.assertTrue(stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD)))
        self.assertTrue(msg.has_fingerprint)
        self.assertEqual(stun.parse_binding_response(SAMPLE_IPV6_RESPONSE, TXID).mapped, mapped)

    def test_sample_long_term_request(self):
        """
        2.4: USERNAME "<U+30DE><U+30C8><U+30EA><U+30C3><U+30AF><U+30B9>",
        REALM "example.org", password "The<U+00AD>M<U+00AA>tr<U+2168>",
        which SASLprep turns into "TheMatrIX". No FINGERPRINT.
        """
        msg = stun.parse_message(SAMPLE_LONG_TERM_REQUEST)
        username = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
        self.assertEqual(username, "マトリックス")
        self.assertEqual(stun.decode_text(msg.get(Attr.USERNAME)), username)
        self.assertEqual(msg.get(Attr.NONCE), b"f//499k954d6OL34oL9FSTvy64sA")
        self.assertEqual(stun.decode_text(msg.get(Attr.REALM)), "example.org")
        self.assertFalse(msg.has_fingerprint)
        self.assertEqual(stun.saslprep("The\u00adM\u00aatr\u2168"), "TheMatrIX")
        key = stun.long_term_key(username, "example.org", "TheMatrIX")
        self.assertEqual(key, stun.long_term_key(username, "example.org", "The\u00adM\u00aatr\u2168"))
        self.assertTrue(stun.verify_integrity(msg, key))
        self.assertFalse(stun.verify_integrity(msg, stun.long_term_key(username, "example.org", "thematrix")))
        # Zero padding here, so it re-encodes byte for byte.
        again = stun.encode_message(
            stun.Message(msg.method, msg.msg_class, msg.transaction_id, msg.attributes),
            integrity_key=key,
        )
        self.assertEqual(again, SAMPLE_LONG_TERM_REQUEST)

    def test_tampered_vectors(self):
        """One flipped bit in the body breaks FINGERPRINT (or MESSAGE-INTEGRITY)."""
        key = stun.short_term_key(SHORT_TERM_PASSWORD)
        for vector in (SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE):
            bad = bytearray(vector)
            bad[30] ^= 0x01
            with self.assertRaises(StunError) as cm:
                stun.parse_message(bytes(bad))
            self.assertEqual(cm.exception.reason, "bad-fingerprint")
        bad = bytearray(SAMPLE_LONG_TERM_REQUEST)
        bad[30] ^= 0x01
        msg = stun.parse_message(bytes(bad))
        lt = stun.long_term_key("マトリックス", "example.org", "TheMatrIX")
        self.assertFalse(stun.verify_integrity(msg, lt))
        self.assertFalse(stun.verify_integrity(msg, key))


class CodecTests(SynchronousTestCase):
    def test_message_types(self):
        table = [
            (Method.BINDING, MessageClass.REQUEST, 0x0001),
            (Method.BINDING, MessageClass.INDICATION, 0x0011),
            (Method.BINDING, MessageClass.SUCCESS, 0x0101),
            (Method.BINDING, MessageClass.ERROR, 0x0111),
            (0x003, MessageClass.REQUEST, 0x0003),  # TURN Allocate
            (0xFFF, MessageClass.ERROR, 0x3FFF),
            (0x0AB, MessageClass.SUCCESS, 0x034B),
        ]
        for method, cls, mtype in table:
            self.assertEqual(stun.message_type(method, cls), mtype)
            self.assertEqual(stun.split_message_type(mtype), (method, cls))
        for method in range(0x1000):
            for cls in MessageClass:
                self.assertEqual(stun.split_message_type(stun.message_type(method, cls)), (method, cls))
        self.assertRaises(ValueError, stun.message_type, 0x1000, 0)

    def test_round_trip_all_extras(self):
        tid = os.urandom(12)
        attrs = [
            (Attr.USERNAME, "user:name".encode()),
            (Attr.SOFTWARE, b"p2pnat"),
            (Attr.PADDING, bytes(7)),
            (0x8055, b"\x01"),  # unknown, comprehension-optional
        ]
        msg = stun.Message(0x0AB, MessageClass.INDICATION, tid, attrs)
        data = stun.encode_message(
            msg, integrity_key=b"k1", integrity_sha256_key=b"k2", fingerprint=True
        )
        self.assertEqual(len(data) % 4, 0)
        parsed = stun.parse_message(data)
        self.assertEqual(
            (parsed.method, parsed.msg_class, parsed.transaction_id, parsed.attributes),
            (0x0AB, MessageClass.INDICATION, tid, attrs),
        )
        self.assertTrue(parsed.has_fingerprint)
        self.assertTrue(stun.verify_integrity(parsed, b"k1"))
        self.assertFalse(stun.verify_integrity(parsed, b"k2"))
        self.assertTrue(stun.verify_integrity_sha256(parsed, b"k2"))
        self.assertFalse(stun.verify_integrity_sha256(parsed, b"k1"))
        plain = stun.parse_message(stun.encode_message(msg))
        self.assertFalse(stun.verify_integrity(plain, b"k1"))
        self.assertFalse(stun.verify_integrity_sha256(plain, b"k2"))
        self.assertEqual(stun.encode_message(plain), stun.encode_message(msg))

    def test_classic_round_trip(self):
        tid = bytes(range(16))
        msg = stun.Message(Method.BINDING, MessageClass.SUCCESS, tid, [(Attr.MAPPED_ADDRESS, stun.encode_address("10.0.0.1", 9))])
        parsed = stun.parse_message(stun.encode_message(msg))
        self.assertTrue(parsed.classic)
        self.assertEqual(parsed.transaction_id, tid)
        self.assertEqual(stun.decode_address(parsed.get(Attr.MAPPED_ADDRESS)), ("10.0.0.1", 9))

    def test_attributes_after_integrity_ignored(self):
        """RFC 8489 14.5: what follows MESSAGE-INTEGRITY is not authenticated."""
        signed = stun.encode_message(
            stun.Message(Method.BINDING, MessageClass.REQUEST, TXID, [(Attr.USERNAME, b"u")]),
            integrity_key=b"k",
        )
        extra = struct.pack("!HH", Attr.SOFTWARE, 4) + b"evil"
        data = bytearray(signed + extra)
        struct.pack_into("!H", data, 2, len(data) - 20)
        msg = stun.parse_message(bytes(data))
        self.assertEqual(msg.types(), [Attr.USERNAME])
        self.assertIsNone(msg.get(Attr.SOFTWARE))
        self.assertTrue(stun.verify_integrity(msg, b"k"))

    def test_addresses(self):
        key = stun.Message(1, MessageClass.REQUEST, os.urandom(12)).xor_key
        for host, port in [("203.0.113.7", 1), ("2001:db8::1", 65535), ("::", 3478), ("0.0.0.0", 0)]:
            self.assertEqual(stun.decode_address(stun.encode_address(host, port)), (host, port))
            self.assertEqual(stun.decode_xor_address(stun.encode_xor_address(host, port, key), key), (host, port))
        # IPv4-mapped IPv6 (a dual-stack socket) and scoped addresses.
        self.assertEqual(stun.decode_address(stun.encode_address("::ffff:192.0.2.9", 7)), ("192.0.2.9", 7))
        self.assertEqual(stun.decode_address(stun.encode_address("fe80::1%lo", 7)), ("fe80::1", 7))
        self.assertEqual(len(stun.encode_address("192.0.2.9", 7)), 8)
        self.assertEqual(len(stun.encode_address("::1", 7)), 20)
        for bad in [b"", b"\x00\x03\x00\x01\x01\x02\x03\x04", b"\x00\x01\x00\x01\x01\x02\x03", bytes(20)]:
            with self.assertRaises(StunError) as cm:
                stun.decode_address(bad)
            self.assertEqual(cm.exception.reason, "bad-attribute")
            self.assertRaises(StunError, stun.decode_xor_address, bad, key)
        self.assertRaises(ValueError, stun.encode_address, "1.2.3.4", 70000)
        self.assertRaises(ValueError, stun.encode_address, "example.org", 1)

    def test_small_attributes(self):
        self.assertEqual(stun.decode_error_code(stun.encode_error_code(420, "Unknown Attribute")), (420, "Unknown Attribute"))
        self.assertEqual(stun.encode_error_code(420), h("00 00 04 14"))
        self.assertEqual(stun.decode_error_code(stun.encode_error_code(300)), (300, ""))
        self.assertRaises(ValueError, stun.encode_error_code, 200)
        for bad in [b"\x00\x00\x04", b"\x00\x00\x02\x00", b"\x00\x00\x04\x64"]:
            self.assertRaises(StunError, stun.decode_error_code, bad)
        self.assertEqual(stun.encode_unknown_attributes([3]), h("00 03"))
        self.assertEqual(stun.encode_unknown_attributes([3], classic=True), h("00 03 00 03"))
        self.assertEqual(stun.decode_unknown_attributes(h("00 03 00 27")), (3, 0x27))
        self.assertRaises(StunError, stun.decode_unknown_attributes, b"\x00")
        self.assertEqual(stun.encode_change_request(True, False), h("00 00 00 04"))
        self.assertEqual(stun.encode_change_request(False, True), h("00 00 00 02"))
        self.assertEqual(stun.decode_change_request(h("00 00 00 06")), (True, True))
        self.assertRaises(StunError, stun.decode_change_request, b"\x00")
        self.assertEqual(stun.decode_response_port(stun.encode_response_port(4242)), 4242)
        self.assertRaises(StunError, stun.decode_response_port, b"\x00")
        self.assertRaises(StunError, stun.decode_text, b"\xff\xfe")

    def test_saslprep(self):
        # RFC 4013 section 3 examples.
        self.assertEqual(stun.saslprep("I\u00adX"), "IX")
        self.assertEqual(stun.saslprep("user"), "user")
        self.assertEqual(stun.saslprep("USER"), "USER")
        self.assertEqual(stun.saslprep("\u00aa"), "a")
        self.assertEqual(stun.saslprep("\u2168"), "IX")
        self.assertEqual(stun.saslprep("a\u00a0b"), "a b")
        for bad in ["\u0007", "\u0627\u0031"]:
            with self.assertRaises(StunError) as cm:
                stun.saslprep(bad)
            self.assertEqual(cm.exception.reason, "bad-credentials")

    def test_encode_refuses_bad_values(self):
        self.assertRaises(ValueError, stun.encode_message, stun.Message(1, MessageClass.REQUEST, b"short"))
        huge = stun.Message(1, MessageClass.REQUEST, TXID, [(Attr.PADDING, bytes(0xFFFF))])
        self.assertRaises(ValueError, stun.encode_message, huge)

    def test_demux(self):
        K = stun.Kind
        table = {0: K.STUN, 3: K.STUN, 4: K.UNKNOWN, 16: K.ZRTP, 19: K.ZRTP, 20: K.DTLS, 63: K.DTLS,
                 64: K.QUIC, 79: K.QUIC, 80: K.QUIC, 127: K.QUIC, 128: K.RTP,
                 191: K.RTP, 192: K.QUIC, 255: K.QUIC}
        for first, kind in table.items():
            self.assertEqual(stun.demux(bytes([first, 0, 0])), kind, first)
            self.assertEqual(stun.is_stun(first), kind is K.STUN)
            turn = K.TURN_CHANNEL if 64 <= first <= 79 else kind
            self.assertEqual(stun.demux(bytes([first]), turn_channels=True), turn, first)
        for first in range(256):
            self.assertEqual(stun.is_stun(first), first < 4)
        self.assertEqual(stun.demux(b""), K.UNKNOWN)
        for vector in VECTORS:
            self.assertTrue(stun.is_stun(vector[0]))


class MalformedTests(SynchronousTestCase):
    """Every way a message can be broken maps to its reason, and nothing else."""

    def assertReason(self, data, reason):
        with self.assertRaises(StunError) as cm:
            stun.parse_message(data)
        self.assertEqual(cm.exception.reason, reason, cm.exception)

    def test_reasons(self):
        good = request((Attr.SOFTWARE, b"abc"), fingerprint=True)
        stun.parse_message(good)

        def mutate(fn):
            b = bytearray(good)
            fn(b)
            return bytes(b)

        self.assertReason(b"", "truncated")
        self.assertReason(good[:19], "truncated")
        self.assertReason(good[:-4], "truncated")
        self.assertReason(good + b"\x00" * 4, "bad-length")
        self.assertReason(mutate(lambda b: struct.pack_into("!H", b, 2, 2)), "bad-length")
        self.assertReason(mutate(lambda b: b.__setitem__(0, 0x80)), "not-stun")
        self.assertReason(mutate(lambda b: b.__setitem__(0, 0x40)), "not-stun")
        # No magic cookie and a type RFC 3489 never defined:
        self.assertReason(mutate(lambda b: (b.__setitem__(4, 0), b.__setitem__(1, 0x03))), "not-stun")
        # Attribute claiming more than the message holds:
        self.assertReason(mutate(lambda b: struct.pack_into("!H", b, 22, 40)), "truncated")
        # Message length shorter than the attribute's padded value:
        self.assertReason(request((Attr.SOFTWARE, b"abc"))[:22] + b"\x00\x00", "truncated")
        short = bytearray(request((Attr.SOFTWARE, b"abcdefgh")))
        struct.pack_into("!H", short, 2, 8)
        self.assertReason(bytes(short[:28]), "truncated")
        self.assertReason(mutate(lambda b: b.__setitem__(-1, b[-1] ^ 1)), "bad-fingerprint")
        tail = bytearray(good + struct.pack("!HH", 0x8055, 0))
        struct.pack_into("!H", tail, 2, len(tail) - 20)
        self.assertReason(bytes(tail), "bad-fingerprint")
        for atype, size in [(Attr.MESSAGE_INTEGRITY, 16), (Attr.FINGERPRINT, 8),
                            (Attr.CHANGE_REQUEST, 8), (Attr.RESPONSE_PORT, 2),
                            (Attr.XOR_MAPPED_ADDRESS, 12), (Attr.MAPPED_ADDRESS, 4),
                            (Attr.MESSAGE_INTEGRITY_SHA256, 12), (Attr.MESSAGE_INTEGRITY_SHA256, 36)]:
            self.assertReason(request((atype, bytes(size))), "bad-attribute")

    def test_not_bytes(self):
        for junk in [None, 3, "text", object()]:
            self.assertRaises(StunError, stun.parse_message, junk)
        stun.parse_message(bytearray(SAMPLE_REQUEST))
        stun.parse_message(memoryview(SAMPLE_REQUEST))


def _exercise(data: bytes) -> None:
    """Run everything that takes untrusted bytes; only StunError may escape."""
    for call in (
        lambda: stun.parse_message(data),
        lambda: stun.answer_binding(data, ("192.0.2.1", 4000)),
        lambda: stun.answer_binding(data, ("2001:db8::1", 4000, 0, 0)),
        lambda: stun.parse_binding_response(data, data[8:20]),
        lambda: stun.parse_binding_response(data, TXID),
    ):
        try:
            call()
        except StunError as e:
            assert e.reason in stun.REASONS, e.reason
    try:
        msg = stun.parse_message(data)
    except StunError:
        return
    stun.verify_integrity(msg, b"k")
    stun.verify_integrity_sha256(msg, b"k")
    for _, value in msg.attributes:
        for decode in (stun.decode_address, stun.decode_error_code, stun.decode_unknown_attributes,
                       stun.decode_change_request, stun.decode_response_port, stun.decode_text,
                       lambda v: stun.decode_xor_address(v, msg.xor_key)):
            try:
                decode(value)
            except StunError as e:
                assert e.reason in stun.REASONS


def _tlv_soup(rng: random.Random, cookie: bool) -> bytes:
    """A plausible header followed by random attributes, lengths mostly sane."""
    body = bytearray()
    for _ in range(rng.randrange(6)):
        atype = rng.choice([0x0001, 0x0003, 0x0006, 0x0008, 0x0009, 0x000A, 0x001C, 0x0020,
                            0x0026, 0x0027, 0x8022, 0x8028, 0x802B, 0x802C, rng.randrange(0x10000)])
        n = rng.choice([0, 2, 4, 8, 12, 20, 32, rng.randrange(40)])
        value = bytes(rng.randrange(256) for _ in range(n))
        body += struct.pack("!HH", atype, n) + value + bytes(-n % 4)
    mtype = rng.choice([0x0001, 0x0011, 0x0101, 0x0111, rng.randrange(0x4000)])
    head = struct.pack("!HH", mtype, len(body) if rng.random() < 0.9 else rng.randrange(0x10000))
    head += (stun._COOKIE_BYTES if cookie else os.urandom(4)) + os.urandom(12)
    return head + bytes(body)


class FuzzTests(SynchronousTestCase):
    def test_truncations_and_bit_flips(self):
        seeds = VECTORS + [
            DEBIAN_STUN_TEST1,
            request(fingerprint=True),
            stun.answer_binding(request(fingerprint=True), ("::1", 1)),
            stun.answer_binding(classic_request(0x06), ("127.0.0.1", 1)),
        ]
        for seed in seeds:
            for n in range(len(seed) + 1):
                _exercise(seed[:n])
            for i in range(len(seed)):
                for bit in (0x01, 0x80):
                    flipped = bytearray(seed)
                    flipped[i] ^= bit
                    _exercise(bytes(flipped))

    def test_random_structured(self):
        rng = random.Random(5769)
        for i in range(3000):
            _exercise(_tlv_soup(rng, cookie=i % 3 != 0))

    def test_random_bytes(self):
        rng = random.Random(8489)
        for _ in range(3000):
            _exercise(bytes([rng.randrange(4)]) + bytes(rng.randrange(256) for _ in range(rng.randrange(80))))

    if given is not None:

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=200))
        def test_hypothesis_bytes(self, data):
            _exercise(data)

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(
            st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
            st.sampled_from([0x0001, 0x0011, 0x0101, 0x0111]),
            st.booleans(),
        )
        def test_hypothesis_attributes(self, attrs, mtype, fingerprint):
            """Any attribute list survives encode/parse, or is refused as StunError."""
            method, cls = stun.split_message_type(mtype)
            data = stun.encode_message(stun.Message(method, cls, TXID, attrs), fingerprint=fingerprint)
            _exercise(data)
            try:
                parsed = stun.parse_message(data)
            except StunError:
                return
            if not any(t in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT) for t, _ in attrs):
                self.assertEqual(parsed.attributes, [(t, bytes(v)) for t, v in attrs])


class AnswerBindingTests(SynchronousTestCase):
    """The server rule: smallest correct answer, None, or StunError."""

    def success(self, answer, tid=TXID):
        msg = stun.parse_message(answer)
        self.assertEqual((msg.method, msg.msg_class), (Method.BINDING, MessageClass.SUCCESS))
        self.assertEqual(msg.transaction_id, tid)
        return msg

    def test_ipv4(self):
        answer = stun.answer_binding(request(), ("192.0.2.1", 32853))
        self.assertEqual(len(request()), 20)
        self.assertEqual(len(answer), 32)
        msg = self.success(answer)
        self.assertEqual(msg.types(), [Attr.XOR_MAPPED_ADDRESS])
        self.assertFalse(msg.has_fingerprint)
        self.assertEqual(stun.parse_binding_response(answer, TXID).mapped, ("192.0.2.1", 32853))
        # The XOR-MAPPED-ADDRESS bytes of RFC 5769 2.2, same id and address.
        self.assertEqual(msg.get(Attr.XOR_MAPPED_ADDRESS), h("00 01 a1 47 e1 12 a6 43"))

    def test_ipv6(self):
        source = ("2001:db8:1234:5678:11:2233:4455:6677", 32853, 0, 0)
        answer = stun.answer_binding(request(), source)
        self.assertEqual(len(answer), 44)
        msg = self.success(answer)
        self.assertEqual(
            msg.get(Attr.XOR_MAPPED_ADDRESS),
            h("00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9"),
        )
        self.assertEqual(stun.parse_binding_response(answer, TXID).mapped, source[:2])

    def test_ipv4_mapped_source(self):
        answer = stun.answer_binding(request(), ("::ffff:192.0.2.1", 32853, 0, 0))
        self.assertEqual(len(answer), 32)
        self.assertEqual(stun.parse_binding_response(answer, TXID).mapped, ("192.0.2.1", 32853))

    def test_fingerprint_echoed(self):
        tid, data = stun.binding_request()
        self.assertEqual(len(data), 28)
        answer = stun.answer_binding(data, ("192.0.2.1", 1))
        self.assertEqual(len(answer), 40)
        self.assertTrue(self.success(answer, tid).has_fingerprint)
        self.assertEqual(len(stun.answer_binding(data, ("::1", 1))), 52)

    def test_classic_rfc3489(self):
        tid = bytes(range(0x10, 0x20))
        for data in (classic_request(tid=tid), classic_request(0, tid=tid)):
            answer = stun.answer_binding(data, ("192.0.2.1", 4000))
            self.assertEqual(len(answer), 32)
            msg = self.success(answer, tid)
            self.assertTrue(msg.classic)
            self.assertEqual(answer[4:20], tid)  # no cookie, the 128-bit id echoed
            self.assertEqual(msg.types(), [Attr.MAPPED_ADDRESS])
            self.assertEqual(stun.decode_address(msg.get(Attr.MAPPED_ADDRESS)), ("192.0.2.1", 4000))

    def test_debian_stun_request(self):
        answer = stun.answer_binding(DEBIAN_STUN_TEST1, ("127.0.0.1", 16941))
        self.assertEqual(
            answer, h("0101000c01a4287e30986f41f8607c0d83cb1b25 0001 0008 0001 422d 7f000001")
        )

    def test_change_request_refused(self):
        """One socket cannot answer from another address: 420 (RFC 5780 6.1)."""
        for flags in (stun.CHANGE_IP, stun.CHANGE_PORT, stun.CHANGE_IP | stun.CHANGE_PORT):
            data = classic_request(flags)
            self.assertEqual(len(data), 28)
            answer = stun.answer_binding(data, ("192.0.2.1", 4000))
            self.assertEqual(len(answer), 36)
            msg = stun.parse_message(answer)
            self.assertEqual(msg.msg_class, MessageClass.ERROR)
            self.assertEqual(stun.decode_error_code(msg.get(Attr.ERROR_CODE)), (420, ""))
            self.assertEqual(stun.decode_unknown_attributes(msg.get(Attr.UNKNOWN_ATTRIBUTES)), (3, 3))
            tid, data = stun.binding_request(change_ip=bool(flags & 4), change_port=bool(flags & 2))
            self.assertEqual(len(data), 36)
            answer = stun.answer_binding(data, ("192.0.2.1", 4000))
            self.assertEqual(len(answer), 44)
            with self.assertRaises(stun.StunErrorResponse) as cm:
                stun.parse_binding_response(answer, tid)
            self.assertEqual((cm.exception.code, cm.exception.unknown), (420, (Attr.CHANGE_REQUEST,)))
            self.assertEqual(cm.exception.reason, "error-response")

    def test_unknown_comprehension_required(self):
        address = stun.encode_address("192.0.2.66", 66)
        for atype, value in [(0x0031, bytes(4)), (Attr.RESPONSE_ADDRESS, address),
                             (Attr.RESPONSE_PORT, stun.encode_response_port(66)), (PRIORITY, bytes(4))]:
            answer = stun.answer_binding(request((atype, value)), ("192.0.2.1", 1))
            msg = stun.parse_message(answer)
            self.assertEqual(msg.msg_class, MessageClass.ERROR)
            self.assertEqual(len(answer), 36)
            self.assertEqual(stun.decode_unknown_attributes(msg.get(Attr.UNKNOWN_ATTRIBUTES)), (atype,))
        # RFC 5769's ICE request carries PRIORITY, which we do not serve.
        msg = stun.parse_message(stun.answer_binding(SAMPLE_REQUEST, ("192.0.2.1", 1)))
        self.assertEqual(stun.decode_unknown_attributes(msg.get(Attr.UNKNOWN_ATTRIBUTES)), (PRIORITY,))
        self.assertTrue(msg.has_fingerprint)
        answer = stun.answer_binding(request((0x0031, b""), (0x0032, b""), (0x0031, b"")), ("192.0.2.1", 1))
        unknown = stun.parse_message(answer).get(Attr.UNKNOWN_ATTRIBUTES)
        self.assertEqual(stun.decode_unknown_attributes(unknown), (0x31, 0x32))

    def test_understood_and_optional_attributes_ignored(self):
        data = request(
            (Attr.USERNAME, b"someone"),
            (0x8055, b"whatever"),
            (Attr.SOFTWARE, b"client 1.0"),
        )
        answer = stun.answer_binding(data, ("192.0.2.1", 1))
        self.assertEqual(self.success(answer).types(), [Attr.XOR_MAPPED_ADDRESS])
        signed = stun.encode_message(
            stun.Message(Method.BINDING, MessageClass.REQUEST, TXID, [(Attr.USERNAME, b"u")]),
            integrity_key=b"k",
        )
        self.assertEqual(len(stun.answer_binding(signed, ("192.0.2.1", 1))), 32)

    def test_long_term_vector_answered(self):
        answer = stun.answer_binding(SAMPLE_LONG_TERM_REQUEST, ("192.0.2.1", 1))
        msg = self.success(answer, SAMPLE_LONG_TERM_REQUEST[8:20])
        self.assertEqual(msg.types(), [Attr.XOR_MAPPED_ADDRESS])

    def test_optional_extras_only_when_asked(self):
        kwargs = dict(response_origin=("198.51.100.1", 3478), other_address=("198.51.100.2", 3479), software="p2pnat")
        answer = stun.answer_binding(request(), ("192.0.2.1", 1), **kwargs)
        msg = self.success(answer)
        self.assertEqual(msg.types(), [Attr.XOR_MAPPED_ADDRESS, Attr.RESPONSE_ORIGIN, Attr.OTHER_ADDRESS, Attr.SOFTWARE])
        self.assertEqual(len(answer), 32 + 12 + 12 + 12)
        self.assertEqual(
            stun.parse_binding_response(answer, TXID),
            stun.BindingResult(("192.0.2.1", 1), ("198.51.100.1", 3478), ("198.51.100.2", 3479)),
        )
        classic = stun.answer_binding(classic_request(0), ("192.0.2.1", 1), **kwargs)
        msg = stun.parse_message(classic)
        self.assertEqual(msg.types(), [Attr.MAPPED_ADDRESS, Attr.SOURCE_ADDRESS, Attr.CHANGED_ADDRESS, Attr.SOFTWARE])
        result = stun.parse_binding_response(classic, msg.transaction_id)
        self.assertEqual(result.other_address, ("198.51.100.2", 3479))

    def test_padding_echoed(self):
        tid, data = stun.binding_request(padding=100, fingerprint=False)
        self.assertEqual(len(data), 124)
        answer = stun.answer_binding(data, ("192.0.2.1", 1))
        self.assertEqual(len(answer), 136)
        self.assertEqual(self.success(answer, tid).get(Attr.PADDING), bytes(100))

    def test_no_answer(self):
        indication = stun.encode_message(stun.Message(Method.BINDING, MessageClass.INDICATION, TXID))
        allocate = stun.encode_message(stun.Message(0x003, MessageClass.REQUEST, TXID))
        for data in (indication, allocate, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE,
                     stun.answer_binding(classic_request(6), ("192.0.2.1", 1))):
            self.assertIsNone(stun.answer_binding(data, ("192.0.2.1", 1)))

    def test_malformed_raises(self):
        for data, reason in [(b"", "truncated"), (b"GET / HTTP/1.1\r\n\r\n\r\n", "not-stun"),
                             (SAMPLE_REQUEST[:-1], "truncated"), (SAMPLE_REQUEST + bytes(4), "bad-length"), (bytes(20)[:19], "truncated")]:
            with self.assertRaises(StunError) as cm:
                stun.answer_binding(data, ("192.0.2.1", 1))
            self.assertEqual(cm.exception.reason, reason)

    def test_answer_never_much_bigger(self):
        """
        The bound the docs promise: for requests we answer with success, the
        answer is at most 24 bytes (IPv6 XOR-MAPPED-ADDRESS) more than the
        request, whatever it carried.
        """
        rng = random.Random(3489)
        for _ in range(500):
            attrs = [(rng.choice([Attr.USERNAME, Attr.SOFTWARE, 0x8055, Attr.PADDING]),
                      bytes(rng.randrange(30))) for _ in range(rng.randrange(4))]
            data = request(*attrs, fingerprint=rng.random() < 0.5)
            for source in (("192.0.2.1", 1), ("2001:db8::1", 1)):
                answer = stun.answer_binding(data, source)
                self.assertLessEqual(len(answer), len(data) + 24)


class ClientTests(SynchronousTestCase):
    def test_binding_request(self):
        tid, data = stun.binding_request()
        self.assertEqual(len(tid), 12)
        msg = stun.parse_message(data)
        self.assertEqual((msg.method, msg.msg_class, msg.transaction_id), (Method.BINDING, MessageClass.REQUEST, tid))
        self.assertTrue(msg.has_fingerprint)
        self.assertEqual(msg.attributes, [])
        self.assertNotEqual(stun.binding_request()[0], tid)
        tid2, data = stun.binding_request(TXID, change_ip=True, change_port=True, fingerprint=False, padding=5)
        self.assertEqual(tid2, TXID)
        msg = stun.parse_message(data)
        self.assertFalse(msg.has_fingerprint)
        self.assertEqual(stun.decode_change_request(msg.get(Attr.CHANGE_REQUEST)), (True, True))
        self.assertEqual(msg.get(Attr.PADDING), bytes(5))
        self.assertRaises(ValueError, stun.binding_request, b"123")

    def test_parse_binding_response_errors(self):
        def reason(data, tid=TXID):
            with self.assertRaises(StunError) as cm:
                stun.parse_binding_response(data, tid)
            return cm.exception.reason

        self.assertEqual(reason(SAMPLE_IPV4_RESPONSE, os.urandom(12)), "wrong-transaction")
        self.assertEqual(reason(request()), "not-response")
        empty = stun.encode_message(stun.Message(Method.BINDING, MessageClass.SUCCESS, TXID))
        self.assertEqual(reason(empty), "no-mapped-address")
        bare_error = stun.encode_message(stun.Message(Method.BINDING, MessageClass.ERROR, TXID))
        self.assertEqual(reason(bare_error), "bad-attribute")
        err = stun.encode_message(stun.Message(Method.BINDING, MessageClass.ERROR, TXID,
                                               [(Attr.ERROR_CODE, stun.encode_error_code(400, "Bad Request"))]))
        with self.assertRaises(stun.StunErrorResponse) as cm:
            stun.parse_binding_response(err, TXID)
        self.assertEqual((cm.exception.code, cm.exception.reason_phrase, cm.exception.unknown), (400, "Bad Request", ()))
        self.assertEqual(reason(b"\x01"), "truncated")

    def test_mapped_address_fallback(self):
        old = stun.encode_message(stun.Message(Method.BINDING, MessageClass.SUCCESS, TXID,
                                               [(Attr.MAPPED_ADDRESS, stun.encode_address("192.0.2.7", 7))]))
        self.assertEqual(stun.parse_binding_response(old, TXID).mapped, ("192.0.2.7", 7))
        both = stun.encode_message(stun.Message(Method.BINDING, MessageClass.SUCCESS, TXID, [
            (Attr.MAPPED_ADDRESS, stun.encode_address("10.0.0.1", 1)),  # rewritten by an ALG
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address("192.0.2.7", 7, stun._COOKIE_BYTES + TXID)),
        ]))
        self.assertEqual(stun.parse_binding_response(both, TXID).mapped, ("192.0.2.7", 7))

    def test_round_trip_through_server(self):
        for source in (("192.0.2.1", 1), ("2001:db8::9", 65535)):
            for kwargs in ({}, {"fingerprint": False}, {"padding": 8}):
                tid, data = stun.binding_request(**kwargs)
                result = stun.parse_binding_response(stun.answer_binding(data, source), tid)
                self.assertEqual(result, stun.BindingResult(source))
