"""
The path's datagrams on the encrypted channel (L{p2pnat.peer.streams}):
C{Path.send} and C{on_datagram} ride QUIC DATAGRAM frames once both
peers run QUIC over the path, direct or relayed, and the lobby never sees
them; before the handshake they wait (bounded); too large is an error;
a side without a certificate makes both fall back to the clear, and says
so.  On the simulated internet of L{tests.unit.test_peer_streams}.
"""

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import streams as S
from p2pnat.protocol import p2p as M
from p2pnat.quic import HandshakeFailed, is_quic
from tests.unit.test_peer_client import CONE, HOSTS, LOBBY, RANDOM, kind
from tests.unit.test_peer_streams import MARKER, Peers


class Settled:
    """Records C{on_settled} calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, encrypted, reason):
        self.calls.append((encrypted, reason))


def sniff_lobby(p):
    """Every datagram the lobby's socket receives, from now on."""
    seen = []
    lobby_in = p.w.lobby_proto.datagramReceived
    p.w.lobby_proto.datagramReceived = lambda data, addr: (seen.append(data),
                                                           lobby_in(data, addr))
    return seen


def start_quic(p, path, incoming, a_creds=None, b_creds=None):
    """
    accept_streams on bob's side, connect_streams on alice's, without
    letting time pass: C{(alice's results, bob's PathStreams, alice's
    Settled, bob's Settled)}.
    """
    settled_a, settled_b = Settled(), Settled()
    b = S.accept_streams(incoming, b_creds or p.creds("bob"), {}, on_settled=settled_b)
    p.streams.append(b)
    results = []
    S.connect_streams(path, a_creds or p.creds("alice"),
                      on_settled=settled_a).addBoth(results.append)
    return results, b, settled_a, settled_b


class EncryptedTests(SynchronousTestCase):
    def exchange(self, nat):
        """
        alice sends the marker before the handshake is over; it waits,
        goes in a QUIC datagram once it is, reaches bob's on_datagram, and
        bob's answer reaches alice's.  Nothing on the simulated internet
        carries the marker in the clear.
        """
        p = Peers(self, nat, nat)
        seen = sniff_lobby(p)
        path, incoming = p.connect()
        got_a, got_b = [], []
        path.on_datagram, incoming.on_datagram = got_a.append, got_b.append
        results, b, settled_a, settled_b = start_quic(p, path, incoming)
        a = path.channel
        self.assertIsInstance(a, S.PathStreams)
        path.send(MARKER + b" from alice")
        self.assertEqual((a.encrypted, len(a.queue), got_b), (None, 1, []))
        p.w.advance(2)
        self.assertIs(results[0], a)
        p.streams.append(a)
        self.assertEqual((settled_a.calls, settled_b.calls), ([(True, None)], [(True, None)]))
        self.assertEqual(got_b, [MARKER + b" from alice"])
        incoming.send(MARKER + b" from bob")
        p.w.advance(0.5)
        self.assertEqual(got_a, [MARKER + b" from bob"])
        self.assertFalse([d for d in seen if MARKER in d])
        self.assertFalse([s for s in p.w.net.sent if MARKER in s.data])
        return p, path, incoming, a, b, seen

    def test_direct(self):
        _, path, _, a, _, _ = self.exchange(nat=CONE)
        self.assertEqual(path.mode, "direct")
        self.assertEqual(a.packets_sent["relayed"], 0)

    def test_relayed(self):
        """Through the lobby's relay: it passes the datagrams on, and cannot read them."""
        _, path, _, a, _, seen = self.exchange(nat=RANDOM)
        self.assertEqual(path.mode, "relayed")
        self.assertGreater(a.packets_sent["relayed"], 0)
        self.assertEqual(a.packets_sent["direct"], 0)
        self.assertTrue(seen)

    def test_largest_datagram_both_routes(self):
        """
        L{S.MAX_DATAGRAM} bytes pass, direct and relayed; one more is a
        ValueError that says the limit.
        """
        for nat in (CONE, RANDOM):
            p, path, incoming, _, _, _ = self.exchange(nat=nat)
            got = []
            incoming.on_datagram = got.append
            big = bytes(range(256)) * 4 + MARKER * 5
            big = big + bytes(S.MAX_DATAGRAM - len(big))
            path.send(big)
            p.w.advance(0.5)
            self.assertEqual(got, [big])
            with self.assertRaises(ValueError) as caught:
                path.send(big + b"x")
            self.assertIn(str(S.MAX_DATAGRAM), str(caught.exception))
            self.assertFalse([s for s in p.w.net.sent if MARKER in s.data])

    def test_too_large_before_handshake(self):
        """The limit holds for a datagram that would wait too: not queued, an error."""
        p = Peers(self)
        path, incoming = p.connect()
        start_quic(p, path, incoming)
        self.assertRaises(ValueError, path.send, bytes(S.MAX_DATAGRAM + 1))
        self.assertEqual(len(path.channel.queue), 0)
        p.streams.append(path.channel)

    def test_queue_bounded(self):
        """
        Before the handshake at most L{S.QUEUE} wait: the oldest go, counted;
        the rest arrive in order once it is over.
        """
        p = Peers(self)
        path, incoming = p.connect()
        got = []
        incoming.on_datagram = got.append
        start_quic(p, path, incoming)
        a = path.channel
        p.streams.append(a)
        sent = [b"d%d" % i for i in range(S.QUEUE + 5)]
        for d in sent:
            path.send(d)
        self.assertEqual((len(a.queue), a.queue.dropped), (S.QUEUE, 5))
        p.w.advance(2)
        self.assertEqual(got, sent[5:])

    def test_first_packet_lost_at_path_start(self):
        """
        Three datagrams sent before the handshake is over wait, and leave
        once alice's side of it is done (behind her Finished), in a QUIC
        packet each, direct or relayed.  Losing the first packet she sends
        then (direct: a 1-RTT packet with a datagram in it; relayed: a
        fragment of her Finished, so that bob cannot read what follows it
        yet) loses none of them: what was sent before the handshake was
        confirmed and is lost goes again.  (All three used to share one
        packet; then, with one each behind the Finished, the direct case
        lost one and the relayed case all three.)
        """
        for nat in (CONE, RANDOM):
            p = Peers(self, nat, nat)
            path, incoming = p.connect()
            got = []
            incoming.on_datagram = got.append
            _, _, settled_a, _ = start_quic(p, path, incoming)
            p.streams.append(path.channel)
            for i in range(3):
                path.send(b"ping%d" % i)
            lost = []

            def lose(src, dst, data):
                if lost or src[0] != HOSTS["alice"][1] or not any(
                        e.writable.called for e in path.channel.socket.endpoints):
                    return False
                if (dst == LOBBY and not is_quic(data) and kind(data) == "Data"
                        or dst != LOBBY and is_quic(data) and not data[0] & 0x80):
                    lost.append(data)  # the first relayed fragment, or 1-RTT packet
                    return True
                return False

            p.w.net.lose = lose
            p.w.advance(2)
            self.assertEqual(settled_a.calls, [(True, None)])
            self.assertEqual(path.mode, "direct" if nat is CONE else "relayed")
            self.assertEqual(len(lost), 1)
            self.assertEqual(sorted(got), [b"ping0", b"ping1", b"ping2"])

    def test_clear_datagram_dropped_once_encrypted(self):
        """
        Once the channel is encrypted, a datagram in the path's own frames
        (the lobby holds their key: it could forge one) reaches no one.
        """
        p, path, incoming, _, b, _ = self.exchange(nat=CONE)
        got = []
        incoming.on_datagram = got.append
        path.send_clear(b"forged by the lobby")
        p.w.advance(0.5)
        self.assertEqual((got, b.clear_dropped), ([], 1))


class FallbackTests(SynchronousTestCase):
    def test_accepting_side_without_certificate(self):
        """
        bob has no certificate: his side says so at once (CLEAR_HELLO), and
        alice's datagrams fall back to the clear well before her handshake
        would time out; the one that waited goes then, and both ways work.
        """
        p = Peers(self)
        path, incoming = p.connect()
        got_a, got_b = [], []
        path.on_datagram, incoming.on_datagram = got_a.append, got_b.append
        settled = Settled()
        results = []
        S.connect_streams(path, p.creds("alice"), on_settled=settled).addBoth(results.append)
        a = path.channel
        path.send(b"early")
        S.ClearDatagrams(incoming)
        p.w.advance(0.5)
        self.assertEqual(settled.calls, [(False, "the peer has no certificate for QUIC")])
        self.assertEqual((a.encrypted, got_b), (False, [b"early"]))
        incoming.send(b"back")
        path.send(b"again")
        p.w.advance(0.5)
        self.assertEqual((got_a, got_b), ([b"back"], [b"early", b"again"]))
        p.w.advance(15)  # alice's handshake times out: still clear, still working
        self.assertIsInstance(results[0].value, HandshakeFailed)
        self.assertIsInstance(path.channel, S.ClearDatagrams)
        self.assertEqual(settled.calls, [(False, "the peer has no certificate for QUIC")])
        path.send(b"later")
        p.w.advance(0.5)
        self.assertEqual(got_b[-1], b"later")

    def test_connecting_side_without_certificate(self):
        """alice has none: bob's side falls back at her hello and takes her datagrams."""
        p = Peers(self)
        path, incoming = p.connect()
        got_b = []
        incoming.on_datagram = got_b.append
        settled = Settled()
        b = S.accept_streams(incoming, p.creds("bob"), {}, on_settled=settled)
        p.streams.append(b)
        incoming.send(b"waiting")
        S.ClearDatagrams(path)
        got_a = []
        path.on_datagram = got_a.append
        path.send(b"hi")
        p.w.advance(0.5)
        self.assertEqual(settled.calls, [(False, "the peer has no certificate for QUIC")])
        self.assertEqual((got_a, got_b), ([b"waiting"], [b"hi"]))

    def test_no_connection_within_settle_timeout(self):
        """
        The accepting side waits L{S.SETTLE_TIMEOUT} for the peer's
        connection, then falls back; a connection that comes after all
        takes the datagrams back onto QUIC.
        """
        p = Peers(self)
        path, incoming = p.connect()
        settled = Settled()
        b = S.accept_streams(incoming, p.creds("bob"), {}, on_settled=settled)
        p.streams.append(b)
        incoming.send(b"queued")
        got_a = []
        path.on_datagram = got_a.append
        p.w.advance(S.SETTLE_TIMEOUT - 1)
        self.assertEqual((settled.calls, got_a), ([], []))
        p.w.advance(2)
        reason = f"no QUIC connection from the peer within {S.SETTLE_TIMEOUT:g}s"
        self.assertEqual(settled.calls, [(False, reason)])
        self.assertEqual(got_a, [b"queued"])
        results = []
        S.connect_streams(path, p.creds("alice")).addBoth(results.append)
        p.w.advance(2)
        self.assertIsInstance(results[0], S.PathStreams)
        p.streams.append(results[0])
        self.assertEqual(settled.calls, [(False, reason), (True, None)])
        got_b = []
        incoming.on_datagram = got_b.append
        path.send(MARKER)
        p.w.advance(0.5)
        self.assertEqual(got_b, [MARKER])
        self.assertEqual(b.clear_dropped, 0)

    def test_handshake_refused_falls_back(self):
        """bob presents carol's certificate: alice refuses it, and her datagrams go clear."""
        p = Peers(self)
        path, incoming = p.connect()
        results, _, settled_a, _ = start_quic(p, path, incoming, b_creds=p.creds("carol"))
        p.w.advance(2)
        self.assertIsInstance(results[0].value, HandshakeFailed)
        [(encrypted, reason)] = settled_a.calls
        self.assertFalse(encrypted)
        self.assertIn("the QUIC handshake failed", reason)
        self.assertIn("client:carol", reason)
        self.assertIsInstance(path.channel, S.ClearDatagrams)

    def test_clear_side_drops_fragments(self):
        """A side without QUIC drops the peer's QUIC fragments (it cannot read them)."""
        p = Peers(self, RANDOM, RANDOM)
        path, incoming = p.connect()
        got = []
        incoming.on_datagram = got.append
        clear = S.ClearDatagrams(incoming)
        path.send_clear(S.fragments(b"\xc0" + bytes(1199), 1)[0])
        path.send(b"text")
        p.w.advance(0.5)
        self.assertEqual((got, clear.fragments_dropped), ([b"text"], 1))


class DatagramQueueTests(SynchronousTestCase):
    def test_bound(self):
        q = S.DatagramQueue(limit=3)
        self.assertEqual([q.push(b"%d" % i) for i in range(5)],
                         [False, False, False, True, True])
        self.assertEqual((len(q), q.dropped), (3, 2))
        self.assertEqual(q.drain(), [b"2", b"3", b"4"])
        self.assertEqual((len(q), q.drain()), (0, []))


class HelloTests(SynchronousTestCase):
    def test_hello_rate_limited(self):
        """A clear side answers fragments with at most one hello per second."""

        class FakePath:
            channel = None

            def __init__(self):
                self.clock = task.Clock()
                self.sent = []
                self.delivered = []

            def send_clear(self, payload):
                self.sent.append(payload)

            def deliver(self, payload):
                self.delivered.append(payload)

        path = FakePath()
        clear = S.ClearDatagrams(path)
        self.assertIs(path.channel, clear)
        fragment = S.fragments(b"\xc0" * 100, 7)[0]
        for _ in range(5):
            clear.clear_received(fragment)
        path.clock.advance(S.HELLO_INTERVAL)
        clear.clear_received(fragment)
        clear.clear_received(S.CLEAR_HELLO)
        self.assertEqual(path.sent, [S.CLEAR_HELLO, S.CLEAR_HELLO])
        self.assertEqual((path.delivered, clear.fragments_dropped), ([], 6))


class EarlyTests(SynchronousTestCase):
    def test_early_clear_payloads_go_to_the_channel(self):
        """
        What came in the path's own frames before it had a channel or an
        application (the peer's first QUIC fragments through the relay)
        goes to the channel when it comes, not to the application; what the
        channel delivers before the application waits for it.
        """
        p = Peers(self, RANDOM, RANDOM)
        path, incoming = p.connect()
        fragment = S.fragments(b"\xc0" + bytes(1199), 1)[0]
        incoming.deliver(fragment)  # as the client does with a session's early payloads
        incoming.deliver(S.CLEAR_HELLO)
        settled = Settled()
        b = S.accept_streams(incoming, p.creds("bob"), {}, on_settled=settled)
        p.streams.append(b)
        self.assertEqual(settled.calls, [(False, "the peer has no certificate for QUIC")])
        self.assertEqual(b.reassembly.malformed, 0)
        path.send(b"clear from alice")
        p.w.advance(0.5)
        got = []
        incoming.on_datagram = got.append
        self.assertEqual(got, [b"clear from alice"])

    def test_nothing_delivered_after_close(self):
        """
        A datagram read after the path closed (its socket is released a
        reactor iteration later) reaches neither the application nor, as a
        QUIC fragment, the application in the clear.
        """
        p = Peers(self, RANDOM, RANDOM)
        path, incoming = p.connect()
        start_quic(p, path, incoming)
        p.w.advance(2)
        got = []
        path.on_datagram = got.append
        proto, lobby, _ = path.relayed
        path.close()
        self.assertIsNone(path.channel)
        fragment = S.fragments(b"\xc0" + bytes(100), 9)[0]
        for payload in (fragment, b"late"):
            path._received(M.Data(payload), proto, lobby)
        self.assertEqual(got, [])


class RedialTests(SynchronousTestCase):
    def test_new_connection_after_one_ended(self):
        """
        The connection ends with the path up (bob's side closed it): alice
        opens a new one after L{S.REDIAL_DELAY}; a datagram sent meanwhile
        waits and arrives on the new one; a closed channel dials no more.
        """
        p = Peers(self)
        path, incoming = p.connect()
        got = []
        incoming.on_datagram = got.append
        results, b, _, _ = start_quic(p, path, incoming)
        p.w.advance(2)
        a = results[0]
        p.streams.append(a)
        first = a.endpoint
        b.endpoint.close("bob's side restarts")
        p.w.advance(0.5)
        self.assertIsNone(a.endpoint)
        path.send(MARKER + b" in the gap")
        self.assertEqual(len(a.queue), 1)
        p.w.advance(S.REDIAL_DELAY + 1)
        self.assertIsNotNone(a.endpoint)
        self.assertIsNot(a.endpoint, first)
        self.assertEqual(str(b.endpoint.peer), "client:alice")
        self.assertEqual(got, [MARKER + b" in the gap"])
        a.close("over")
        p.w.advance(S.REDIAL_MAX + 5)
        self.assertIsNone(a.endpoint)
        self.assertEqual(a.socket.endpoints, frozenset())

    def test_redial_backs_off(self):
        """While attempts fail (bob no longer listens), the delay doubles up to L{S.REDIAL_MAX}."""
        p = Peers(self)
        path, incoming = p.connect()
        results, b, _, _ = start_quic(p, path, incoming)
        p.w.advance(2)
        a = results[0]
        p.streams.append(a)
        b.socket.listen((), None)
        b.endpoint.close("gone")
        p.w.advance(120, step=0.05)
        self.assertIsNone(a.endpoint)
        self.assertEqual(a._redial[1], S.REDIAL_MAX)
