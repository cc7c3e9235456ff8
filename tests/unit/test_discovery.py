"""
NAT behaviour discovery (:mod:`p2pnat.peer.discovery`) on a L{Clock}: the
client against a real lobby's sockets (L{ControlProtocol}s linked as
siblings), through simulated NATs of every kind, with loss and background
traffic; and once over loopback with real sockets.
"""

import json
import sys

from twisted.internet import defer, reactor, utils
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol, link_siblings
from p2pnat.peer import discovery
from p2pnat.peer.rtt import RttEstimator
from p2pnat.protocol import stun, wire
from p2pnat.protocol.nat import AD, APD, EI, NONE, UNKNOWN
from p2pnat.protocol.p2p import NatInfo
from tests.support import procs
from tests.support.udp import SimNat, SimNet, SimPort

A1, A2 = "198.18.1.1", "198.18.1.2"
FOUR = [(A1, 3478), (A1, 3479), (A2, 3478), (A2, 3479)]
# The order a client gives them: primary, other IP, both other, other port.
FOUR_ORDER = [(A1, 3478), (A2, 3478), (A2, 3479), (A1, 3479)]
TWO = [(A1, 3478), (A1, 3479)]
HOST = "10.0.1.2"
WAN = "198.18.2.1"
PUBLIC_HOST = "198.18.3.1"


class NoHandler:
    def key_for(self, key_id, mtype):
        return None


class Harness:
    def __init__(self, testcase, nat=None, lobby=FOUR, link=True, latency=0.002):
        self.clock = Clock()
        self.clock.advance(1000)
        self.net = SimNet(self.clock, latency)
        self.metrics = Metrics("lobby")
        replay = wire.ReplayGuard(self.clock)
        self.lobby = [ControlProtocol(NoHandler(), self.clock, self.metrics, replay,
                                      name="lobby.udp") for _ in lobby]
        for proto, (ip, port) in zip(self.lobby, lobby):
            self.net.listen(ip, proto, port)
        if link:
            link_siblings(self.lobby)
        self.nat = nat
        self.host = PUBLIC_HOST if nat is None else HOST
        if nat is not None:
            self.net.nats[HOST] = nat
        testcase.addCleanup(self.check_clean, testcase)

    def run(self, servers=None, step=0.001, limit=5.0, **options):
        servers = servers or (FOUR_ORDER if len(self.lobby) == 4 else TWO)
        d = discovery.Discovery(servers, self.clock,
                                lambda proto: self.net.listen(self.host, proto), **options).run()
        return self.wait(d, step, limit)

    def wait(self, d, step=0.001, limit=5.0):
        """Advance the clock in small steps until C{d} fires; its result."""
        results = []
        d.addBoth(results.append)
        start = self.clock.seconds()
        while not results and self.clock.seconds() - start < limit:
            self.clock.advance(step)
        assert results, "discovery did not finish"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def check_clean(self, testcase):
        # Every discovery socket closed; no timer of ours left behind.
        testcase.assertEqual([a for a in self.net.ports if a[0] == self.host], [])
        testcase.assertEqual(self.clock.getDelayedCalls(), [])
        testcase.assertEqual(self.net.errors, [])


def summary(b):
    return b.mapping, b.filtering, b.allocation, b.step


class KindsTests(SynchronousTestCase):
    """Each NAT kind, against a lobby with two IPs and with one."""

    CASES = [
        # name, NAT, four addresses, two addresses
        ("public", lambda: None, (NONE, NONE, "preserving", 0), (NONE, AD, "preserving", 0)),
        ("cone", lambda: SimNat(WAN), (EI, APD, "preserving", 0), (EI, APD, "preserving", 0)),
        ("full cone", lambda: SimNat(WAN, filtering=EI), (EI, EI, "preserving", 0),
         (EI, AD, "preserving", 0)),
        ("restricted cone", lambda: SimNat(WAN, filtering=AD), (EI, AD, "preserving", 0),
         (EI, AD, "preserving", 0)),
        ("sequential", lambda: SimNat(WAN, APD, APD, "sequential"),
         (APD, APD, "sequential", 1), (APD, APD, "sequential", 1)),
        ("sequential step 3", lambda: SimNat(WAN, APD, APD, "sequential", step=3),
         (APD, APD, "sequential", 3), (APD, APD, "sequential", 3)),
        ("address-dependent sequential", lambda: SimNat(WAN, AD, AD, "sequential"),
         (AD, AD, "sequential", 1), (EI, AD, "sequential", 1)),
        ("cone allocating sequentially", lambda: SimNat(WAN, EI, APD, "sequential"),
         (EI, APD, "sequential", 1), (EI, APD, "sequential", 1)),
        ("random", lambda: SimNat(WAN, APD, APD, "random"), (APD, APD, "random", 0),
         (APD, APD, "random", 0)),
    ]

    def test_four_addresses(self):
        for name, make, want, _ in self.CASES:
            h = Harness(self, make())
            result = h.run()
            self.assertEqual(summary(result.behaviour), want, name)
            public = (PUBLIC_HOST if h.nat is None else WAN)
            self.assertEqual(result.behaviour.public[0], public, name)
            if want[2] == "sequential":
                self.assertEqual(result.behaviour.rate, 0.0, name)

    def test_two_ports(self):
        for name, make, _, want in self.CASES:
            h = Harness(self, make(), lobby=TWO)
            self.assertEqual(summary(h.run().behaviour), want, name)

    def test_timing(self):
        """
        A run lasts the pause plus a few round trips: the filtered change
        requests give up a few RTOs of the measured RTT after they were
        sent (at least GIVE_UP_FLOOR), no longer the fixed GIVE_UP; it
        sends about 25 requests.
        """
        for nat in (None, SimNat(WAN)):
            h = Harness(self, nat)
            result = h.run()
            self.assertTrue(0.5 <= result.elapsed <= 0.56, result.elapsed)
            self.assertLessEqual(result.sent, 40)
        h = Harness(self, SimNat(WAN))
        result = h.run(pause=0.05, sockets=2)
        # The change requests left after about 5 round trips of 4 ms.
        self.assertTrue(discovery.GIVE_UP_FLOOR + 0.015 <= result.elapsed
                        <= discovery.GIVE_UP_FLOOR + 0.03, result.elapsed)
        self.assertEqual(len([p for p in result.observations.probes if p.socket > 0
                              and not p.change]), 5)


class ConditionsTests(SynchronousTestCase):
    def test_background_rate(self):
        """Ports taken by other traffic during the run give the rate."""
        for rate in (10, 20, 40):
            nat = SimNat(WAN, APD, APD, "sequential")
            h = Harness(self, nat)
            background = LoopingCall(nat.take)
            background.clock = h.clock
            background.start(1.0 / rate, now=False)
            b = h.run().behaviour
            background.stop()
            self.assertEqual((b.allocation, b.step), ("sequential", 1), rate)
            self.assertTrue(rate * 0.8 <= b.rate <= rate * 1.2, (rate, b.rate))

    def test_loss_retransmitted(self):
        """Each request's first copy lost: the retransmissions carry the run."""
        for make, want in ((lambda: SimNat(WAN), (EI, APD, "preserving", 0)),
                           (lambda: SimNat(WAN, APD, APD, "sequential"),
                            (APD, APD, "sequential", 1)),
                           (lambda: None, (NONE, NONE, "preserving", 0))):
            h = Harness(self, make())
            seen = set()

            def lose(src, dst, data, seen=seen):
                if data[0] != 0 or data[:2] != b"\x00\x01":  # answers pass
                    return False
                first = data not in seen
                seen.add(data)
                return first

            h.net.lose = lose
            result = h.run()
            self.assertEqual(summary(result.behaviour), want)
            # Each step waits for a retransmission: longer, within the deadline.
            self.assertTrue(1.0 < result.elapsed <= 2.0, result.elapsed)

    def test_lobby_unreachable(self):
        """No answer at all: unknown, given up after one request's retries."""
        h = Harness(self, SimNat(WAN))
        h.net.lose = lambda src, dst, data: True
        result = h.run()
        self.assertEqual(summary(result.behaviour), (UNKNOWN, UNKNOWN, UNKNOWN, 0))
        self.assertEqual(result.behaviour.notes, ("no answer from the lobby",))
        self.assertEqual(result.sent, 3)
        self.assertAlmostEqual(result.elapsed, discovery.GIVE_UP, places=2)

    def test_deadline(self):
        """
        Over a slow path (0.3 s each way) the run stops starting requests
        in time to end by its deadline.
        """
        h = Harness(self, SimNat(WAN), latency=0.3)
        result = h.run(deadline=2.0, schedule=(0.0, 0.7), give_up=0.65)
        self.assertLessEqual(result.elapsed, 2.0 + 1e-6)
        # Too slow for every step, but the main socket's two answers arrived.
        self.assertEqual(result.behaviour.mapping, EI)

    def test_lobby_without_rfc5780(self):
        """Sockets not linked as siblings answer change requests with 420."""
        h = Harness(self, SimNat(WAN), link=False)
        b = h.run().behaviour
        self.assertEqual(summary(b), (EI, UNKNOWN, "preserving", 0))
        self.assertIn("the lobby cannot answer from another address: filtering not tested",
                      b.notes)

    def test_answers_from_other_addresses_recorded(self):
        h = Harness(self, SimNat(WAN, filtering=EI))
        obs = h.run().observations
        changed = {p.change: p.answered_from for p in obs.probes if p.change}
        self.assertEqual(changed, {"ip+port": (A2, 3479), "port": (A1, 3479), "ip": (A2, 3478)})


class DiscoverNatTests(SynchronousTestCase):
    """What the P2P client logs in with: the NAT measured, or given with ``--nat``."""

    def test_measured(self):
        """
        Measured once per reactor, interface and lobby: the first answer
        comes after a round trip, with the filtering still unknown (its
        change requests may be silent until given up); the run goes on and
        the cache learns it (and, the ports being sequential, the rate from
        a full run right after); a second call answers at once, sending
        nothing.
        """
        h = Harness(self, SimNat(WAN, APD, APD, "sequential", step=2))
        info = h.wait(discovery.discover_nat(h.net, FOUR_ORDER, interface=HOST))
        self.assertEqual(info, NatInfo(APD, UNKNOWN, "sequential", 2, 0.0))
        self.assertLess(h.clock.seconds() - 1000, 0.02)
        cache = discovery.nat_cache(h.net, FOUR_ORDER, HOST)
        step(h, 1.0)
        self.assertEqual(cache.current, NatInfo(APD, APD, "sequential", 2, 0.0))
        self.assertEqual(cache.runs, 2)
        again = discovery.discover_nat(h.net, FOUR_ORDER, interface=HOST)
        self.assertEqual(self.successResultOf(again), cache.current)
        self.assertEqual(cache.runs, 2)
        self.assertEqual([a for a in h.net.ports if a[0] == HOST], [])
        self.assertIsNot(discovery.nat_cache(h.net, FOUR_ORDER, "10.0.1.3"), cache)

    def test_given(self):
        # Nothing is measured: no reactor is needed.
        for text, want in (
                ("address-and-port-dependent/sequential/2/3.5",
                 NatInfo(APD, UNKNOWN, "sequential", 2, 3.5)),
                ("endpoint-independent/sequential", NatInfo(EI, UNKNOWN, "sequential", 1, 0.0)),
                ("endpoint-independent/preserving", NatInfo(EI, UNKNOWN, "preserving", 0, 0.0))):
            d = discovery.discover_nat(None, [], interface="192.0.2.1", given=text)
            self.assertEqual(self.successResultOf(d), want, text)
            self.assertEqual(discovery.parse_nat(text), want)
        self.assertEqual(discovery.parse_nat("none/random/0/6553.5").encode(),
                         NatInfo(NONE, UNKNOWN, "random", 0, 6553.5).encode())

    def test_given_malformed(self):
        for text in ("", "cone", "cone/sequential", "endpoint-independent/odd",
                     "endpoint-independent/sequential/x", "endpoint-independent/random/1/fast",
                     "endpoint-independent/sequential/1/2/3",
                     "endpoint-independent/sequential/40000", "endpoint-independent/random/0/-1",
                     "endpoint-independent/random/0/7000"):
            f = self.failureResultOf(discovery.discover_nat(None, [], given=text), ValueError)
            self.assertTrue(f.getErrorMessage().startswith("--nat: "), f.getErrorMessage())


class StunSocketTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.net = SimNet(self.clock)
        self.sock = discovery.StunSocket(self.clock, 3)
        self.net.listen(HOST, self.sock, 5000)
        self.server = []
        self.net.ports[(A1, 3478)] = SimPort(self.net, self, (A1, 3478))

    def datagramReceived(self, data, addr):  # the "server"
        self.server.append((data, addr))

    def test_answer_matched(self):
        d = self.sock.query((A1, 3478))
        self.clock.advance(0.01)
        [(request, addr)] = self.server
        tid = stun.parse_message(request).transaction_id
        # Junk, a wrong transaction and a malformed answer are ignored.
        for junk in (b"", b"\x0c" * 40, stun.binding_request()[1], request[:30]):
            self.sock.datagramReceived(junk, (A1, 3478))
        self.assertNoResult(d)
        self.sock.datagramReceived(stun.answer_binding(request, ("198.18.2.9", 7)), (A2, 3479))
        probe = self.successResultOf(d)
        self.assertEqual(
            (probe.socket, probe.local, probe.server, probe.mapped, probe.answered_from),
            (3, (HOST, 5000), (A1, 3478), ("198.18.2.9", 7), (A2, 3479)))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(tid), 12)

    def test_refused(self):
        d = self.sock.query((A1, 3478), "port")
        self.clock.advance(0.01)
        [(request, _)] = self.server
        self.sock.datagramReceived(stun.answer_binding(request, (HOST, 5000)), (A1, 3478))
        probe = self.successResultOf(d)
        self.assertEqual((probe.change, probe.refused, probe.mapped), ("port", True, None))

    def advance(self, seconds):
        # In small steps: what is sent during a step arrives in a later one.
        for _ in range(round(seconds / 0.001)):
            self.clock.advance(0.001)

    def test_retransmissions_then_give_up(self):
        d = self.sock.query((A1, 3478), "ip+port")
        self.advance(0.05)
        self.assertEqual(len(self.server), 1)
        self.advance(0.1)
        self.assertEqual(len(self.server), 2)
        self.advance(0.2)
        self.assertEqual(len(self.server), 3)
        self.assertNoResult(d)
        self.advance(0.25)
        probe = self.successResultOf(d)
        self.assertEqual((probe.mapped, probe.refused), (None, False))
        self.assertEqual(len({data for data, _ in self.server}), 1)  # one transaction
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_gives_up(self):
        d = self.sock.query((A1, 3478))
        self.sock.close()
        self.assertIsNone(self.successResultOf(d).mapped)
        self.clock.advance(0.01)  # the request in flight
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LoopbackTests(TestCase):
    """Real sockets on loopback: a lobby on 127.0.0.1 and 127.0.0.2."""

    def lobby(self):
        clock = reactor
        metrics = Metrics("lobby")
        replay = wire.ReplayGuard(clock)
        protos, addresses = [], []
        first = None
        for ip in ("127.0.0.1", "127.0.0.2"):
            for i in range(2):
                proto = ControlProtocol(NoHandler(), clock, metrics, replay, name="lobby.udp",
                                        stun_rate=1000)
                port = reactor.listenUDP(first[i] if first and ip != "127.0.0.1" else 0, proto,
                                         interface=ip)
                self.addCleanup(port.stopListening)
                protos.append(proto)
                addresses.append((ip, port.getHost().port))
            first = [a[1] for a in addresses[:2]]
        link_siblings(protos)
        # primary, other IP, both other, other port
        return [addresses[0], addresses[2], addresses[3], addresses[1]]

    @defer.inlineCallbacks
    def test_discover(self):
        servers = self.lobby()
        result = yield discovery.discover(reactor, servers, interface="127.0.0.1")
        b = result.behaviour
        self.assertEqual(summary(b), (NONE, NONE, "preserving", 0), b)
        self.assertEqual(b.public, b.local)
        self.assertLess(result.elapsed, 1.0)
        info = discovery.to_nat_info(result)
        self.assertEqual((info.mapping, info.filtering, info.allocation, info.step, info.rate),
                         (NONE, NONE, "preserving", 0, 0.0))
        self.assertEqual(discovery.to_nat_info(b), info)

    @defer.inlineCallbacks
    def test_runner(self):
        servers = self.lobby()
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "p2pnat.peer.discovery", "--observations",
                             *[f"{ip}:{port}" for ip, port in servers]],
            env=procs.env(), path=procs.REPO)
        self.assertEqual(code, 0, err)
        d = json.loads(out.decode().strip().splitlines()[-1])
        self.assertEqual((d["mapping"], d["filtering"], d["allocation"]),
                         (NONE, NONE, "preserving"))
        self.assertEqual(d["public"], d["local"])
        self.assertEqual(len(d["observations"]["servers"]), 4)
        self.assertLess(d["elapsed"], 1.0)

    @defer.inlineCallbacks
    def test_runner_no_lobby(self):
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "p2pnat.peer.discovery", "127.0.0.1:9"],
            env=procs.env(), path=procs.REPO)
        self.assertEqual(code, 1, err)
        self.assertEqual(json.loads(out.decode())["mapping"], UNKNOWN)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "p2pnat.peer.discovery", "nowhere"],
            env=procs.env(), path=procs.REPO)
        self.assertEqual(code, 2)
        self.assertIn("expected HOST:PORT", err.decode())


class FastTests(SynchronousTestCase):
    """
    A fast run (C{fast=True}): every request at once, the answer as soon
    as the classification is decided (L{Discovery.decided}), the run
    itself until its last change request ends.
    """

    def fast(self, h, servers=FOUR_ORDER, **options):
        run = discovery.Discovery(servers, h.clock, lambda proto: h.net.listen(h.host, proto),
                                  fast=True, **options)
        full = run.run()
        return run, h.wait(run.decided), full

    def test_kinds(self):
        """
        Every kind as a step-by-step run finds it, after one round trip (4
        ms here; a moment's grace where change requests are still out);
        filtering unknown when it waits on silence, found by the run's end.
        """
        for name, make, want, _ in KindsTests.CASES:
            h = Harness(self, make())
            _, early, full = self.fast(h)
            b = early.behaviour
            self.assertEqual((b.mapping, b.allocation, b.step), (want[0], want[2], want[3]), name)
            self.assertIn(b.filtering, (want[1], UNKNOWN), name)
            if want[1] in (NONE, EI):
                # Decided by the answers themselves: nothing to wait for.
                self.assertEqual(b.filtering, want[1], name)
                self.assertLessEqual(early.elapsed, 0.0045, name)
            else:
                self.assertLessEqual(early.elapsed, 0.0055 + discovery.FILTER_GRACE[0], name)
            self.assertIsNone(b.rate, name)  # one burst: no rate
            result = h.wait(full)
            self.assertEqual(summary(result.behaviour), want, name)
            self.assertLessEqual(result.elapsed, discovery.GIVE_UP_FLOOR + 0.01, name)
            self.assertLessEqual(result.sent, 30, name)

    def test_allocation_in_send_order(self):
        """
        The requests leave together and their answers come in any order:
        the allocation is read in the order they were sent.
        """
        h = Harness(self, SimNat(WAN, APD, APD, "sequential", step=2))
        delays = iter([0.004, 0.001, 0.003, 0.0005] * 10)

        def reorder(src, dst, data):
            if src[0] in (A1, A2):  # an answer: delivered after a varied delay instead
                h.clock.callLater(next(delays), h.net._deliver, src, dst, data)
                return True
            return False

        h.net.lose = reorder
        _, early, full = self.fast(h)
        self.assertEqual(summary(early.behaviour)[2:], ("sequential", 2))
        h.wait(full)

    def test_loss(self):
        """The first copy of every request lost: the retransmissions carry the run."""
        h = Harness(self, SimNat(WAN))
        seen = set()

        def lose(src, dst, data):
            if data[:2] != b"\x00\x01":  # answers pass
                return False
            first = data not in seen
            seen.add(data)
            return first

        h.net.lose = lose
        _, early, full = self.fast(h)
        self.assertEqual(summary(early.behaviour), (EI, UNKNOWN, "preserving", 0))
        self.assertTrue(0.1 <= early.elapsed <= 0.11, early.elapsed)
        self.assertEqual(summary(h.wait(full).behaviour), (EI, APD, "preserving", 0))

    def test_lobby_unreachable(self):
        """No answer: unknown, decided when the requests give up (GIVE_UP: no RTT known)."""
        h = Harness(self, SimNat(WAN))
        h.net.lose = lambda src, dst, data: True
        run, early, full = self.fast(h)
        self.assertEqual(early.behaviour.notes, ("no answer from the lobby",))
        self.assertAlmostEqual(early.elapsed, discovery.GIVE_UP, places=2)
        self.assertIs(h.wait(full), early)
        self.assertFalse(run.rtt.known)


class TimersTests(SynchronousTestCase):
    """Discovery's retransmissions and give-up from the measured RTT (L{discovery.timers})."""

    def test_before_a_sample(self):
        rtt = RttEstimator(Clock())
        self.assertEqual(discovery.timers(rtt), (discovery.SCHEDULE, discovery.GIVE_UP))

    def test_floors(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.0001)
        schedule, give_up = discovery.timers(rtt)
        f = discovery.RETRANSMIT_FLOOR
        self.assertEqual(schedule, (0.0, f, 3 * f))
        self.assertEqual(give_up, discovery.GIVE_UP_FLOOR)

    def test_between(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.02)  # rto 0.06
        schedule, give_up = discovery.timers(rtt)
        self.assertEqual([round(t, 3) for t in schedule], [0.0, 0.06, 0.18])
        self.assertAlmostEqual(give_up, 0.3)

    def test_caps(self):
        rtt = RttEstimator(Clock())
        rtt.sample(0.5)
        self.assertEqual(discovery.timers(rtt), (discovery.SCHEDULE, discovery.GIVE_UP))

    def test_socket_retimed(self):
        """A pending request follows new timers from its first send; past times are skipped."""
        clock = Clock()
        net = SimNet(clock)
        sock = discovery.StunSocket(clock)
        net.listen(HOST, sock, 5000)
        d = sock.query((A1, 3478), "ip+port")
        clock.advance(0.04)
        sock.retime((0.0, 0.03, 0.09), 0.15)
        clock.advance(0.04)
        self.assertEqual(sock.sent, 1)  # the retransmission at 0.03 was past: skipped
        clock.advance(0.02)
        self.assertEqual(sock.sent, 2)  # at 0.09, not the old 0.1
        self.assertNoResult(d)
        clock.advance(0.06)
        self.assertEqual(sock.sent, 2)
        self.assertIsNone(self.successResultOf(d).mapped)  # given up at 0.15, not 0.6
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_rtt_measured_on_a_request_sent_once(self):
        """Karn's rule: an answer to a retransmitted request is no sample."""
        h = Harness(self, SimNat(WAN))
        seen = set()

        def lose(src, dst, data):
            first = data[:2] == b"\x00\x01" and data not in seen
            seen.add(data)
            return first

        h.net.lose = lose
        rtt = RttEstimator(h.clock)
        h.run(rtt=rtt)
        self.assertFalse(rtt.known)
        h = Harness(self, SimNat(WAN))
        h.run(rtt=rtt)
        self.assertAlmostEqual(rtt.srtt, 0.004, places=4)


def step(h, seconds):
    """Advance C{h}'s clock by C{seconds} in 1 ms steps (packets travel in between)."""
    for _ in range(round(seconds / 0.001)):
        h.clock.advance(0.001)


class NatCacheTests(SynchronousTestCase):
    """Discovery once, kept, refreshed in the background (L{discovery.NatCache})."""

    def cache(self, h, **options):
        return discovery.NatCache(h.clock, FOUR_ORDER, HOST,
                                  listen=lambda proto: h.net.listen(h.host, proto), **options)

    def test_once_then_cached(self):
        h = Harness(self, SimNat(WAN))
        cache = self.cache(h)
        seen = []
        cache.subscribe(seen.append)
        first, second = cache.get(), cache.get()  # the second joins the run under way
        found = h.wait(first)
        self.assertEqual(found, NatInfo(EI, UNKNOWN, "preserving", 0, 0.0))
        self.assertEqual(self.successResultOf(second), found)
        step(h, 0.2)  # the run's end: the filtering too
        self.assertEqual(cache.current, NatInfo(EI, APD, "preserving", 0, 0.0))
        self.assertEqual([n.filtering for n in seen], [UNKNOWN, APD])
        self.assertEqual(self.successResultOf(cache.get()), cache.current)
        self.assertEqual(cache.runs, 1)
        self.assertTrue(cache.rtt.known)

    def test_refresh(self):
        """
        refresh(): a full run (both bursts) at once, not while one is under
        way nor within MIN_GAP of the last; start() every REFRESH seconds.
        """
        h = Harness(self, SimNat(WAN))
        cache = self.cache(h, refresh=60.0)
        h.wait(cache.get())
        self.assertFalse(cache.refresh("under way"))
        step(h, 0.3)  # the fast run's end
        self.assertFalse(cache.refresh("too soon"))
        h.clock.advance(discovery.NatCache.MIN_GAP)
        self.assertTrue(cache.refresh("a path went silent"))
        self.assertFalse(cache.refresh("again"))
        step(h, 1.0)
        self.assertEqual(cache.runs, 2)
        sockets = {p.socket for p in cache.result.observations.probes}
        self.assertEqual(len(sockets), 10)  # main, filtering, two bursts of 4
        cache.start()
        cache.start()
        h.clock.advance(59.9)
        step(h, 0.2)
        self.assertEqual(cache.runs, 3)
        step(h, 1.0)
        cache.stop()
        h.clock.advance(61)
        self.assertEqual(cache.runs, 3)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_sequential_rate_measured_next(self):
        """
        A fast run has no rate; behind a sequential NAT a full run follows
        at once and measures it (other traffic taking 20 ports a second).
        """
        nat = SimNat(WAN, APD, APD, "sequential")
        h = Harness(self, nat)
        background = LoopingCall(nat.take)
        background.clock = h.clock
        background.start(1.0 / 20, now=False)
        cache = self.cache(h)
        seen = []
        cache.subscribe(seen.append)
        self.assertEqual(h.wait(cache.get()).rate, 0.0)
        step(h, 1.0)
        background.stop()
        self.assertEqual(cache.runs, 2)
        self.assertTrue(16 <= cache.current.rate <= 24, cache.current)
        self.assertEqual(seen[-1], cache.current)
        step(h, 0.5)
        self.assertEqual(cache.runs, 2)  # and no more

    def test_unanswered_keeps_the_known(self):
        """A run with no answer (the lobby down a moment) does not forget the NAT."""
        h = Harness(self, SimNat(WAN))
        cache = self.cache(h)
        h.wait(cache.get())
        step(h, 0.3)
        h.clock.advance(discovery.NatCache.MIN_GAP)
        known = cache.current
        seen = []
        cache.subscribe(seen.append)
        h.net.lose = lambda src, dst, data: True
        cache.refresh()
        step(h, 2.5)
        self.assertEqual((cache.current, seen, cache.runs), (known, [], 2))

    def test_first_unanswered_retried(self):
        """Unknown is not cached: the next get() measures again."""
        h = Harness(self, SimNat(WAN))
        h.net.lose = lambda src, dst, data: True
        cache = self.cache(h)
        self.assertEqual(h.wait(cache.get()).mapping, UNKNOWN)
        step(h, 1)
        h.net.lose = lambda src, dst, data: False
        self.assertEqual(h.wait(cache.get()).mapping, EI)
        step(h, 1)
        self.assertEqual(cache.runs, 2)

    def test_process_cache(self):
        """nat_cache: one per reactor, interface and lobby; cached_for finds it by its primary."""
        clock = Clock()
        cache = discovery.nat_cache(clock, FOUR_ORDER, HOST)
        self.assertIs(discovery.nat_cache(clock, FOUR_ORDER, HOST), cache)
        self.assertIsNot(discovery.nat_cache(Clock(), FOUR_ORDER, HOST), cache)
        self.assertIs(discovery.cached_for(clock, FOUR_ORDER[0]), cache)
        self.assertIs(discovery.cached_for(clock, FOUR_ORDER[0], HOST), cache)
        self.assertIsNone(discovery.cached_for(clock, FOUR_ORDER[0], "10.0.1.3"))
        self.assertIsNone(discovery.cached_for(clock, FOUR_ORDER[1]))
