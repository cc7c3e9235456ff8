"""
The relay's HTTP request framing with no I/O: the smuggling refusals of
L{parse_head} and the request boundaries L{RequestFramer} finds.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.relay.http import BadRequest, RequestFramer, parse_head


def head(*fields, method=b"POST"):
    return method + b" / HTTP/1.1\r\nHost: a.relay.test\r\n" + b"".join(
        f + b"\r\n" for f in fields) + b"\r\n"


def split(stream, sizes):
    """Feed C{stream} in reads of C{sizes}; return the requests as (head, body) pairs."""
    framer = RequestFramer()
    requests = []
    reads = []
    at = 0
    for n in sizes:
        reads.append(stream[at:at + n])
        at += n
    reads.append(stream[at:])
    for data in reads:
        while True:
            body, stop, rest = framer.feed(data)
            if requests:
                requests[-1][1] += body
            if stop is None:
                break
            if isinstance(stop, BadRequest):
                raise stop
            framer.begin(parse_head(stop))
            requests.append([stop, b""])
            data = rest
    return [tuple(r) for r in requests]


class ParseFramingTests(SynchronousTestCase):
    def test_framing(self):
        self.assertEqual(parse_head(head(b"Content-Length: 12")).framing, "length")
        self.assertEqual(parse_head(head(b"Content-Length: 0")).framing, "none")
        self.assertEqual(parse_head(head(b"Transfer-Encoding: gzip, CHUNKED")).framing, "chunked")
        self.assertEqual(parse_head(head(b"Content-Length: 3, 3", b"Content-Length: 3")).length, 3)
        self.assertEqual(parse_head(b"CONNECT a:ssh HTTP/1.1\r\n\r\n").framing, "opaque")
        self.assertEqual(parse_head(head(b"Upgrade: websocket", b"Connection: keep-alive, Upgrade",
                                         method=b"GET")).framing, "opaque")
        # Upgrade not named in Connection: no upgrade (RFC 9110 7.8).
        self.assertEqual(parse_head(head(b"Upgrade: websocket", method=b"GET")).framing, "none")
        self.assertTrue(parse_head(head(method=b"GET")).resendable)
        self.assertFalse(parse_head(head(method=b"POST")).resendable)
        self.assertFalse(parse_head(head(b"Content-Length: 1", method=b"GET")).resendable)

    def test_smuggling_refused(self):
        for fields in [(b"Content-Length: 1", b"Transfer-Encoding: chunked"),
                       (b"Content-Length: 1", b"Content-Length: 2"),
                       (b"Content-Length: 1, 2",), (b"Content-Length: -1",),
                       (b"Content-Length: 0x10",), (b"Content-Length: +1",),
                       (b"Transfer-Encoding: chunked, gzip",),
                       (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
                       (b"Transfer-Encoding: identity",), (b"Transfer-Encoding: ,chunked",),
                       (b"X: a", b" folded"), (b"X: a", b"\tfolded"),
                       (b"X: a\nY: b",), (b"X: a\rY: b",), (b"Host: b.relay.test",)]:
            with self.assertRaises(BadRequest, msg=fields) as cm:
                parse_head(head(*fields))
            self.assertEqual(cm.exception.status, 400)
        self.assertRaises(BadRequest, parse_head,
                          b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")


class FramerTests(SynchronousTestCase):
    def test_boundaries(self):
        a = head(b"Content-Length: 5") + b"hello"
        b = head(b"Transfer-Encoding: chunked") + b"4;x=y\r\nwiki\r\n0\r\nT: v\r\n\r\n"
        c = head(method=b"GET")
        stream = a + b"\r\n" + b + c
        want = [(head(b"Content-Length: 5"), b"hello"),
                (head(b"Transfer-Encoding: chunked"), b"4;x=y\r\nwiki\r\n0\r\nT: v\r\n\r\n"),
                (c, b"")]
        self.assertEqual(split(stream, []), want)
        for cut in range(1, len(stream)):
            self.assertEqual(split(stream, [cut]), want, cut)
        self.assertEqual(split(stream, [1] * len(stream)), want)

    def test_body_is_counted_not_scanned(self):
        framer = RequestFramer()
        framer.begin(parse_head(head(b"Content-Length: 100000")))
        data = head(method=b"GET") * 10
        self.assertEqual(framer.feed(data), (data, None, b""))
        self.assertEqual(framer.left, 100000 - len(data))

    def test_opaque(self):
        framer = RequestFramer()
        framer.begin(parse_head(b"CONNECT a HTTP/1.1\r\n\r\n"))
        self.assertEqual(framer.feed(head()), (head(), None, b""))

    def test_bad_chunks(self):
        for body in [b"zz\r\n", b"4\nwiki\r\n", b"4\r\nwikiXX", b"1" * 16 + b"\r\n",
                     b"1;" + b"x" * 5000, b"0\r\n" + b"T: v\r\n" * 5000]:
            framer = RequestFramer()
            framer.begin(parse_head(head(b"Transfer-Encoding: chunked")))
            stops = [framer.feed(body[i:i + 7])[1] for i in range(0, len(body), 7)]
            self.assertTrue(any(isinstance(s, BadRequest) for s in stops), body[:20])

    def test_oversized_head(self):
        framer = RequestFramer()
        self.assertIsNone(framer.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 10000)[1])
        self.assertEqual(framer.feed(b"a" * 10000)[1].status, 431)

    @given(st.lists(st.integers(min_value=1, max_value=40), max_size=20),
           st.lists(st.binary(max_size=30), max_size=4))
    def test_any_split_same_requests(self, sizes, bodies):
        stream = b"".join(head(b"Content-Length: %d" % len(x)) + x for x in bodies)
        stream += b"".join(head(b"Transfer-Encoding: chunked") + (b"%x\r\n" % len(x) + x + b"\r\n"
                           if x else b"") + b"0\r\n\r\n" for x in bodies)
        self.assertEqual(split(stream, sizes), split(stream, []))
        self.assertEqual(len(split(stream, [])), 2 * len(bodies))
