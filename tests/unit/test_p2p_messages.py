"""Tests for L{p2pnat.protocol.p2p}."""

import os

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
