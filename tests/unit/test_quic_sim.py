"""
Tests for L{p2pnat.quic} on a simulated network and a L{task.Clock}: the
timers (liveness, idle timeout, stream header deadline) to the
millisecond, flow control with a paused reader, a NAT that rebinds.
"""

import hashlib

from twisted.internet import error, task
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.quic import connection as quic_connection
from p2pnat.quic import endpoint as quic_endpoint
from p2pnat.quic import stream as quic_stream
from p2pnat.quic.connection import (DATAGRAMS_APART, MAX_DATAGRAM_PAYLOAD,
                                    STREAM_WINDOW)
from tests.support.quic import T0, Deployment, QuicPair, SinkFactory, Source, payload
from tests.support.udp import SimNat, SimNet

OPTIONS = {"keepalive_interval": 1.0, "silence_timeout": 3.0, "idle_timeout": 10.0}


class SimTestCase(SynchronousTestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0 + 60)
        self.net = SimNet(self.clock, latency=0.005)
        self.deployment = Deployment(now=T0)

    def pair(self, **kw):
        kw.setdefault("a_options", OPTIONS)
        kw.setdefault("b_options", OPTIONS)
        return QuicPair(self, self.clock, net=self.net, deployment=self.deployment, **kw)

    def run_for(self, seconds, step=0.001):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)

    def connect(self, pair):
        d = pair.connect()
        self.run_for(0.2)
        return self.successResultOf(d)

    def close(self, pair):
        for sock in pair.sockets:
            for ep in sock.endpoints:
                ep.close()
        self.run_for(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LivenessTests(SimTestCase):

    def test_silence_detected_within_bound(self):
        """
        When the path stops carrying anything, both sides report it silent
        no later than silence_timeout after the last packet that proved
        the peer alive (a PING's ACK), and at least silence_timeout minus
        one keepalive interval after the path was cut.
        """
        pair = self.pair()
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        silent = {}
        alice.on_silent = lambda: silent.setdefault("alice", self.clock.seconds())
        bob.on_silent = lambda: silent.setdefault("bob", self.clock.seconds())
        self.run_for(5)  # keepalives flow: nobody silent
        self.assertEqual(silent, {})
        cut = self.clock.seconds()
        self.net.lose = lambda src, dst, data: True
        self.run_for(5)
        for who in ("alice", "bob"):
            self.assertLessEqual(silent[who] - cut, OPTIONS["silence_timeout"] + 0.01)
            self.assertGreaterEqual(silent[who] - cut,
                                    OPTIONS["silence_timeout"] - OPTIONS["keepalive_interval"])
        self.assertTrue(alice.silent and bob.silent)

    def test_alive_again(self):
        """
        A path that comes back before the idle timeout is reported alive
        within one keepalive interval, and the connection carries on.
        """
        pair = self.pair()
        alice = self.connect(pair)
        alive = []
        alice.on_alive = lambda: alive.append(self.clock.seconds())
        self.net.lose = lambda src, dst, data: True
        self.run_for(4)
        self.assertTrue(alice.silent)
        back = self.clock.seconds()
        self.net.lose = lambda src, dst, data: False
        self.run_for(2)
        self.assertFalse(alice.silent)
        self.assertEqual(len(alive), 1)
        # PTO backoff after the losses may delay the first retransmission;
        # the next keepalive goes out within keepalive_interval anyway.
        self.assertLessEqual(alive[0] - back, OPTIONS["keepalive_interval"] + 0.1)
        self.assertNoResult(alice.closed)
        self.close(pair)

    def test_idle_timeout_closes(self):
        """
        A peer silent for idle_timeout (plus at most one keepalive
        interval) ends the connection on both sides (the reason says so),
        open streams see ConnectionLost, and no timer is left behind.
        """
        sink = SinkFactory()
        pair = self.pair(services={"s": sink})
        alice = self.connect(pair)
        source = Source(b"partial", close=None)
        alice.open_stream("s", source)
        self.run_for(0.1)
        ended = {}
        for who, ep in (("alice", alice), ("bob", pair.b_endpoints[0])):
            ep.closed.addCallback(
                lambda c, who=who: (ended.setdefault(who, self.clock.seconds()), c)[1])
        cut = self.clock.seconds()
        self.net.lose = lambda src, dst, data: True
        self.run_for(OPTIONS["idle_timeout"] + 2)
        closed = self.successResultOf(alice.closed)
        self.assertIn("idle timeout", closed.reason)
        self.assertFalse(closed.by_peer)
        for who in ("alice", "bob"):
            # QUIC restarts the idle timer at the first ack-eliciting packet
            # sent after the last one received (RFC 9000 section 10.1): at
            # the latest, the next keepalive.
            self.assertLessEqual(ended[who] - cut,
                                 OPTIONS["idle_timeout"] + OPTIONS["keepalive_interval"] + 0.01)
            self.assertGreaterEqual(ended[who] - cut, OPTIONS["idle_timeout"] - 0.1)
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionLost)
        self.assertIsInstance(self.successResultOf(sink.sinks[0].done)[2], error.ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_pings_when_idle(self):
        """
        With C{pings_when_idle=False} (a lobby path's connection), an idle
        connection sends nothing of its own: the path's keepalive calls
        L{ping}, whose ACK is heard (C{on_heard}), and that keeps it past
        idle_timeout.  Sending brings the PINGs back, every
        keepalive_interval, until a silence timeout after the last send.
        """
        options = dict(OPTIONS, pings_when_idle=False)
        pair = self.pair(a_options=options, b_options=options)
        alice = self.connect(pair)
        heard = []
        alice.on_heard = lambda: heard.append(self.clock.seconds())
        sent = []
        self.net.lose = lambda src, dst, data: sent.append(self.clock.seconds()) and False
        self.run_for(5, step=0.01)
        self.assertEqual(sent, [])
        for _ in range(8):  # a keepalive every 4 s, as a path would
            self.assertTrue(alice.ping())
            self.run_for(4, step=0.01)
        self.assertEqual(len(heard), 8)
        self.assertNoResult(alice.closed)  # 37 s > idle_timeout
        del sent[:]
        alice.send_datagram(b"x")
        self.run_for(OPTIONS["silence_timeout"] + 3, step=0.01)
        # The datagram and its ACK, then a PING and its ACK every second
        # for a silence timeout.
        self.assertGreaterEqual(len(sent), 2 + 2 * 2)
        self.assertLessEqual(len(sent), 2 + 2 * (OPTIONS["silence_timeout"] + 1))
        self.close(pair)

    def test_idle_cut_is_silent_only_once_the_application_sends(self):
        """
        With C{pings_when_idle=False}, a path cut while idle is not
        reported silent (the path's own keepalives watch an idle path);
        once the application sends, it is, within silence_timeout.
        """
        options = dict(OPTIONS, pings_when_idle=False)
        pair = self.pair(a_options=options, b_options=options)
        alice = self.connect(pair)
        self.run_for(3, step=0.01)
        alice.ping()  # a path keepalive
        self.run_for(1, step=0.01)
        self.net.lose = lambda src, dst, data: True
        # Longer than silence_timeout; the sending below ends before
        # idle_timeout ends the connection.
        self.run_for(4, step=0.01)
        self.assertFalse(alice.silent)
        sent = self.clock.seconds()
        silent = []
        alice.on_silent = lambda: silent.append(self.clock.seconds())
        alice.send_datagram(b"into the void")
        self.run_for(OPTIONS["silence_timeout"] + 0.5, step=0.01)
        self.assertEqual(len(silent), 1)
        self.assertLessEqual(silent[0] - sent, OPTIONS["silence_timeout"] + 0.01)

    def test_handshake_timeout(self):
        """A peer that never answers fails the connect after the handshake timeout."""
        pair = self.pair()
        self.net.lose = lambda src, dst, data: True
        d = pair.connect()
        self.run_for(quic_endpoint.HANDSHAKE_TIMEOUT + 1, step=0.01)
        self.assertIn("handshake timed out", str(self.failureResultOf(d).value))
        self.run_for(1, step=0.01)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StreamHeaderTests(SimTestCase):

    def test_header_deadline(self):
        """
        A stream that never completes its service header is refused after
        HEADER_TIMEOUT, and forgotten.
        """
        pair = self.pair(services={"ssh": SinkFactory()})
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        conn = alice.connection
        sid = conn.get_next_available_stream_id()
        conn.send_stream_data(sid, b"\x03ss")  # "ssh" needs one more byte
        alice.schedule_transmit()
        self.run_for(1)
        self.assertIn(sid, bob._headers)
        self.run_for(quic_endpoint.HEADER_TIMEOUT, step=0.01)
        self.assertEqual(bob._headers, {})
        self.assertIn(sid, bob._incoming_closed)

    def test_malformed_header(self):
        """A header with a zero length is refused at once."""
        factory = SinkFactory()
        pair = self.pair(services={"ssh": factory})
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        sid = alice.connection.get_next_available_stream_id()
        alice.connection.send_stream_data(sid, b"\x00ssh")
        alice.schedule_transmit()
        self.run_for(0.1)
        self.assertIn(sid, bob._incoming_closed)
        self.assertEqual(factory.sinks, [])


class FlowControlTests(SimTestCase):

    def test_paused_reader_bounds_memory(self):
        """
        A receiver that pauses its transport stops the sender: at most one
        stream window waits at the receiver, the sender's producer is
        paused with at most HIGH_WATER (plus one write) queued; once
        resumed, every byte arrives.
        """
        factory = SinkFactory()
        pair = self.pair(services={"bulk": factory})
        alice = self.connect(pair)
        data = payload(8 * STREAM_WINDOW)
        source = Source(data)
        transport = alice.open_stream("bulk", source)
        self.run_for(0.02)
        sink = factory.sinks[0]
        sink.transport.pauseProducing()
        self.run_for(3)
        received = sink.count + sum(len(b) for b in sink.transport._inbox)
        self.assertLessEqual(received, 2 * STREAM_WINDOW)
        self.assertLess(received, len(data))
        self.assertTrue(source.paused)
        self.assertLessEqual(alice.connection.unsent(transport.stream_id),
                             quic_stream.HIGH_WATER + Source.CHUNK)
        sink.transport.resumeProducing()
        self.run_for(5)
        count, digest, _ = self.successResultOf(sink.done)
        self.assertEqual((count, digest), (len(data), hashlib.sha256(data).hexdigest()))


class RebindingTests(SimTestCase):

    def test_nat_rebinding_mid_transfer(self):
        """
        Alice is behind a NAT that forgets its mappings mid-transfer (her
        next packets leave from a new public port): bob follows her and the
        transfer completes intact.
        """
        nat = SimNat("198.51.100.1", allocation="sequential", base=30000)
        self.net.nats["10.0.0.2"] = nat
        factory = SinkFactory(echo=True)
        pair = QuicPair(self, self.clock, net=self.net, deployment=self.deployment,
                        services={"echo": factory}, a_options=OPTIONS, b_options=OPTIONS)
        # Alice on a private address behind the NAT.
        pair.a_port.stopListening()
        self.clock.advance(0)
        pair.a_port = pair.listen(pair.a, ip="10.0.0.2")
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        data = payload(2_000_000)
        source = Source(data)
        alice.open_stream("echo", source)
        self.run_for(0.2)
        before = bob.peer_address
        self.assertEqual(before[0], "198.51.100.1")
        nat.forget()
        self.run_for(5)
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertNotEqual(bob.peer_address, before)


class ClosingTests(SimTestCase):

    def test_reader_closes_early(self):
        """
        A receiver that closes its stream while the sender still writes
        makes the sender stop (STOP_SENDING): the sender's protocol hears
        the end and nothing more is sent on that stream.
        """
        factory = SinkFactory()
        pair = self.pair(services={"bulk": factory})
        alice = self.connect(pair)
        source = Source(payload(4 * STREAM_WINDOW), close=None)
        transport = alice.open_stream("bulk", source)
        self.run_for(0.05)
        factory.sinks[0].transport.loseConnection()
        self.run_for(1)
        self.assertIsInstance(self.successResultOf(factory.sinks[0].done)[2],
                              error.ConnectionDone)
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionDone)
        self.assertFalse(transport.connected)
        sent_before = len(self.net.sent)
        self.run_for(0.5)
        # Only keepalives and acknowledgements from now on, no stream data.
        self.assertLess(len(self.net.sent) - sent_before, 10)

    def test_abort(self):
        """abortConnection resets both directions; the peer hears ConnectionLost."""
        factory = SinkFactory()
        pair = self.pair(services={"bulk": factory})
        alice = self.connect(pair)
        source = Source(b"x" * 1000, close=None)
        transport = alice.open_stream("bulk", source)
        self.run_for(0.05)
        transport.abortConnection()
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionAborted)
        self.run_for(0.1)
        reason = self.successResultOf(factory.sinks[0].done)[2]
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertIn("reset by the peer", str(reason))
        # The connection itself carries on.
        self.assertNoResult(alice.closed)


class DatagramLossTests(SimTestCase):
    """
    Datagrams sent together leave in a packet each
    (L{p2pnat.quic.connection.PeerConnection}): a packet lost on the wire
    loses one of them, as plain UDP would, not all.
    """

    def lose_first_to(self, addr):
        """Lose the next datagram sent to C{addr}; the list of what was lost."""
        lost = []

        def lose(src, dst, data):
            if dst == addr and not lost:
                lost.append(data)
                return True
            return False

        self.net.lose = lose
        return lost

    def quiet_pair(self):
        """A connection with nothing in flight: (pair, alice, bob, what bob's on_datagram got)."""
        pair = self.pair()
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        got = []
        bob.on_datagram = got.append
        self.run_for(0.5)
        return pair, alice, bob, got

    def to_bob(self, pair, before):
        """The UDP datagrams sent to bob since C{before} (an index of the net's C{sent})."""
        return [s for s in self.net.sent[before:] if s.dst == pair.b_addr]

    def test_one_packet_lost_loses_one_datagram(self):
        """
        Three datagrams sent at once, the first packet to bob lost: the
        other two arrive (aioquic put all three in that one packet).
        """
        pair, alice, bob, got = self.quiet_pair()
        before = len(self.net.sent)
        lost = self.lose_first_to(pair.b_addr)
        for i in range(3):
            alice.send_datagram(b"ping%d" % i)
        self.run_for(0.5)
        self.assertEqual(len(lost), 1)
        self.assertEqual(got, [b"ping1", b"ping2"])
        self.assertGreaterEqual(len(self.to_bob(pair, before)), 3)
        # What each side counts (logged when the connection ends).
        self.assertEqual((alice.counts["datagrams_sent"], bob.counts["datagrams_received"]),
                         (3, 2))
        on_wire = len(self.to_bob(pair, 0))
        self.assertEqual((alice.counts["packets_sent"], bob.counts["packets_received"]),
                         (on_wire, on_wire - 1))
        self.close(pair)

    def test_few_apart(self):
        """
        Up to L{DATAGRAMS_APART} datagrams sent at once, small and large,
        arrive in order, each in a UDP datagram of its own.
        """
        pair, alice, bob, got = self.quiet_pair()
        before = len(self.net.sent)
        sent = [(b"%d " % i).ljust(MAX_DATAGRAM_PAYLOAD if i % 7 == 0 else 20, b"x")
                for i in range(DATAGRAMS_APART)]
        for d in sent:
            alice.send_datagram(d)
        self.run_for(0.5)
        self.assertEqual(got, sent)
        self.assertGreaterEqual(len(self.to_bob(pair, before)), len(sent))
        self.close(pair)

    def test_fast_sender_not_throttled(self):
        """
        An application that sends faster than the pacer lets packets go
        (10 000 small datagrams a second, in bursts of 100 every 10 ms, at
        the start of a connection) loses none of them: once more than
        L{DATAGRAMS_APART} wait, they share packets.  (One packet each,
        the queue of L{MAX_PENDING_DATAGRAMS} overflowed.)
        """
        pair = self.pair()
        alice = self.connect(pair)
        bob = pair.b_endpoints[0]
        got = []
        bob.on_datagram = got.append
        before = len(self.net.sent)
        sent = [b"%d " % i + b"x" * 36 for i in range(2000)]
        for i in range(0, len(sent), 100):
            for d in sent[i:i + 100]:
                alice.send_datagram(d)
            self.run_for(0.01)
        self.run_for(1)
        self.assertEqual((alice.datagrams_dropped, len(got)), (0, len(sent)))
        self.assertEqual(got, sent)
        self.assertLess(len(self.to_bob(pair, before)), len(sent) / 4)
        self.close(pair)


class PacketSizeTests(SimTestCase):
    """
    Path MTU discovery: packets grow to the largest probed size the path
    carries, and shrink again when the path changes or stops carrying them.
    """

    def transfer(self, pair, alice, size=300_000, **hooks):
        """Echo C{size} bytes over a new stream; the sizes of the datagrams sent."""
        sizes = []
        lose = self.net.lose
        self.net.lose = lambda src, dst, data: (sizes.append(len(data)), lose(src, dst, data))[1]
        data = payload(size)
        source = Source(data)
        alice.open_stream("echo", source)
        self.run_for(5)
        self.assertIsInstance(self.successResultOf(source.done), error.ConnectionDone)
        self.assertEqual(source.received.hexdigest(), hashlib.sha256(data).hexdigest())
        self.net.lose = lose
        return sizes

    def echo_pair(self):
        pair = self.pair(services={"echo": SinkFactory(echo=True)})
        return pair, self.connect(pair)

    def test_largest_size_where_it_fits(self):
        """
        On a path that carries anything, both sides send packets of the
        largest probe size once the handshake is over, one probe each.
        """
        pair, alice = self.echo_pair()
        bob = pair.b_endpoints[0]
        for conn in (alice.connection, bob.connection):
            self.assertEqual(conn.datagram_size, quic_connection.PROBE_SIZES[0])
            self.assertEqual(conn.pmtu_probes, {"sent": 1, "acked": 1, "lost": 0,
                                                "fallbacks": 0})
        sizes = self.transfer(pair, alice)
        self.assertEqual(max(sizes), quic_connection.PROBE_SIZES[0])
        self.assertGreater(sizes.count(quic_connection.PROBE_SIZES[0]), 300)

    def test_smaller_path(self):
        """
        A path that drops datagrams above 1400 bytes: after MAX_PROBES lost
        probes of the largest size, the next one is used, and nothing
        larger is sent after that.
        """
        self.net.lose = lambda src, dst, data: len(data) > 1400
        pair, alice = self.echo_pair()
        self.run_for(3)
        conn = alice.connection
        self.assertEqual(conn.datagram_size, quic_connection.PROBE_SIZES[1])
        self.assertEqual(conn.pmtu_probes["lost"], quic_connection.MAX_PROBES)
        sizes = self.transfer(pair, alice)
        self.assertEqual(max(sizes), quic_connection.PROBE_SIZES[1])

    def test_base_size_path(self):
        """
        A path that carries nothing above the base size: every probe is
        lost, packets stay at the base size, and the lost probes take
        nothing from the congestion window.
        """
        self.net.lose = lambda src, dst, data: len(data) > quic_connection.BASE_DATAGRAM_SIZE
        pair, alice = self.echo_pair()
        self.run_for(3)
        conn = alice.connection
        self.assertEqual(conn.datagram_size, quic_connection.BASE_DATAGRAM_SIZE)
        self.assertEqual(conn.pmtu_probes["lost"],
                         quic_connection.MAX_PROBES * len(quic_connection.PROBE_SIZES))
        self.assertIsNone(conn._loss._cc.ssthresh)  # no congestion event: still slow start
        self.transfer(pair, alice)

    def test_black_hole(self):
        """
        Big packets stop passing mid-transfer: the sender falls back to the
        base size after BLACK_HOLE_PTOS probe timeouts, the transfer
        completes, and the large sizes are probed again PROBE_RETRY later.
        """
        pair, alice = self.echo_pair()
        conn = alice.connection
        self.assertEqual(conn.datagram_size, quic_connection.PROBE_SIZES[0])
        sizes = []

        def lose(src, dst, data):
            sizes.append(len(data))
            return len(data) > quic_connection.BASE_DATAGRAM_SIZE and len(sizes) > 50

        self.net.lose = lose
        data = payload(1_000_000)
        source = Source(data)
        alice.open_stream("echo", source)
        self.run_for(10)
        self.assertEqual(source.received.hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertGreaterEqual(conn.pmtu_probes["fallbacks"], 1)
        self.assertEqual(conn.datagram_size, quic_connection.BASE_DATAGRAM_SIZE)
        self.net.lose = lambda src, dst, data: False
        self.run_for(quic_connection.PROBE_RETRY + 2, step=0.01)
        alice.ping()
        self.run_for(1)
        self.assertEqual(conn.datagram_size, quic_connection.PROBE_SIZES[0])

    def test_route_change_probes_again(self):
        """
        When the route below QUIC changes, packets are of the base size
        until the new route's probe is acknowledged.
        """
        pair, alice = self.echo_pair()
        conn = alice.connection
        alice.route_changed()
        self.assertEqual(conn.datagram_size, quic_connection.BASE_DATAGRAM_SIZE)
        self.run_for(0.1)
        self.assertEqual(conn.datagram_size, quic_connection.PROBE_SIZES[0])
        self.assertEqual(conn.pmtu_probes["sent"], 2)
