"""
A relay node that falls behind (a busy, shared machine) degrades without
spiralling into Redis reconnections (bench/cluster_notify.py measures it):

- a command is not timed out while its reply waits unread in the socket,
  nor while the connection still delivers replies (they come in order);
- live-entry writes in flight are capped, the newest per device winning
  while one waits, and a reconnection to a Redis that kept its data (the
  same epoch) rewrites nothing and rereads nothing;
- a first registry merge that fails half-way goes on from where it failed.
"""

import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pnat.cluster import redis as R
from p2pnat.cluster.state import ClusterUnavailable, LiveEntry, WriteQueue
from tests.support.redis import RedisServer, require_redis
from tests.unit.test_cluster import RelayLink, record
from tests.unit.test_cluster_live_writes import _Silent, _Warnings


class _Blocker(DatagramProtocol):
    """Holds the reactor up for C{seconds} in its read handler, as a busy node's notifies do."""

    def __init__(self, seconds):
        self.seconds = seconds

    def datagramReceived(self, data, addr):
        time.sleep(self.seconds)


class LateReplyTests(TestCase):
    """A real Redis, and a reactor held up in I/O while a reply arrives."""

    timeout = 30

    async def _connected(self, link):
        link.start()
        self.addCleanup(link.stop)
        for _ in range(500):
            if link.available:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("did not connect to redis")

    async def _test_reply_waiting_in_the_socket_is_read(self):
        server = RedisServer(self)
        link = R.RedisLink(reactor, server.url, ["ch"], lambda c, m: None,
                           lambda available: None, timeout=0.3)
        await self._connected(link)
        conn = link.commands
        port = reactor.listenUDP(0, _Blocker(0.7), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # The datagram and the command go out together: the reactor is held
        # up past the timeout reading the datagram while Redis answers.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", port.getHost().port))
        reply = await link.command("ECHO", "late")
        self.assertEqual(reply, "late")
        self.assertIs(link.commands, conn, "the connection was not dropped")

    def test_reply_waiting_in_the_socket_is_read(self):
        """
        The reply came while the node was held up past the timeout: it is
        read, not taken for a dead connection (the timer alone dropped it).
        """
        require_redis()
        return Deferred.fromCoroutine(self._test_reply_waiting_in_the_socket_is_read())


class _Answering(_Silent):
    """A command connection whose replies the test delivers, one at a time, in order."""

    last_read = None

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.waiting = []

    def execute_command(self, *args):
        d = super().execute_command(*args)
        self.waiting.append(d)
        return d

    def answer(self):
        self.last_read = self.clock.seconds()
        self.waiting.pop(0).callback("OK")


class ProgressTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.link = R.RedisLink(self.clock, "redis://127.0.0.1:1/0", [], lambda c, m: None,
                                lambda available: None)
        self.link.log = _Warnings()
        self.conn = self.link.commands = _Answering(self.clock)
        self.link.subscriber = object()

    def test_a_connection_still_answering_is_kept(self):
        """
        A backlog of commands answered slowly but steadily: the last one
        waits longer than the timeout and is answered; the connection is
        dropped only once it has read nothing for the timeout.
        """
        ds = [self.link.command("SET", f"k{i}", "v") for i in range(7)]
        for _ in range(6):
            self.clock.pump([0.01] * int(R.COMMAND_TIMEOUT * 60))  # 0.6 timeouts, on time
            self.conn.answer()
        self.assertEqual((self.conn.aborts, self.link.log.lines), (0, []))
        self.assertEqual([self.successResultOf(d) for d in ds[:6]], ["OK"] * 6)
        self.assertNoResult(ds[6])
        self.clock.pump([0.01] * int(R.COMMAND_TIMEOUT * 100 - 1))
        self.assertNoResult(ds[6])
        self.clock.pump([0.01] * 2)
        self.failureResultOf(ds[6], ClusterUnavailable)
        self.assertEqual(self.conn.aborts, 1)

    def test_a_late_timer_counts_from_when_the_node_got_going(self):
        """
        The node was held up past the timeout (its timer ran late): the
        connection gets a full timeout of the node's own running, not none.
        """
        d = self.link.command("GET", "k")
        self.clock.advance(R.COMMAND_TIMEOUT * 2)  # held up
        self.assertNoResult(d)
        self.clock.pump([0.01] * int(R.COMMAND_TIMEOUT * 50))
        self.conn.answer()
        self.assertEqual((self.successResultOf(d), self.conn.aborts), ("OK", 0))

    def test_longest_wait(self):
        """A connection that trickles replies still drops a command after LONGEST_WAIT timeouts."""
        ds = [self.link.command("SET", f"k{i}", "v") for i in range(100)]
        for _ in range(int(R.LONGEST_WAIT * 2) + 2):
            self.clock.pump([0.01] * int(R.COMMAND_TIMEOUT * 50))
            if self.conn.aborts:
                break
            self.conn.answer()
        self.assertEqual(len(self.conn.waiting), 100 - R.LONGEST_WAIT * 2)
        for d in ds[R.LONGEST_WAIT * 2:]:
            self.failureResultOf(d, ClusterUnavailable)
        self.assertEqual(self.conn.aborts, 1)


class _Store:
    """
    A link to an in-memory Redis whose live-entry writes the test answers
    when it likes (SET ... GET); the round's commands answer at once.
    """

    available = True

    def __init__(self, epoch="e1"):
        self.epoch = epoch
        self.values = {}
        self.pending = []  # (key, value, Deferred) sent, not answered
        self.most = 0  # the most writes ever in flight
        self.sets = 0
        self.names = []  # every command's name, in order

    def command(self, *args):
        self.names.append(args[0])
        if args[0] == "SET" and args[1].startswith("p2pnat:live:"):
            d = Deferred()
            self.pending.append((args[1], args[2], d))
            self.sets += 1
            self.most = max(self.most, len(self.pending))
            return d
        if args[0] == "SET" and args[1] == R.EPOCH:
            return succeed(self.epoch)
        if args[0] == "GET":
            return succeed("1")
        if args[0] == "HLEN":
            return succeed(0)
        return succeed(None)

    def answer(self, n):
        for _ in range(min(n, len(self.pending))):
            key, value, d = self.pending.pop(0)
            old, self.values[key] = self.values.get(key), value
            d.callback(old)


class CappedWritesTests(SynchronousTestCase):
    N = 2000

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.state = R.RedisState(self.clock, "redis://127.0.0.1:1/0", "n1", (), b"s" * 32,
                                  300, lambda: ("192.0.2.1", 7443), RelayLink())
        self.store = self.state.link = _Store()
        self.state.round()  # learns the epoch

    def notify_all(self, port):
        for i in range(self.N):
            self.state.notified(f"d{i}", "B", ("203.0.113.5", port + i), None, 1000.0)

    def entries(self):
        return {k[len(R.live_key("")):]: LiveEntry.from_json(k, v)
                for k, v in self.store.values.items()}

    def drain(self, per_step=7):
        while self.store.pending:
            self.store.answer(per_step)

    def test_writes_in_flight_never_exceed_the_cap(self):
        """
        Thousands of devices notify at once, then move while their writes
        wait: at most the cap is in flight, each device's entry ends at its
        newest address, and no write is lost.
        """
        self.notify_all(10000)
        self.assertEqual(self.store.most, R.LIVE_IN_FLIGHT)
        self.store.answer(10)
        self.notify_all(30000)  # every device moved: waiting writes are replaced
        self.drain()
        self.assertEqual(self.store.most, R.LIVE_IN_FLIGHT)
        entries = self.entries()
        self.assertEqual(len(entries), self.N)
        for i in range(self.N):
            self.assertEqual(entries[f"d{i}"].port, 30000 + i, f"d{i}")
        # Merged, not multiplied: one write per device and address at most.
        self.assertLessEqual(self.store.sets, 2 * self.N)
        self.assertEqual((len(self.state.queue), self.state.queue.in_flight), (0, 0))

    def test_reconnection_to_the_same_redis_rewrites_nothing(self):
        self.notify_all(10000)
        self.drain()
        before = self.store.sets
        del self.store.names[:]
        self.state._availability(False)
        self.state._availability(True)
        self.notify_all(10000)
        self.assertEqual(self.store.sets, before)
        self.assertNotIn("HLEN", self.store.names, "no registry reread")

    def test_redis_that_lost_its_data_is_refilled_within_the_cap(self):
        self.notify_all(10000)
        self.drain()
        self.store.values.clear()
        self.store.epoch = None  # a Redis restarted without its data
        self.state._availability(False)
        self.state._availability(True)
        self.notify_all(10000)
        self.assertEqual(self.store.most, R.LIVE_IN_FLIGHT)
        self.drain()
        self.assertEqual(len(self.entries()), self.N)

    def test_waiting_writes_are_dropped_when_redis_is_lost_and_redone(self):
        self.notify_all(10000)
        self.store.available = False
        self.state._availability(False)
        self.assertEqual(len(self.state.queue), 0)
        for _, _, d in self.store.pending:
            d.errback(ClusterUnavailable("gone"))
        self.store.pending.clear()
        self.store.available = True
        self.state._availability(True)
        self.notify_all(10000)  # same epoch, but nothing was written: all written now
        self.drain()
        self.assertEqual(len(self.entries()), self.N)

    def test_queue_rules(self):
        q = WriteQueue(2)
        for k, v in [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2)]:
            q.offer(k, v)
        self.assertEqual([q.next(), q.next(), q.next()], [("a", 2), ("b", 1), None])
        q.offer("b", 3)
        q.finished()
        self.assertEqual([q.next(), q.next()], [("c", 2), None])
        q.finished()
        self.assertEqual((q.next(), q.drop()), (("b", 3), []))
        self.assertRaises(ValueError, WriteQueue, 0)


class FailedMergeTests(SynchronousTestCase):
    def test_a_failed_first_merge_goes_on_where_it_failed(self):
        """
        The first merge of a node's 500 records fails on its third batch:
        the next round merges the 100 not merged yet, not all 500 again.
        """
        clock = MemoryReactorClock()
        relay = RelayLink()
        records = {f"d{i:03}": record(f"d{i:03}") for i in range(500)}
        relay.local_records = lambda: records
        state = R.RedisState(clock, "redis://127.0.0.1:1/0", "n1", (), b"s" * 32, 300,
                             lambda: ("192.0.2.1", 7443), relay)
        evals = []

        class Link:
            available = True
            epoch = None  # a new Redis: the node's epoch is set

            def command(self, *args):
                if args[0] == "SET":
                    return succeed(self.epoch)
                if args[0] == "EVAL":
                    evals.append(args[5::4])
                    if len(evals) == 3:
                        return fail(ClusterUnavailable("no answer"))
                    return succeed(["2"])
                return succeed("2" if args[0] == "GET" else None)

        state.link = Link()
        state.round()
        self.assertEqual(len(evals), 3)
        self.assertIsNotNone(state._epoch)
        state.link.epoch = state._epoch
        del evals[:]
        state.round()
        self.assertEqual(len(evals), 1)
        self.assertEqual(sorted(evals[0]), sorted(records)[400:])
