"""
Candidates of the P2P path: a port-mapped IPv4 address and a global IPv6
address, exchanged through the real lobby logic and punched by the real
client on a simulated internet (L{tests.support.udp.SimNet}): a granted
mapping makes two random-port NATs meet directly; a dual-stack pair
behind stateful IPv6 firewalls prefers its direct IPv6 path; without
candidates nothing changes; an older lobby or peer gets what it knows.
"""

from collections import namedtuple

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer.sockets import SharedSocket
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from p2pnat.protocol.strategy import CANDIDATE_ROUND, IPV6_GRACE
from tests.support.udp import SimNat
from tests.unit.test_peer_client import CONE, HOSTS, RANDOM, SIM, World, exchange, kind

EI, APD = "endpoint-independent", "address-and-port-dependent"
#: Each host's global IPv6 address, behind its router's stateful firewall.
HOSTS6 = {"alice": "2001:2:0:1::10", "bob": "2001:2:0:2::10", "carol": "2001:2:0:3::10"}
#: The port a router that grants mappings gives.
EXTERNAL_PORT = 33333

#: What L{p2pnat.portmap.PortMapper} grants (its C{Mapping}'s fields).
Mapping = namedtuple("Mapping", "protocol external internal_port lifetime granted_at")


class MappingNat(SimNat):
    """
    A L{SimNat} whose router grants port mappings, as miniupnpd does on
    Linux: datagrams to the external port go to the mapped socket from
    anywhere (a DNAT rule), and the socket's answers to those senders leave
    from the external port (conntrack's reply direction).  What the socket
    sends to anyone else is NATed as any other traffic.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static = {}  # external port -> private address
        self.came_in = {}  # external port -> sources seen

    def outbound(self, src, dst):
        for port, private in self.static.items():
            if private == src and dst in self.came_in[port]:
                return self.ip, port
        return super().outbound(src, dst)

    def inbound(self, port, src):
        if port in self.static:
            self.came_in[port].add(src)
            return self.static[port]
        return super().inbound(port, src)


class FakeMapper:
    """
    A test double of L{p2pnat.portmap.PortMapper} (the same calls), on a
    L{MappingNat}: C{map()} fires after C{delay} seconds with a mapping of
    L{EXTERNAL_PORT} (or None when C{grant} is false); C{stopService}
    deletes it.
    """

    def __init__(self, nat, host, grant=True, delay=0.0):
        self.nat, self.host, self.grant, self.delay = nat, host, grant, delay
        self.current = None
        self.running = False
        self.subscribers = []
        self.internal_port = None

    def __call__(self, reactor, internal_port):
        self.reactor, self.internal_port = reactor, internal_port
        return self

    def startService(self):
        self.running = True

    def stopService(self):
        self.running = False
        self.nat.static.pop(EXTERNAL_PORT, None)
        self.current = None
        return defer.succeed(None)

    def subscribe(self, callback):
        self.subscribers.append(callback)

    def map(self):
        d = defer.Deferred()

        def done():
            if self.grant and self.running:
                self.nat.static[EXTERNAL_PORT] = (self.host, self.internal_port)
                self.nat.came_in[EXTERNAL_PORT] = set()
                self.current = Mapping("pcp", (self.nat.ip, EXTERNAL_PORT), self.internal_port,
                                       7200, self.reactor.seconds())
            d.callback(self.current)

        self.reactor.callLater(self.delay, done)
        return d


class CandidateWorld(World):
    """L{World} with routers that can grant mappings and hosts with IPv6."""

    def client(self, name, nat=CONE, login=True, mapping=None, ipv6=False, **options):
        """
        @param mapping: None (the router does not speak any mapping
            protocol), or C{dict(grant=..., delay=...)} for a L{FakeMapper}.
        @param ipv6: the host has a global IPv6 address behind a stateful
            firewall, and the client opens its IPv6 socket there.
        """
        host, public = HOSTS[name]
        router = MappingNat(public, base=20000 + 1000 * len(self.clients),
                            seed=len(self.clients), **SIM[nat])
        if mapping is not None:
            self.mappers = getattr(self, "mappers", {})
            self.mappers[name] = options["portmap"] = FakeMapper(router, host, **mapping)
        if ipv6:
            ip6 = HOSTS6[name]
            # A stateful firewall: what came in answers what went out; no NAT.
            self.net.nats[ip6] = SimNat(ip6, mapping=EI, filtering=APD, allocation="preserving")
            options["ipv6"] = ip6
        client = super().client(name, nat, login=False, **options)
        self.net.nats[host] = router
        if login:
            d = client.start()
            self.advance(0.05 + (mapping or {}).get("delay", 0))
            self.testcase.successResultOf(d)
        return client

    def v6(self):
        """Datagrams on the wire between IPv6 addresses."""
        return [s for s in self.net.sent if ":" in s.dst[0]]

    def stop(self):
        World.stop(self)
        # The IPv6 sockets closed too.
        self.testcase.assertEqual([a for a in self.net.ports if a[0] in HOSTS6.values()], [])


def connected(testcase, w, a="alice", b="bob"):
    path = w.connect(a, b)
    w.advance(0.3)
    [incoming] = w.incoming[b]
    return path, incoming


class PortMappingTests(SynchronousTestCase):
    def test_mapping_makes_random_pairs_direct(self):
        """
        Two random-port NATs, and A's router grants a mapping: B probes
        A's mapped address, A answers from the mapped socket, and the pair
        goes direct where it was relayed before.
        """
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, mapping={})
        w.client("bob", RANDOM)
        self.assertEqual(alice.candidates(), [("203.0.113.1", EXTERNAL_PORT)])
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.candidate), ("direct", "mapped"))
        self.assertEqual((incoming.mode, incoming.candidate), ("direct", "peer-mapped"))
        self.assertEqual(incoming.direct[1], ("203.0.113.1", EXTERNAL_PORT))
        exchange(self, w, path, incoming, via_lobby=False)

    def test_answering_side_mapped(self):
        """B's mapping, offered in its answer, serves A's probes just as well."""
        w = CandidateWorld(self)
        w.client("alice", RANDOM)
        w.client("bob", RANDOM, mapping={})
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.candidate), ("direct", "peer-mapped"))
        self.assertEqual((incoming.mode, incoming.candidate), ("direct", "mapped"))
        exchange(self, w, path, incoming, via_lobby=False)

    def test_no_mapping_granted_relayed_as_today(self):
        """
        A router that grants nothing: no candidate, no probe, and the relay
        comes as soon as without port mapping at all.
        """
        times = {}
        for asked in (False, True):
            w = CandidateWorld(self)
            alice = w.client("alice", RANDOM, mapping={"grant": False} if asked else None)
            w.client("bob", RANDOM)
            self.assertEqual(alice.candidates(), [])
            start = w.clock.seconds()
            path = w.connect("alice", "bob")
            times[asked] = w.clock.seconds() - start
            self.assertEqual((path.mode, path.strategy, path.candidate),
                             ("relayed", "relay", None))
            self.assertEqual(w.between("alice", "bob"), [])
            w.stop()
        self.assertEqual(times[True], times[False])

    def test_login_waits_for_the_mapping_budget_only(self):
        """start() fires once logged in and the mapping attempt ended, both at once."""
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, login=False, mapping={"delay": 0.4})
        d = alice.start()
        w.advance(0.2)
        self.assertNoResult(d)  # logged in, the mapper still asking
        self.assertIsNotNone(alice.public)
        w.advance(0.25)
        self.assertIs(self.successResultOf(d), alice)
        self.assertEqual(alice.candidates(), [("203.0.113.1", EXTERNAL_PORT)])

    def test_mapping_deleted_on_stop(self):
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, mapping={})
        mapper = w.mappers["alice"]
        self.assertTrue(mapper.running)
        self.successResultOf(alice.stop())
        w.advance(0.01)  # the sockets close
        self.assertFalse(mapper.running)
        self.assertEqual(mapper.nat.static, {})

    def test_mapped_socket_shared_by_sessions(self):
        """Two peers reach A's one mapped socket at once: each session has its own path."""
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, mapping={})
        w.client("bob", RANDOM)
        w.client("carol", RANDOM)
        to_bob = w.connect("bob", "alice")
        to_carol = w.connect("carol", "alice")
        w.advance(0.3)
        from_bob, from_carol = w.incoming["alice"]
        self.assertEqual([p.candidate for p in (from_bob, from_carol)], ["mapped", "mapped"])
        self.assertIs(from_bob.direct[0].shared, from_carol.direct[0].shared)
        exchange(self, w, to_bob, from_bob, via_lobby=False)
        exchange(self, w, to_carol, from_carol, via_lobby=False)
        # One path closes: its lease ends, the socket stays for the other.
        from_bob.close()
        shared = alice.shared["mapped"]
        self.assertEqual(len(shared.leases), 1)
        self.assertIsNotNone(shared.proto.transport)
        exchange(self, w, to_carol, from_carol, via_lobby=False)


class IPv6Tests(SynchronousTestCase):
    def test_dual_stack_prefers_ipv6(self):
        """Two cone NATs and two IPv6 firewalls: both families work, IPv6 is taken."""
        w = CandidateWorld(self)
        w.client("alice", CONE, ipv6=True)
        w.client("bob", CONE, ipv6=True)
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.candidate), ("direct", "ipv6"))
        self.assertEqual((incoming.mode, incoming.candidate), ("direct", "ipv6"))
        self.assertEqual(path.direct[1][0], HOSTS6["bob"])
        self.assertEqual(incoming.direct[1][0], HOSTS6["alice"])
        before = len(w.net.sent)
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertTrue(all(":" in s.dst[0] for s in w.net.sent[before:]
                            if kind(s.data) == "Data"))

    def test_random_nats_direct_over_ipv6(self):
        """A dual-stack pair whose IPv4 side is random-port NATs goes direct over IPv6."""
        w = CandidateWorld(self)
        w.client("alice", RANDOM, ipv6=True)
        w.client("bob", RANDOM, ipv6=True)
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.strategy, path.candidate),
                         ("direct", "relay", "ipv6"))
        self.assertEqual((incoming.mode, incoming.candidate), ("direct", "ipv6"))
        exchange(self, w, path, incoming, via_lobby=False)

    def test_firewalls_drop_the_first_probe(self):
        """
        The firewalls are stateful: B's first IPv6 probe, sent before A
        sent any, does not pass A's firewall; A's probes open it.
        """
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, ipv6=True)
        w.client("bob", RANDOM, ipv6=True)
        arrived = []
        proto = alice.shared["ipv6"].proto
        received = proto.datagramReceived
        self.patch(proto, "datagramReceived",
                   lambda data, addr: (arrived.append(data), received(data, addr)))
        path, _ = connected(self, w)
        self.assertEqual(path.candidate, "ipv6")
        to_alice = [s for s in w.v6() if s.dst[0] == HOSTS6["alice"]]
        first_from_alice = next(i for i, s in enumerate(w.net.sent) if s.src[0] == HOSTS6["alice"])
        self.assertLess(w.net.sent.index(to_alice[0]), first_from_alice)
        self.assertNotIn(to_alice[0].data, arrived)
        self.assertTrue(arrived)

    def test_ipv6_on_one_side_only(self):
        """No IPv6 probe when the peer has no IPv6 candidate; the pair punches as before."""
        w = CandidateWorld(self)
        w.client("alice", CONE, ipv6=True)
        w.client("bob", CONE)
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.candidate), ("direct", "observed"))
        self.assertEqual(w.v6(), [])

    def test_broken_ipv6_costs_the_grace_at_most(self):
        """
        IPv6 lost on the way: the IPv4 path is taken IPV6_GRACE after it
        worked, and both sides take the same one.
        """
        times = {}
        for v6 in (False, True):
            w = CandidateWorld(self)
            w.net.lose = lambda src, dst, data: ":" in dst[0]
            w.client("alice", CONE, ipv6=v6)
            w.client("bob", CONE, ipv6=v6)
            start = w.clock.seconds()
            path = w.connect("alice", "bob")
            times[v6] = w.clock.seconds() - start
            w.advance(0.3)
            [incoming] = w.incoming["bob"]
            self.assertEqual((path.candidate, incoming.candidate), ("observed", "observed"))
            exchange(self, w, path, incoming, via_lobby=False)
            w.stop()
        self.assertApproximates(times[True] - times[False], IPV6_GRACE, 0.011)

    def test_candidates_that_fail_cost_one_round(self):
        """
        Random-port NATs and IPv6 on both sides, but IPv6 does not pass: one
        round of candidate probes, then the relay (another round would
        probe the same candidates again).
        """
        w = CandidateWorld(self)
        w.net.lose = lambda src, dst, data: ":" in dst[0]
        w.client("alice", RANDOM, ipv6=True)
        w.client("bob", RANDOM, ipv6=True)
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.rounds), ("relayed", 1))
        self.assertLess(w.clock.seconds() - start, CANDIDATE_ROUND + 0.5)
        self.assertTrue(w.v6())

    def test_late_ipv6_loses_to_ipv4(self):
        """An IPv6 path that works only after the grace: the first verified path (IPv4) wins."""
        w = CandidateWorld(self)
        w.client("alice", CONE, ipv6=True)
        w.client("bob", CONE, ipv6=True)
        until = w.clock.seconds() + 0.5
        w.net.lose = lambda src, dst, data: ":" in dst[0] and w.clock.seconds() < until
        path, incoming = connected(self, w)
        self.assertEqual((path.candidate, incoming.candidate), ("observed", "observed"))
        exchange(self, w, path, incoming, via_lobby=False)

    def test_sides_that_settled_apart_meet_on_ipv6(self):
        """
        B's IPv6 probes reach A only late (after A took IPv4 and its
        grace ran out) while A's reach B at once: B takes IPv6, A IPv4.
        Each side still takes the other's traffic, and A moves to IPv6 as
        soon as B's arrives there.
        """
        w = CandidateWorld(self)
        w.client("alice", CONE, ipv6=True)
        w.client("bob", CONE, ipv6=True)
        until = w.clock.seconds() + 0.3
        w.net.lose = lambda src, dst, data: (dst[0] == HOSTS6["alice"]
                                             and w.clock.seconds() < until)
        path = w.connect("alice", "bob")
        w.advance(0.05)
        [incoming] = w.incoming["bob"]
        self.assertEqual((path.candidate, incoming.candidate), ("observed", "ipv6"))
        w.advance(0.3)
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertEqual((path.candidate, path.direct[1][0]), ("ipv6", HOSTS6["bob"]))
        before = len(w.net.sent)
        exchange(self, w, path, incoming, via_lobby=False)
        self.assertTrue(all(":" in s.dst[0] for s in w.net.sent[before:]
                            if kind(s.data) == "Data"))
        # Closing releases every socket and lease (checked when the world stops).
        path.close()
        w.advance(0.05)
        self.assertEqual(incoming.mode, "closed")

    def test_unknown_sessions_dropped_on_the_shared_socket(self):
        """A frame on the IPv6 socket for no session of ours is dropped, not answered."""
        w = CandidateWorld(self)
        alice = w.client("alice", CONE, ipv6=True)
        shared = alice.shared["ipv6"]
        before = len(w.net.sent)
        sid = bytes(16)
        data = wire.seal(M.Probe(1, 1), M.session_key_id(sid, "b"), bytes(32), 1)
        shared.proto.datagramReceived(data, (HOSTS6["bob"], 4000, 0, 0))
        self.assertEqual(len(w.net.sent), before)
        self.assertEqual(alice.metrics.value("p2pnat_udp_dropped_total", reason="unknown-key"), 1)

    def test_leases_bounded(self):
        w = CandidateWorld(self)
        alice = w.client("alice", CONE, ipv6=True)
        shared = alice.shared["ipv6"]
        self.patch(SharedSocket, "MAX_LEASES", 2)

        class S:
            def __init__(self, n):
                self.peer_key_id = f"{n:032x}.b"

        ports = [shared.lease(S(n), None) for n in range(3)]
        self.assertIsNone(ports[2])
        ports[0].stopListening()
        self.assertIsNotNone(shared.lease(S(3), None))


class CompatibilityTests(SynchronousTestCase):
    def test_older_lobby_gets_no_candidates(self):
        """A lobby whose Welcome does not say it relays candidates gets the old requests."""
        w = CandidateWorld(self)

        def plain_welcome(frame, addr, proto, now):
            return M.Welcome(frame.timestamp, addr, int(now * 1e6), w.lobby.keepalive)

        self.patch(w.lobby, "_welcome", plain_welcome)
        alice = w.client("alice", CONE, ipv6=True)
        w.client("bob", CONE, ipv6=True)
        self.assertFalse(alice.lobby_candidates)
        path, incoming = connected(self, w)
        self.assertEqual((path.mode, path.candidate), ("direct", "observed"))
        requests = [wire.parse(s.data) for s in w.net.sent
                    if kind(s.data) in ("ConnectRequest", "Answer")]
        self.assertTrue(requests)
        for frame in requests:
            message = wire.MESSAGES[frame.type].decode_body(frame.body)
            self.assertEqual(message.candidates, ())

    def test_older_peer_costs_no_time(self):
        """
        B of an older release reads no candidates: the lobby says so, and
        A, mapped, does not wait on its mapped socket for B's probes: the
        relay comes as fast as without a mapping.
        """
        w = CandidateWorld(self)
        w.client("alice", RANDOM, mapping={})
        bob = w.client("bob", RANDOM, login=False)
        older = bob._send_lobby

        def unflagged(proto, message, stamp=None):
            data = wire.seal(message, bob.id, bob.key, stamp or bob.stamper())
            proto.send(data, bob.lobby, type(message).__name__)
            return True

        self.patch(bob, "_send_lobby", unflagged)
        self.assertIsNotNone(older)
        d = bob.start()
        w.advance(0.05)
        self.successResultOf(d)
        start = w.clock.seconds()
        path = w.connect("alice", "bob")
        self.assertEqual((path.mode, path.strategy), ("relayed", "relay"))
        self.assertLess(w.clock.seconds() - start, 0.2)
        invite = next(wire.parse(s.data) for s in w.net.sent if kind(s.data) == "Invite")
        self.assertEqual(M.Invite.decode_body(invite.body).candidates, ())


class StartTests(SynchronousTestCase):
    def test_given_up_start_then_late_login(self):
        """The caller gave up on start() (a timeout): the late Welcome changes nothing."""
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, login=False, mapping={})
        d = alice.start()
        d.errback(RuntimeError("gave up"))
        self.failureResultOf(d, RuntimeError)
        w.advance(0.05)
        self.assertIsNotNone(alice.public)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_mapper_that_fails_anyway(self):
        """A mapper that breaks its promise never to fail: logged, no candidate, logged in."""
        w = CandidateWorld(self)
        alice = w.client("alice", RANDOM, login=False, mapping={})
        mapper = w.mappers["alice"]
        self.patch(mapper, "map", lambda: defer.fail(OSError("gateway gone")))
        d = alice.start()
        w.advance(0.05)
        self.assertIs(self.successResultOf(d), alice)
        self.assertEqual(alice.candidates(), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
