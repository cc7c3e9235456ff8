"""
Tests for L{p2pnat.protocol.tunnel}: the hello and the frame codec.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import tunnel


class HelloTests(SynchronousTestCase):
    def test_round_trip(self):
        data = tunnel.hello(b"S" * 16, b"N" * 16)
        self.assertEqual(len(data), 37)
        self.assertEqual(data[:5], b"P2PT\x01")
        self.assertEqual(tunnel.parse_hello(data), (b"S" * 16, b"N" * 16))

    def test_refused(self):
        for bad in (b"", b"GET / HTTP/1.1\r\n" + bytes(21), b"P2PT\x02" + bytes(32),
                    tunnel.hello(bytes(16), bytes(16)) + b"x"):
            self.assertRaises(tunnel.TunnelError, tunnel.parse_hello, bad)


class DecoderTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.decoder = tunnel.FrameDecoder(
            lambda s: self.events.append(("open", s)),
            lambda d: self.events.append(("data", d)),
            lambda: self.events.append(("end",)))

    def stream(self):
        return (tunnel.frame(tunnel.OPEN, b"ssh") + tunnel.frame(tunnel.DATA, b"hello")
                + tunnel.data_header(3) + b"abc" + tunnel.frame(tunnel.DATA, b"")
                + tunnel.frame(tunnel.END))

    def collapsed(self):
        """Events with adjacent data pieces joined."""
        out = []
        for e in self.events:
            if e[0] == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + e[1])
            else:
                out.append(e)
        return out

    def test_whole(self):
        self.decoder.feed(self.stream())
        self.assertEqual(self.events, [("open", "ssh"), ("data", b"hello"), ("data", b"abc"),
                                       ("end",)])

    def test_any_split(self):
        """Fed in pieces of any size, the same frames come out."""
        data = self.stream()
        rnd = random.Random(7)
        for _ in range(200):
            self.events = []
            pos = 0
            while pos < len(data):
                n = rnd.randint(1, 7)
                self.decoder.feed(data[pos:pos + n])
                pos += n
            self.assertEqual(self.collapsed(), [("open", "ssh"), ("data", b"helloabc"),
                                                ("end",)])

    def test_data_streams_before_frame_complete(self):
        """A large DATA frame's payload is passed on as it arrives."""
        self.decoder.feed(tunnel.data_header(1_000_000) + b"x" * 1000)
        self.assertEqual(self.events, [("data", b"x" * 1000)])

    def test_violations(self):
        for bad in (b"\x09\x00\x00\x00", tunnel.frame(tunnel.OPEN, b"x" * 255)[:1] + b"\x00\x01\x00"):
            d = tunnel.FrameDecoder(lambda s: None, lambda d: None, lambda: None)
            self.assertRaises(tunnel.TunnelError, d.feed, bad)
        d = tunnel.FrameDecoder(lambda s: None, lambda d: None, lambda: None)
        self.assertRaises(tunnel.TunnelError, d.feed, tunnel.frame(tunnel.OPEN, b"\xff"))

    def test_frame_size_limit(self):
        self.assertRaises(tunnel.TunnelError, tunnel.frame, tunnel.DATA, bytes(1 << 24))
