"""
A relay node reading the whole registry from Redis again (at start, after
a reconnection, after missed announcements): a large registry is read in
pages, each decoded and applied before the next is asked for.  Read at
once, 60 000 records held the node's reactor past the command timeout
under load (bench/cluster_notify.py): the node dropped its connection and
read everything again on reconnecting, over and over.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster import redis as R
from tests.unit.test_cluster import RelayLink, ScriptedLink, record


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        clock = MemoryReactorClock()
        self.relay = RelayLink()
        self.state = R.RedisState(clock, "redis://127.0.0.1:1/0", "n1", ("192.0.2.1:1",),
                                  b"s" * 32, 300, lambda: ("192.0.2.1", 7443), self.relay)

    def registry(self, n):
        codec = self.state.codec
        return [(f"d{i:05d}", codec.encode(record(f"d{i:05d}"))) for i in range(n)]

    def test_large_registry_in_pages(self):
        stored = self.registry(2 * R.RELOAD_PAGE + 7)
        pages = [stored[i:i + R.RELOAD_PAGE] for i in range(0, len(stored), R.RELOAD_PAGE)]

        def hscan(cmd, key, cursor, count_word, count):
            self.assertEqual((key, count_word, count), (R.REGISTRY, "COUNT", R.RELOAD_PAGE))
            i = int(cursor)
            flat = [x for pair in pages[i] for x in pair]
            return [str((i + 1) % len(pages)), flat]

        self.state.link = ScriptedLink({"HLEN": len(stored), "HSCAN": hscan})
        self.successResultOf(self.state._reload("7"))
        ran = [c[0] for c in self.state.link.commands]
        self.assertEqual(ran, ["HLEN", "HSCAN", "HSCAN", "HSCAN"])
        self.assertEqual([len(a) for a in self.relay.applied], [len(p) for p in pages])
        applied = {k for a in self.relay.applied for k in a}
        self.assertEqual(applied, {d for d, _ in stored})
        self.assertEqual(self.state._seen_version, "7")

    def test_small_registry_in_one_reply(self):
        stored = self.registry(3)
        self.state.link = ScriptedLink({"HLEN": 3,
                                        "HGETALL": [x for pair in stored for x in pair]})
        self.successResultOf(self.state._reload("2"))
        self.assertEqual([c[0] for c in self.state.link.commands], ["HLEN", "HGETALL"])
        self.assertEqual(set(self.relay.applied[0]), {d for d, _ in stored})
