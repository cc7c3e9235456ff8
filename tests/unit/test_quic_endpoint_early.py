"""
The client's first data behind its ``Finished``
(L{p2pnat.quic.QuicEndpoint.writable}), on a simulated network with 10 ms
each way and a L{task.Clock}: it reaches the server one round trip before
the handshake is confirmed, while C{connected} still means "both sides
accepted each other" and a refused client still gets a failed connect,
its early data never read.
"""

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.quic import HandshakeFailed
from tests.support.quic import T0, Deployment, QuicPair
from tests.support.udp import SimNet

ONE_WAY = 0.010


class EarlyDataTests(SynchronousTestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0 + 60)
        self.net = SimNet(self.clock, latency=ONE_WAY)
        self.deployment = Deployment(now=T0)

    def near(self, value, expected):
        self.assertLess(abs(value - expected), 0.003, f"{value} is not about {expected}")

    def run_for(self, seconds, step=0.0005):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)

    def pair(self, **kw):
        """
        A pair whose server (bob) echoes every datagram, and notes when it
        got each; alice sends b"first" as soon as she may.
        """
        pair = QuicPair(self, self.clock, net=self.net, deployment=self.deployment, **kw)
        self.got_b, self.got_a, self.times = [], [], {}
        start = self.clock.seconds()

        def accepted(endpoint):
            self.times["b-connected"] = self.clock.seconds() - start

            def echo(data):
                self.got_b.append(data)
                endpoint.send_datagram(data)

            endpoint.on_datagram = echo
            pair.b_endpoints.append(endpoint)

        pair.b.listen(kw.get("b_accepts", ("client:alice",)), accepted)
        connected = pair.connect()
        alice = next(iter(pair.a.endpoints))
        alice.on_datagram = lambda data: self.got_a.append(
            (data, self.clock.seconds() - start, connected.called))

        def writable(endpoint):
            self.times["a-writable"] = self.clock.seconds() - start
            self.assertFalse(connected.called)  # the server has not confirmed yet
            endpoint.send_datagram(b"first")

        alice.writable.addCallback(writable)

        def up(endpoint):
            self.times["a-connected"] = self.clock.seconds() - start
            return endpoint

        connected.addCallback(up)
        return pair, alice, connected

    def test_first_datagram_behind_the_finished(self):
        """
        Alice may write after one round trip (the server's flight); her
        datagram reaches bob with her Finished, 1.5 round trips in, and his
        echo comes back with the confirmation, 2 round trips in: one round
        trip sooner than when writes waited for the confirmation.
        """
        pair, alice, connected = self.pair()
        self.assertRaises(ConnectionError, alice.send_datagram, b"too soon")
        self.run_for(0.2)
        self.assertIs(self.successResultOf(connected), alice)
        rtt = 2 * ONE_WAY
        self.near(self.times["a-writable"], rtt)
        self.near(self.times["b-connected"], 1.5 * rtt)
        self.near(self.times["a-connected"], 2 * rtt)
        self.assertEqual(self.got_b, [b"first"])
        # The echo arrives in the packet that confirms the handshake, and
        # is delivered after "connected" fired.
        [(data, when, was_connected)] = self.got_a
        self.assertEqual(data, b"first")
        self.near(when, 2 * rtt)
        self.assertTrue(was_connected)

    def test_refused_client_early_data_never_read(self):
        """
        Bob accepts only dave: alice's side of TLS completes (she may
        write, and does), but bob refuses her certificate before he reads
        anything behind it; alice's connect fails, as before.
        """
        pair, alice, connected = self.pair(b_accepts=("client:dave",))
        self.run_for(2)
        failure = self.failureResultOf(connected, HandshakeFailed)
        self.assertIn("names client:alice, expected client:dave", str(failure.value))
        self.assertIn("a-writable", self.times)
        self.assertNotIn("a-connected", self.times)
        self.assertEqual((self.got_b, pair.b_endpoints), ([], []))

    def test_refused_server_never_writable(self):
        """A server whose certificate alice refuses: never writable, connect fails."""
        other = Deployment("another CA", now=T0)
        pair, alice, connected = self.pair(b_creds=other.client("bob"))
        self.run_for(2)
        self.failureResultOf(connected, HandshakeFailed)
        self.assertNoResult(alice.writable)
        self.assertEqual(self.got_b, [])
