"""
Tests for L{p2pnat.relay.sessions}: single use, deadlines, retransmission.
"""

import itertools

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.relay.sessions import RETRANSMIT, SessionTable, SessionTimeout, TooBusy


class SessionTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        counter = itertools.count()
        self.table = SessionTable(self.clock, timeout=10, limit=3, per_device=2,
                                  random=lambda n: next(counter).to_bytes(n, "big"))
        self.sends = []

    def send(self, session):
        self.sends.append(self.clock.seconds())

    def test_claim_once(self):
        s = self.table.create("dev", self.send)
        got = []
        s.ready.addCallback(got.append)
        self.assertEqual(self.table.claim(s.id, "dev", s.nonce), (s, None))
        self.assertEqual(self.table.claim(s.id, "dev", s.nonce), (None, 2))
        self.assertEqual(len(self.table), 0)

    def test_wrong_device_or_nonce_leaves_session(self):
        s = self.table.create("dev", self.send)
        self.assertEqual(self.table.claim(s.id, "other", s.nonce), (None, 3))
        self.assertEqual(self.table.claim(s.id, "dev", b"x" * 16), (None, 4))
        self.assertEqual(self.table.claim(s.id, "dev", s.nonce), (s, None))

    def test_retransmit_until_deadline(self):
        s = self.table.create("dev", self.send)
        failures = []
        s.ready.addErrback(failures.append)
        self.clock.pump([0.05] * 220)  # timers fire up to 50 ms late, and must not drift
        expected = [0.0] + [t for t in RETRANSMIT if t < 10]
        self.assertEqual(len(self.sends), len(expected))
        for got, want in zip(self.sends, expected):
            self.assertTrue(want <= got + 1e-9 < want + 0.051, (got, want))
        self.assertEqual(len(failures), 1)
        failures[0].trap(SessionTimeout)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retransmission_stops_when_claimed(self):
        s = self.table.create("dev", self.send)
        self.clock.advance(0.3)
        self.table.claim(s.id, "dev", s.nonce)
        self.clock.advance(20)
        self.assertEqual(len(self.sends), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_limits(self):
        """Past a limit, in all or for one device, create says the relay is busy."""
        self.table.create("a", self.send)
        self.table.create("a", self.send)
        with self.assertRaises(TooBusy) as cm:
            self.table.create("a", self.send)
        self.assertEqual(str(cm.exception), "2 sessions pending for this device")
        self.table.create("b", self.send)
        with self.assertRaises(TooBusy) as cm:
            self.table.create("c", self.send)
        self.assertEqual(str(cm.exception), "3 sessions pending in all")
        self.assertEqual(len(self.table), 3)

    def test_ids_unique_and_cancel(self):
        a = self.table.create("a", self.send)
        b = self.table.create("a", self.send)
        self.assertNotEqual(a.id, b.id)
        self.table.cancel(a.id)
        self.assertEqual(self.table.claim(a.id, "a", a.nonce), (None, 2))

    def test_cancel_device(self):
        s = self.table.create("a", self.send)
        failures = []
        s.ready.addErrback(failures.append)
        self.table.cancel_device("a")
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.table), 0)
