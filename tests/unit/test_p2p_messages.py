"""Tests for L{p2pnat.protocol.p2p}."""

import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire

KEY = bytes(range(32))

SAMPLES = [
    M.Login(("10.0.0.1", 5), M.NatInfo("endpoint-independent", "address-and-port-dependent",
                                       "sequential", 3, 12.5)),
    M.Welcome(1, ("2001:db8::1", 5), 6, 20), M.Keepalive(), M.Logout(),
    M.ConnectRequest(7, "bob", ("10.0.0.2", 9), M.NatInfo()),
    M.Invite(1, "alice", ("1.1.1.1", 2), ("10.0.0.1", 3), M.NatInfo(), b"S" * 16, b"K" * 32),
    M.Introduce(1, "bob", ("1.1.1.1", 2), ("10.0.0.1", 3), M.NatInfo(), b"S" * 16, b"K" * 32,
                False),
    M.Answer(1, True, ("10.0.0.3", 4)), M.AnswerAck(1, ("2.2.2.2", 3)), M.Refusal(1, 2),
    M.RelayBind(), M.RelayBound(True), M.Probe(1, 2), M.ProbeAck(1, 2, ("3.3.3.3", 4)),
    M.Data(b"hello"), M.Data(b""), M.PathKeepalive(), M.PathClose(),
]


class MessageTests(SynchronousTestCase):
    def test_round_trips(self):
        for m in SAMPLES:
            frame, got = wire.unseal(wire.seal(m, "x", KEY, 1), lambda k, t: KEY)
            self.assertEqual(got, m)

    def test_answers_not_larger(self):
        v6 = ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
        for request, answer in [(M.Login(("10.0.0.1", 1)), M.Welcome(1, v6, 2, 3)),
                                (M.Keepalive(), M.Welcome(1, v6, 2, 3)),
                                (M.Keepalive(), M.Refusal(0, 5)),
                                (M.Answer(1, True, ("10.0.0.1", 1)), M.AnswerAck(1, v6)),
                                (M.RelayBind(), M.RelayBound(True)),
                                (M.Probe(1, 1), M.ProbeAck(1, 1, v6))]:
            self.assertLessEqual(len(wire.seal(answer, "x", KEY, 1)),
                                 len(wire.seal(request, "x", KEY, 1)), type(request).__name__)

    def test_bad_bodies(self):
        for cls, body in [(M.Login, b"\x04"), (M.Keepalive, b"\x01"), (M.Probe, b"\x00"),
                          (M.Refusal, b"\x00" * 8), (M.Invite, b"\x00" * 9 + b"\x01-"),
                          (M.Answer, b"\x00" * 9 + b"\x04\x00\x01" + bytes(4) + b"\x09" * 6)]:
            self.assertRaises(wire.WireError, cls.decode_body, body)

    def test_session_key_sealing(self):
        sid, key = os.urandom(16), os.urandom(32)
        sealed = M.seal_session_key(KEY, sid, key)
        self.assertNotEqual(sealed, key)
        self.assertEqual(M.open_session_key(KEY, sid, sealed), key)
        self.assertNotEqual(M.open_session_key(bytes(32), sid, sealed), key)
        self.assertNotEqual(M.seal_session_key(KEY, os.urandom(16), key), sealed)

    def test_session_key_ids(self):
        sid = bytes(range(16))
        kid = M.session_key_id(sid, "a")
        self.assertTrue(wire.valid_key_id(kid))
        self.assertEqual(M.parse_session_key_id(kid), (sid, "a"))
        for bad in ("alice", kid[:-1] + "c", "zz" * 16 + ".a", "00.a"):
            self.assertIsNone(M.parse_session_key_id(bad))

    def test_nat_info_round_trip(self):
        n = M.NatInfo("address-dependent", "none", "random", -1, 6553.5)
        self.assertEqual(M.NatInfo.decode(n.encode())[0], n)


V4_CAND = ("198.51.100.7", 41000)
V6_CAND = ("2001:2:0:2::10", 40001)


class CandidateTests(SynchronousTestCase):
    """The optional candidate lists of introductions, and their bounds."""

    def test_round_trips(self):
        for m in [M.ConnectRequest(7, "bob", ("10.0.0.2", 9), M.NatInfo(), 0, (V4_CAND, V6_CAND)),
                  M.Answer(1, True, ("10.0.0.3", 4), M.NatInfo(), 16, (V6_CAND,)),
                  M.Invite(1, "alice", ("1.1.1.1", 2), ("10.0.0.1", 3), M.NatInfo(), b"S" * 16,
                           b"K" * 32, True, (V4_CAND,) * 4),
                  M.Introduce(1, "bob", ("1.1.1.1", 2), ("10.0.0.1", 3), M.NatInfo(), b"S" * 16,
                              b"K" * 32, True, (V6_CAND, V4_CAND))]:
            frame, got = wire.unseal(wire.seal(m, "x", KEY, 1), lambda k, t: KEY)
            self.assertEqual(got, m)

    def test_no_candidates_is_the_old_body(self):
        """
        Without candidates each body is byte for byte what releases before
        candidates send, and their bodies decode as having none: old
        clients and new lobbies (and the reverse) understand each other.
        """
        nat = M.NatInfo("endpoint-independent")
        local = wire.pack_addr("10.0.0.2", 9)
        old_connect = struct.pack("!Q", 7) + b"\x03bob" + local + nat.encode() + bytes(5)
        self.assertEqual(M.ConnectRequest(7, "bob", ("10.0.0.2", 9), nat, 5).encode_body(),
                         old_connect)
        self.assertEqual(M.ConnectRequest.decode_body(old_connect).candidates, ())
        old_answer = struct.pack("!QB", 1, 1) + local + nat.encode() + bytes(16)
        self.assertEqual(M.Answer(1, True, ("10.0.0.2", 9), nat).encode_body(), old_answer)
        self.assertEqual(M.Answer.decode_body(old_answer).candidates, ())
        old_invite = (struct.pack("!QB", 1, 1) + b"\x05alice" + wire.pack_addr("1.1.1.1", 2)
                      + local + nat.encode() + b"S" * 16 + b"K" * 32)
        self.assertEqual(M.Invite(1, "alice", ("1.1.1.1", 2), ("10.0.0.2", 9), nat, b"S" * 16,
                                  b"K" * 32).encode_body(), old_invite)
        self.assertEqual(M.Invite.decode_body(old_invite).candidates, ())

    def test_bounded(self):
        five = (V4_CAND,) * 5
        self.assertRaises(wire.WireError, M.ConnectRequest(1, "bob", candidates=five).encode_body)
        # A forged body claiming five: refused, not read past the bound.
        body = bytearray(M.ConnectRequest(1, "bob", candidates=(V4_CAND,) * 4).encode_body())
        start = len(body) - 4 * 7 - 1
        self.assertEqual(body[start], 4)
        body[start] = 5
        self.assertRaises(wire.WireError, M.ConnectRequest.decode_body,
                          bytes(body) + wire.pack_addr(*V4_CAND))
        body[start] = 0xFF
        self.assertRaises(wire.WireError, M.ConnectRequest.decode_body, bytes(body))

    def test_malformed(self):
        intro = M.Introduce(1, "bob", candidates=(V6_CAND,)).encode_body()
        for bad in (intro[:-1],  # a candidate cut short
                    intro + b"\x00",  # anything after the candidates
                    M.Introduce(1, "bob").encode_body() + b"\x00"):  # a stray zero
            self.assertRaises(wire.WireError, M.Introduce.decode_body, bad)
        answer = M.Answer(1, True, candidates=(V4_CAND,)).encode_body()
        self.assertRaises(wire.WireError, M.Answer.decode_body, answer + b"\x01")

    def test_valid_candidate(self):
        for good in [V4_CAND, V6_CAND, ("100.64.0.9", 1), ("192.168.1.2", 65535)]:
            self.assertTrue(M.valid_candidate(good), good)
        for bad in [("127.0.0.1", 5), ("::1", 5), ("0.0.0.0", 5), ("::", 5), ("224.0.0.1", 5),
                    ("ff02::1", 5), ("169.254.1.1", 5), ("fe80::1", 5), ("240.0.0.1", 5),
                    ("::ffff:198.51.100.7", 5), ("255.255.255.255", 5), (V4_CAND[0], 0),
                    ("not an ip", 5)]:
            self.assertFalse(M.valid_candidate(bad), bad)
