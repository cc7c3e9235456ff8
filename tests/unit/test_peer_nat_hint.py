"""
L{p2pnat.peer.discovery.NatStore}: the NAT a previous ``p2pnat peer`` run
measured, kept as the next run's hint; only for the same lobby and
interface, only while fresh, and never an error when the file is bad or
cannot be written.
"""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.discovery import NatStore
from p2pnat.protocol.p2p import NatInfo

SERVERS = [("198.18.1.1", 3478), ("198.18.1.1", 3479)]
SEQ = NatInfo("address-and-port-dependent", "address-and-port-dependent", "sequential", 2, 1.5)


class NatStoreTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = os.path.join(self.mktemp())
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.store = NatStore(self.path, self.clock)

    def test_round_trip(self):
        self.assertIsNone(self.store.load(SERVERS, "10.0.1.2"))
        self.store.save(SERVERS, "10.0.1.2", SEQ, lobby_candidates=True)
        self.assertEqual(self.store.load(SERVERS, "10.0.1.2"), (SEQ, True))

    def test_only_for_the_same_lobby_and_interface(self):
        self.store.save(SERVERS, "10.0.1.2", SEQ)
        self.assertIsNone(self.store.load(SERVERS, "10.0.9.9"))
        self.assertIsNone(self.store.load(SERVERS[:1], "10.0.1.2"))

    def test_only_while_fresh(self):
        self.store.save(SERVERS, "10.0.1.2", SEQ)
        self.clock.advance(NatStore.MAX_AGE + 1)
        self.assertIsNone(self.store.load(SERVERS, "10.0.1.2"))

    def test_unknown_not_kept(self):
        self.store.save(SERVERS, "10.0.1.2", NatInfo())
        self.assertFalse(os.path.exists(self.path))

    def test_bad_files_are_no_hint(self):
        good = {"servers": [list(s) for s in SERVERS], "interface": "10.0.1.2",
                "measured": self.clock.seconds(), "nat": {
                    "mapping": "endpoint-independent", "filtering": "unknown",
                    "allocation": "preserving", "step": 0, "rate": 0.0}}
        bad = ["{", "[]", json.dumps(dict(good, nat={"mapping": "sideways"})),
               json.dumps(dict(good, nat=dict(good["nat"], step=-1))),
               json.dumps(dict(good, measured="soon")), "x" * 10000]
        for text in bad:
            with open(self.path, "w") as f:
                f.write(text)
            self.assertIsNone(self.store.load(SERVERS, "10.0.1.2"), text[:40])
        with open(self.path, "w") as f:
            json.dump(good, f)
        self.assertEqual(self.store.load(SERVERS, "10.0.1.2")[0].allocation, "preserving")

    def test_unwritable_is_only_no_hint(self):
        store = NatStore(os.path.join(self.path, "no", "such", "dir", "hint.json"), self.clock)
        store.save(SERVERS, "10.0.1.2", SEQ)  # no exception
        self.assertIsNone(store.load(SERVERS, "10.0.1.2"))
