"""
Direct sessions to a device whose notifies reach another node of a
cluster, in memory: two relays (the terminal's node X and the owner Y),
each with its L{RedisState}, joined by a fake Redis that delivers
published messages at once.  X authorizes and rate-limits, Y sends the
device the request and answers with the device's mapping; the secret
crosses Redis sealed (L{DirectSeal}).  The process test,
L{tests.process.test_direct_cluster}, runs it on a real Redis.
"""

from types import SimpleNamespace

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster import redis as R
from p2pnat.cluster.state import (
    DIRECT_ANSWER_TIMEOUT,
    DirectSeal,
    IClusterDirect,
    LiveEntry,
    Signer,
    cluster_keys,
)
from p2pnat.protocol import wire
from p2pnat.relay.core import DirectLimits, DirectOffer
from tests.unit.test_relay_terminal import KEY, World, status

SECRET = bytes(range(100, 116))
DID = bytes(range(16))
TERMINAL = ("198.51.100.9", 40001)
DEVICE = ("203.0.113.5", 40000)


class FakeRedis:
    """The Redis both nodes share: live entries, and channels delivered at once."""

    def __init__(self):
        self.live = {}
        self.states = {}  # node name -> RedisState subscribed to its channel
        self.published = []  # (channel, text)
        self.deaf = set()  # nodes whose channel nobody reads

    def link(self):
        return FakeLink(self)


class FakeLink:
    available = True

    def __init__(self, redis):
        self.redis = redis

    def command(self, *args):
        if args[0] == "GET":
            return succeed(self.redis.live.get(args[1]))
        if args[0] == "PUBLISH":
            channel, text = args[1], args[2]
            self.redis.published.append((channel, text))
            for name, state in self.redis.states.items():
                if channel == R.node_channel(name) and name not in self.redis.deaf:
                    state._message(channel, text)
                    return succeed(1)
            return succeed(0)
        return succeed(None)


class Node:
    """One relay node: its L{World} (relay, device table, notify socket) and cluster state."""

    def __init__(self, testcase, redis, name, secret=b"s" * 32, **relay_options):
        # What the node's service does for the cluster: connect requests go to its relay.
        node = SimpleNamespace(send_connect=lambda *args: self.relay.send_connect(*args))
        self.state = R.RedisState(Clock(), "redis://127.0.0.1:1/0", name, (), secret, 300,
                                  lambda: ("192.0.2.1", 7443), node)
        self.state.link = redis.link()
        redis.states[name] = self.state
        self.w = World(testcase, cluster=self.state, **relay_options)
        # The node's one clock (the World makes it after the state).
        self.state.clock = self.state._throttle.clock = self.w.clock
        self.relay = self.w.relay

    def directs(self):
        return [(wire.unseal(data, lambda k, t: KEY)[1], addr) for data, addr, kind
                in self.w.socket.sent if kind == "DirectConnectRequest"]


class DirectSealTests(SynchronousTestCase):
    def test_round_trip_and_binding(self):
        seal = DirectSeal(cluster_keys(b"s" * 32)[1])
        text = seal.seal(SECRET, DID, "cam", "x")
        self.assertNotIn(SECRET.hex(), text)
        self.assertEqual(seal.open(text, DID, "cam", "x"), SECRET)
        for other in ((bytes(16), "cam", "x"), (DID, "cam2", "x"), (DID, "cam", "y")):
            with self.assertRaises(ValueError, msg=other):
                seal.open(text, *other)
        with self.assertRaises(ValueError):
            DirectSeal(cluster_keys(b"t" * 32)[1]).open(text, DID, "cam", "x")
        for garbage in ("", "zz", "00" * 20):
            with self.assertRaises(ValueError):
                seal.open(garbage, DID, "cam", "x")


class OwnerSendsTests(SynchronousTestCase):
    """A terminal on X for a device whose notifies reach Y."""

    def setUp(self):
        self.redis = FakeRedis()
        self.x = Node(self, self.redis, "x")
        self.y = Node(self, self.redis, "y")
        self.y.w.add("cam")
        self.y.relay.notified("cam", wire.DIRECT_CAPABLE)
        self.x.w.add("cam", online=False)
        now = self.x.w.clock.seconds()
        self.redis.live[R.live_key("cam")] = LiveEntry("cam", "y", *DEVICE, now, 300).to_json()
        self.offers = []

    def ask(self, source="198.51.100.9", terminal=TERMINAL, node=None):
        node = node or self.x
        before = len(self.offers)
        offer = node.relay.direct_offer("cam", "ssh", terminal, source,
                                        on_later=self.offers.append)
        self.assertEqual(len(self.offers), before, "never before direct_offer returned")
        node.w.clock.advance(0)  # the fake Redis answered at once
        return offer

    def test_backend_provides_it(self):
        self.assertTrue(IClusterDirect.providedBy(self.x.state))

    def test_owner_sends_and_the_terminals_node_offers(self):
        self.assertIsNone(self.ask(), "the offer comes later, from the owner's answer")
        (offer,) = self.offers
        (m, addr), = self.y.directs()
        self.assertEqual((m.service, m.terminal, addr), ("ssh", TERMINAL, DEVICE))
        self.assertEqual(offer, DirectOffer(DEVICE, wire.mask_secret(KEY, m.direct_id,
                                                                     m.secret)))
        self.assertEqual(self.x.directs(), [], "X has no mapping: it sends nothing itself")
        # Through Redis the secret is sealed, never in clear.
        self.assertTrue(self.redis.published)
        for _, text in self.redis.published:
            self.assertNotIn(offer.secret.hex(), text)
        # Y sends its second copy too.
        self.y.w.clock.advance(0.3)
        self.assertEqual(len(self.y.directs()), 2)
        self.assertEqual(self.x.state._direct_asks, {})

    def test_only_devices_that_said_they_take_it(self):
        self.y.relay.notified("cam", 0)
        self.ask()
        self.assertEqual((self.offers, self.y.directs()), ([], []))
        self.assertEqual(self.x.state._direct_asks, {}, "Y answered: nothing left waiting")

    def test_without_on_later_none_is_asked(self):
        """A caller that cannot take a later offer asks for none (its tunnel is relayed)."""
        self.assertIsNone(self.x.relay.direct_offer("cam", "ssh", TERMINAL, "198.51.100.9"))
        self.assertEqual(self.redis.published, [])

    def test_silent_owner_no_offer(self):
        self.redis.deaf.add("y")
        self.ask()
        self.assertEqual(len(self.x.state._direct_asks), 1)
        self.x.w.clock.advance(DIRECT_ANSWER_TIMEOUT)
        self.assertEqual((self.offers, self.x.state._direct_asks), ([], {}))

    def test_redis_away_no_offer_no_error(self):
        self.x.state.link.available = False
        self.assertIsNone(self.ask())
        self.assertEqual((self.offers, self.redis.published), ([], []))

    def test_no_live_entry_or_stale_no_offer(self):
        del self.redis.live[R.live_key("cam")]
        self.ask()
        old = self.x.w.clock.seconds() - 1000
        self.redis.live[R.live_key("cam")] = LiveEntry("cam", "y", *DEVICE, old, 300).to_json()
        self.ask()
        self.assertEqual((self.offers, self.redis.published), ([], []))

    def test_other_family_no_ask(self):
        self.ask(source="2001:db8::9", terminal=("2001:db8::9", 4))
        self.assertEqual((self.offers, self.redis.published), ([], []))

    def test_terminal_source_rate_on_the_terminals_node(self):
        x = Node(self, self.redis, "x", direct_limits=DirectLimits(per_source=1))
        for _ in range(5):
            self.ask(node=x)
        self.assertEqual(len(self.offers), 2, "a burst of twice the rate")
        self.assertEqual(len(self.y.directs()), 2)

    def test_owner_bounds_what_it_sends_per_device(self):
        """However many nodes ask, the owner sends within its per-device rate."""
        self.redis.states.pop("y")
        y = Node(self, self.redis, "y", direct_limits=DirectLimits(per_device=1))
        y.w.add("cam")
        y.relay.notified("cam", wire.DIRECT_CAPABLE)
        for i in range(5):
            self.ask(source=f"198.51.100.{i}")
        self.assertEqual(len(self.offers), 2)
        self.assertEqual(len(y.directs()), 2)

    def test_forged_or_resealed_asks_do_nothing(self):
        fields = {"t": "direct", "from": "x", "device": "cam", "service": "ssh",
                  "terminal": list(TERMINAL), "id": DID.hex(),
                  "secret": self.x.state.direct_seal.seal(SECRET, DID, "cam", "x")}
        now = self.y.w.clock.seconds()
        channel = R.node_channel("y")
        forged = Signer(cluster_keys(b"t" * 32)[0]).seal(fields, now)
        self.y.state._message(channel, forged)
        # Sealed for another node's ask: the owner cannot open it.
        moved = dict(fields, **{"from": "z"})
        self.y.state._message(channel, self.y.state.signer.seal(moved, now))
        self.assertEqual(self.y.directs(), [])
        # The genuine one is served.
        self.y.state._message(channel, self.y.state.signer.seal(fields, now))
        (m, _), = self.y.directs()
        self.assertEqual(wire.mask_secret(KEY, m.direct_id, m.secret), SECRET)

    def test_asks_waiting_are_bounded(self):
        """A node waits for at most MAX_DIRECT_ASKS answers; beyond, and a repeated ID: None."""
        self.redis.deaf.add("y")
        entry = LiveEntry("cam", "y", *DEVICE, 0.0)
        state = self.x.state
        answers = [state.ask_direct(entry, "cam", "ssh", TERMINAL, i.to_bytes(16, "big"), SECRET)
                   for i in range(R.MAX_DIRECT_ASKS + 1)]
        self.assertEqual([a.called for a in answers[:-1]], [False] * R.MAX_DIRECT_ASKS)
        self.assertIsNone(self.successResultOf(answers[-1]))
        self.x.w.clock.advance(DIRECT_ANSWER_TIMEOUT)
        again = state.ask_direct(entry, "cam", "ssh", TERMINAL, DID, SECRET)
        self.assertIsNone(self.successResultOf(
            state.ask_direct(entry, "cam", "ssh", TERMINAL, DID, SECRET)), "the same offer ID")
        self.assertFalse(again.called)

    def test_unasked_answers_ignored(self):
        now = self.x.w.clock.seconds()
        answer = {"t": "direct-answer", "from": "y", "id": DID.hex(), "addr": list(DEVICE)}
        self.x.state._message(R.node_channel("x"), self.x.state.signer.seal(answer, now))
        self.assertEqual(self.offers, [])


class IdleTunnelTests(SynchronousTestCase):
    """An idle tunnel on X waits (briefly) for the owner's answer: the offer goes in the 200."""

    def setUp(self):
        OwnerSendsTests.setUp(self)
        self.redis.deaf.add("y")  # answers come when the test says
        self.tunnel = object()
        self.x.relay.idle["cam"] = [self.tunnel]
        self.got = []

    def request(self):
        OwnerSendsTests.ask(self)
        r = self.x.relay.request_tunnel("cam")
        r.ready.addCallback(lambda result: self.got.append((result, list(self.offers))))
        return r

    def test_handed_over_after_the_answer_with_the_offer(self):
        self.request()
        self.assertEqual(self.got, [])
        (direct_id,) = self.x.state._direct_asks
        self.x.state._direct_answered(direct_id, DEVICE)
        (((tunnel, reused), offers),) = self.got
        self.assertEqual((tunnel, reused, len(offers)), (self.tunnel, True, 1),
                         "the offer came first")

    def test_silent_owner_holds_it_briefly(self):
        from p2pnat.relay.core import DIRECT_HOLD

        self.request()
        self.x.w.clock.advance(DIRECT_HOLD)
        self.assertEqual(self.got, [((self.tunnel, True), [])])
        self.x.w.clock.advance(DIRECT_ANSWER_TIMEOUT)
        self.assertEqual(self.x.relay._direct_waits, {})

    def test_cancelled_while_held(self):
        r = self.request()
        r.cancel()
        self.x.w.clock.advance(DIRECT_ANSWER_TIMEOUT)
        self.assertEqual(self.got, [])
        self.assertEqual(self.x.relay.idle["cam"], [self.tunnel], "still idle for the next")

    def test_no_ask_no_wait(self):
        r = self.x.relay.request_tunnel("cam")
        self.assertEqual(self.successResultOf(r.ready), (self.tunnel, True))


class TerminalTests(SynchronousTestCase):
    """A terminal's CONNECT on X: the owner's offer in the 103 and the 200."""

    def setUp(self):
        OwnerSendsTests.setUp(self)

    def test_offer_from_the_owner(self):
        x = self.x.w
        t = x.terminal(b"CONNECT cam:ssh HTTP/1.1\r\nHost: cam\r\n"
                       b"P2P-Direct: 198.51.100.9:40001\r\n\r\n")
        x.clock.advance(0)  # the fake Redis answered at once
        (m, _), = self.y.directs()
        secret = wire.mask_secret(KEY, m.direct_id, m.secret)
        hint = b"P2P-Direct: 203.0.113.5:40000; secret=" + secret.hex().encode()
        self.assertEqual(t.transport.value(), b"HTTP/1.1 103 Early Hints\r\n" + hint
                         + b"\r\n\r\n")
        t.transport.clear()
        # The connect request went out from Y too; the tunnel lands on X.
        (data, _, _), = [s for s in self.y.w.socket.sent if s[2] == "ConnectRequest"]
        _, c = wire.unseal(data, lambda k, t: KEY)
        tun = x.tunnel("cam", session=SimpleNamespace(id=c.session_id, nonce=c.nonce))
        tun.dataReceived(b"")
        self.assertEqual(status(t.transport), 200)
        self.assertIn(hint, t.transport.value())
