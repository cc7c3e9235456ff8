"""
How often a cluster node writes a device's live entry to Redis, and what
another node makes of the entry between two writes.

A node writes on a notify A once per access-check period (the third of an
agent's notify A, sent every third of a period): it wrote on every second
one, 18 writes per device and hour at the default 300 s instead of 12.
Between two writes the entry's last access lags the one the owner saw by
up to L{rewrite_interval}; a node that judged it by the plain period would
refuse as stale a device its owner still holds live, so the entry carries
the owner's period and L{LiveEntry.stale} allows for the lag.

Two L{RedisState} nodes share an in-memory store (SET with its expiry on
the test's clock, GET, PUBLISH); the terminal side is the relay's own
routing (L{tests.unit.test_relay_terminal.World}).
"""

from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster import redis as R
from p2pnat.cluster.state import LiveEntry, rewrite_interval
from tests.unit.test_cluster import HEAD, RelayLink
from tests.unit.test_relay_terminal import World, status

P = 300.0
ADDR = ("203.0.113.5", 40000)


class MemoryStore:
    """
    The few Redis commands live entries use, on a clock: ``SET key value
    EX seconds GET``, ``GET`` (an expired key is gone), ``PUBLISH`` (one
    subscriber on every channel).  Every command is kept in C{commands}.
    """

    available = True

    def __init__(self, clock):
        self.clock = clock
        self.data = {}  # key -> (value, expires at)
        self.commands = []

    def _get(self, key):
        value, until = self.data.get(key, (None, None))
        if until is not None and self.clock.seconds() >= until:
            del self.data[key]
            return None
        return value

    def command(self, *args):
        self.commands.append(args)
        name = args[0]
        if name == "SET":
            key, value, ex, seconds, get = args[1:]
            assert (ex, get) == ("EX", "GET"), args
            old = self._get(key)
            self.data[key] = (value, self.clock.seconds() + seconds)
            return succeed(old)
        if name == "GET":
            return succeed(self._get(args[1]))
        if name == "PUBLISH":
            return succeed(1)
        raise AssertionError(f"not a command live entries use: {args}")

    def live_writes(self):
        return [c for c in self.commands if c[0] == "SET" and c[1] == R.live_key("cam")]


def node(name, clock, store, relay=None):
    state = R.RedisState(clock, "redis://127.0.0.1:1/0", name, (), b"s" * 32, P,
                         lambda: ("192.0.2.2", 7443), relay or RelayLink())
    state.link = store
    return state


class Agent:
    """
    A device reporting to C{owner} as an agent does (notify A every P/3,
    notify B every 20 s), each notify handed to the node as the relay's
    notify handler does (C{RelayService._live}).  C{lost} notify A never
    arrive; C{late} maps a notify A's number to seconds it arrives late
    (negative: early).
    """

    def __init__(self, owner, start, lost=(), late=None):
        self.owner = owner
        self.start = start
        self.lost = set(lost)
        self.late = late or {}
        self.last_a = None

    def run_until(self, end):
        """Hand the owner every notify that arrives before C{end}, in order."""
        notifies = []
        k = 0
        while self.start + k * P / 3 < end:
            if k not in self.lost:
                notifies.append((self.start + k * P / 3 + self.late.get(k, 0.0), "A"))
            k += 1
        t = self.start + 20.0
        while t < end:
            notifies.append((t, "B"))
            t += 20.0
        for when, kind in sorted(notifies):
            if when < end:
                self.notify(kind, when)

    def notify(self, kind, now):
        if kind == "A":
            self.last_a = now
        self.owner.notified("cam", kind, ADDR, self.last_a, now)


class WritesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.store = MemoryStore(self.clock)
        self.owner = node("n1", self.clock, self.store)

    def test_one_write_per_access_period(self):
        """
        Notify A every P/3 and notify B every 20 s for three periods: three
        writes (every second notify A wrote: five).
        """
        Agent(self.owner, 1000.0).run_until(1000.0 + 3 * P)
        self.assertEqual([LiveEntry.from_json("cam", c[2]).last_access
                          for c in self.store.live_writes()],
                         [1000.0, 1000.0 + P, 1000.0 + 2 * P])

    def test_one_write_per_period_despite_network_delays(self):
        """Notifies early or late by seconds: still the third notify A writes."""
        late = {k: (-4.0, 3.0, 0.5, -0.2)[k % 4] for k in range(30)}
        Agent(self.owner, 1000.0, late=late).run_until(1000.0 + 9 * P)
        self.assertEqual(len(self.store.live_writes()), 9)

    def test_the_entry_tells_the_period(self):
        Agent(self.owner, 1000.0).run_until(1001.0)
        entry = LiveEntry.from_json("cam", self.store.live_writes()[0][2])
        self.assertEqual(entry, LiveEntry("cam", "n1", ADDR[0], ADDR[1], 1000.0, P))
        self.assertEqual(self.store.live_writes()[0][4], self.owner.writes.expiry())


class RemoteRoutingTests(SynchronousTestCase):
    """
    A terminal on node n2 for ``cam``, whose notifies reach n1: n2 must
    ask n1 for the connect request whenever n1 holds the device live (a
    notify A within the period), however long ago n1 last wrote the entry.
    """

    def setUp(self):
        self.w = World(self, period=int(P))
        self.store = MemoryStore(self.w.clock)
        self.owner = node("n1", self.w.clock, self.store)
        self.remote = node("n2", self.w.clock, self.store)
        self.w.relay.cluster = self.remote
        self.w.add("cam", online=False)
        self.t0 = self.w.clock.seconds()

    def at(self, when):
        self.w.clock.advance(when - self.w.clock.seconds())

    def ask(self):
        """A terminal's request on n2: whether n2 asked n1 to send the connect request."""
        before = len(self.store.commands)
        t = self.w.terminal(HEAD)
        forwarded = [c for c in self.store.commands[before:]
                     if c[0] == "PUBLISH" and c[1] == R.node_channel("n1")]
        if forwarded:
            self.assertEqual(t.state, "waiting")
            fields = self.remote.signer.open(forwarded[0][2], self.w.clock.seconds())
            self.assertEqual((fields["t"], fields["device"]), ("connect", "cam"))
            t.transport.loseConnection()
            t.connectionLost(None)
        return bool(forwarded), t

    def test_just_before_the_next_write(self):
        """
        The notify A due when the entry is rewritten is lost: the entry is
        four thirds of a period old just before the next one, and n1 (last
        notify A two thirds of a period ago) holds the device live.
        """
        agent = Agent(self.owner, self.t0, lost={3})
        end = self.t0 + 4 * P / 3 - 0.5
        agent.run_until(end)
        self.at(end)
        self.assertEqual(len(self.store.live_writes()), 1, "written at the first notify A only")
        self.assertLessEqual(end - agent.last_a, P, "n1 holds it live")
        self.assertEqual(self.ask()[0], True)

    def test_at_the_bound(self):
        """
        The latest notify A that does not rewrite the entry comes just
        before the rewrite interval, and nothing after it: n1 holds the
        device live for a period after it, and so does n2, to the second.
        """
        agent = Agent(self.owner, self.t0)
        agent.notify("A", self.t0)
        last = self.t0 + rewrite_interval(P) - 0.5
        agent.notify("A", last)
        self.assertEqual(len(self.store.live_writes()), 1)
        self.at(last + P)
        self.assertEqual(self.ask()[0], True, "n1 holds it live: n2 routes")
        self.at(last + P + 1.0)
        routed, t = self.ask()
        self.assertEqual(routed, False, "stale for n1 too by now")
        self.assertEqual(status(t.transport), 503)
        self.assertIn("access-check period", t.transport.value().decode())

    def test_entry_outlives_the_allowance(self):
        """The entry's expiry comes after n2 would call it stale: a stale 503, not "never"."""
        agent = Agent(self.owner, self.t0)
        agent.notify("A", self.t0)
        self.at(self.t0 + P + rewrite_interval(P) + 1.0)
        routed, t = self.ask()
        self.assertEqual(routed, False)
        self.assertIn("access-check period", t.transport.value().decode())
        self.at(self.t0 + self.owner.writes.expiry())
        routed, t = self.ask()
        self.assertIn("not contacted the relay", t.transport.value().decode())


class _Silent:
    """A command connection that never answers."""

    def __init__(self):
        from twisted.internet.defer import Deferred

        self.sent = []
        self.aborts = 0
        self.transport = self
        self._deferred = Deferred

    def execute_command(self, *args):
        self.sent.append(args)
        return self._deferred()

    def abortConnection(self):
        self.aborts += 1


class _Warnings:
    def __init__(self):
        self.lines = []

    def warn(self, text, **fields):
        self.lines.append(text)


class CommandTimeoutTests(SynchronousTestCase):
    def test_one_line_and_one_abort_per_connection(self):
        """
        A thousand entry writes on a connection that stopped answering: each
        fails, but the node logs one line and drops the connection once (it
        logged a line per command, thousands at a time under load).
        """
        from p2pnat.cluster.state import ClusterUnavailable

        clock = MemoryReactorClock()
        link = R.RedisLink(clock, "redis://127.0.0.1:1/0", [], lambda c, m: None,
                           lambda available: None)
        link.log = _Warnings()
        conn = link.commands = _Silent()
        link.subscriber = object()
        failed = []
        for i in range(1000):
            link.command("SET", f"k{i}", "v").addErrback(
                lambda f: failed.append(f.check(ClusterUnavailable)))
            clock.advance(0.001)
        clock.pump([0.01] * int(R.COMMAND_TIMEOUT * 100 + 1))  # a node running on time
        self.assertEqual(failed, [ClusterUnavailable] * 1000)
        self.assertEqual(conn.aborts, 1)
        self.assertEqual(len(link.log.lines), 1)
        # The next connection that stops answering is dropped too.
        conn2 = link.commands = _Silent()
        d = link.command("GET", "k")
        clock.advance(R.COMMAND_TIMEOUT)
        self.failureResultOf(d, ClusterUnavailable)
        self.assertEqual((conn2.aborts, len(link.log.lines)), (1, 2))
