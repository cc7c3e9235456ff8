"""
A connect request right behind the login (L{LobbyClient.connect} called
right after L{LobbyClient.start}), against the real lobby logic on a
simulated network: it saves a round trip when the lobby takes the Login
first, and the connect still succeeds when it did not (the Login lost,
overtaken by the request, or stale), and when the NAT hint it carried
was wrong.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.client import LobbyClient
from p2pnat.peer.path import Path
from p2pnat.peer.rtt import RttEstimator
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from tests.support.udp import SimNat
from tests.unit.test_peer_client import CONE, EI, HOSTS, KEYS, LOBBY, SIM, World, kind

RANDOM_HINT = M.NatInfo("address-and-port-dependent", "address-and-port-dependent", "random")


class FakeDiscovery:
    """A NAT cache whose answer the test gives (L{answer})."""

    def __init__(self, clock):
        self.rtt = RttEstimator(clock)
        self.current = None
        self.waiting = []
        self.subscribers = []

    def get(self):
        if self.current is not None:
            return defer.succeed(self.current)
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def answer(self, nat):
        self.current = nat
        for callback in list(self.subscribers):
            callback(nat)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(nat)

    def subscribe(self, callback):
        self.subscribers.append(callback)

    def unsubscribe(self, callback):
        if callback in self.subscribers:
            self.subscribers.remove(callback)

    def start(self):
        pass

    def stop(self):
        pass

    def refresh(self, why=""):
        return False


class PipelineTests(SynchronousTestCase):

    def alice(self, w, hint=CONE, nat=CONE):
        """
        Alice with a NAT cache that has not answered yet and C{hint} from
        an earlier run; her NAT behaves as C{nat}.
        """
        host, public = HOSTS["alice"]
        w.net.nats[host] = SimNat(public, base=20000 + 1000 * len(w.clients), seed=9,
                                  **SIM[nat])
        w.incoming["alice"] = []
        self.discovery = FakeDiscovery(w.clock)
        c = LobbyClient("alice", KEYS["alice"], LOBBY, w.net, interface=host,
                        discovery=self.discovery, nat_hint=hint, lobby_candidates=True)
        w.clients["alice"] = c
        return c

    def start_and_connect(self, w, alice, answer_after=0.01, nat=CONE):
        """start(), connect() at once; discovery answers C{nat} after C{answer_after} s."""
        t0 = w.clock.seconds()
        alice.start()
        results = []
        alice.connect("bob").addBoth(results.append)
        w.advance(answer_after)
        self.discovery.answer(nat)
        for _ in range(4000):
            if results:
                break
            w.clock.advance(0.001)
        self.assertTrue(results, "connect did not finish")
        return results[0], w.clock.seconds() - t0

    def to_lobby(self, w):
        return [kind(s.data) for s in w.net.sent if s.dst == LOBBY and s.src[0] ==
                HOSTS["alice"][1]]

    def test_request_behind_the_login(self):
        """
        The request leaves with the Login and the Ping, before any answer:
        the path comes two round trips (the introduction) and the punch
        after the start, not three.
        """
        w = World(self)
        w.client("bob")
        alice = self.alice(w)
        path, took = self.start_and_connect(w, alice)
        self.assertIsInstance(path, Path)
        self.assertEqual(path.mode, "direct")
        self.assertEqual(self.to_lobby(w)[:3], ["Login", "Ping", "ConnectRequest"])
        self.assertLess(took, 0.045)  # 10 ms RTT: 2 for the introduction, then the punch
        self.assertEqual(self.to_lobby(w).count("ConnectRequest"), 1)

    def first_login(self, w, instead):
        """
        Connect with alice's first Login taken off the wire and handed to
        C{instead(src, dst, data)}: the path.
        """
        w.client("bob")
        taken = []

        def take(src, dst, data):
            if kind(data) == "Login" and src[0] == HOSTS["alice"][1] and not taken:
                taken.append(data)
                instead(src, dst, data)
                return True
            return False

        w.net.lose = take
        path, _ = self.start_and_connect(w, self.alice(w))
        return path

    def test_login_lost(self):
        """
        The optimistic Login is lost: the lobby refuses the request (not
        logged in); once the Pong's Login is welcomed it goes again.
        """
        w = World(self)
        path = self.first_login(w, lambda src, dst, data: None)
        self.assertEqual(path.mode, "direct")
        refusals = [s for s in w.net.sent if s.src == LOBBY and kind(s.data) == "Refusal"]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(self.to_lobby(w).count("ConnectRequest"), 2)

    def test_login_overtaken(self):
        """
        The request reaches the lobby before the Login (reordered): refused,
        and the Login, older than the request, is a replay; the Pong's
        Login is welcomed, and the request goes again.
        """
        w = World(self)
        path = self.first_login(w, lambda src, dst, data: w.clock.callLater(
            0.003, w.net.send, src, dst, data))
        self.assertEqual(path.mode, "direct")
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="replay"), 1)
        self.assertEqual(self.to_lobby(w).count("ConnectRequest"), 2)

    def test_request_lost(self):
        """
        The request, sent before any round trip was measured, is lost: it
        goes again after a few RTOs the login measured (at least 0.15 s),
        not after the old fixed 0.5 s.
        """
        w = World(self)
        w.client("bob")
        lost = []

        def lose(src, dst, data):
            if kind(data) == "ConnectRequest" and not lost:
                lost.append(data)
                return True
            return False

        w.net.lose = lose
        path, took = self.start_and_connect(w, self.alice(w))
        self.assertEqual(path.mode, "direct")
        self.assertEqual(len(lost), 1)
        self.assertLess(took, 0.25)

    def test_clock_two_minutes_off(self):
        """
        Login and request, both on our clock, are stale: no answer to the
        request; it goes again as soon as the Pong's Login is welcomed, not
        after its retransmission timer.
        """
        w = World(self)

        class LobbyClock:
            def seconds(self):
                return w.clock.seconds() + 120

        w.lobby.clock = w.lobby_proto.replay._clock = w.lobby_proto.stamper._clock = \
            LobbyClock()
        w.client("bob")  # his optimistic Login is stale too
        alice = self.alice(w)
        path, took = self.start_and_connect(w, alice)
        self.assertEqual(path.mode, "direct")
        self.assertEqual(w.metrics.value("p2pnat_udp_dropped_total", reason="stale"), 3)
        self.assertLess(took, 0.06)

    def test_wrong_hint(self):
        """
        The hint said random ports; discovery finds a cone NAT: the request
        is made again from a new fresh socket, carrying the measured NAT.
        """
        w = World(self)
        w.client("bob")
        alice = self.alice(w, hint=RANDOM_HINT)
        path, _ = self.start_and_connect(w, alice)
        self.assertEqual(path.mode, "direct")
        requests = [opened(s.data) for s in w.net.sent
                    if s.dst == LOBBY and kind(s.data) == "ConnectRequest"]
        self.assertEqual([r.nat.allocation for r in requests][:1], ["random"])
        self.assertEqual(requests[-1].nat, CONE)
        self.assertNotEqual(requests[0].request_id, requests[-1].request_id)

    def test_plan_on_the_hint(self):
        """
        The introduction comes before discovery answered: our side plans
        with the NAT the request told the peer (the hint), as the peer
        does, not with an unknown NAT (which would mean a birthday punch).
        """
        w = World(self)
        w.client("bob")
        alice = self.alice(w)
        path, _ = self.start_and_connect(w, alice, answer_after=0.2)
        self.assertEqual((path.mode, path.strategy), ("direct", "simultaneous-open"))
        self.assertLess(path.probes, 5)

    def test_no_hint_waits_for_discovery(self):
        """Without a hint the request waits for discovery's answer, then goes."""
        w = World(self)
        w.client("bob")
        alice = self.alice(w, hint=None)
        path, took = self.start_and_connect(w, alice, answer_after=0.03)
        self.assertEqual(path.mode, "direct")
        requests = [s for s in w.net.sent if s.dst == LOBBY and kind(s.data) == "ConnectRequest"]
        self.assertEqual(len(requests), 1)
        self.assertGreaterEqual(took, 0.03 + 0.02)
        self.assertEqual(alice.nat.mapping, EI)


def opened(data):
    """The message of a frame of alice's (the test reads what she sent)."""
    return wire.parse(data).open(KEYS["alice"])
