# -*- test-case-name: tests.unit.test_tunnel -*-
"""
The tunnel: the TLS connection a device opens back to the relay.

After the TLS handshake (the relay checks the device's client certificate,
the device checks the relay's certificate and host name) the device sends
a fixed-size hello::

    "P2PT" version(1)=1 session_id(16) nonce(16)          37 bytes

and the relay answers one status byte (L{HELLO_OK} or an error code, then
it closes).  From then on both sides send frames::

    type(1) length(3) payload(length)

- ``OPEN`` (relay → device): start a stream to the named local service
  (payload: the service name, empty for the default one);
- ``DATA``: stream bytes (payload up to 16 MiB - 1, usually one read);
- ``END``: this side's end of the stream is closed; close yours;
- ``OPENED`` (device → relay): the device got the OPEN.  The relay waits
  for it on a reused idle tunnel: a tunnel that went dead while idle (the
  device's address changed) is then noticed within a second or two, and
  the terminal's bytes, kept until then, go to a new tunnel instead.

One stream runs at a time.  A stream is over when each side has sent and
received ``END``; the tunnel is then idle and the relay may ``OPEN`` the
next stream on it (an idle tunnel serves the device's later requests
without a new connect request).  Frame payloads of ``DATA`` are passed on
as they arrive, so a large body never has to sit in memory whole.
"""

import binascii
import struct

MAGIC = b"P2PT"
VERSION = 1
HELLO = struct.Struct("!4sB16s16s")
HELLO_OK = 0
#: Hello status codes other than OK, with their meaning.
HELLO_ERRORS = {
    1: "malformed hello",
    2: "unknown or expired session",
    3: "session belongs to another device",
    4: "wrong nonce",
    5: "device not allowed",
}

OPEN, DATA, END, OPENED = 1, 2, 3, 4
_HEAD = struct.Struct("!I")
MAX_FRAME = (1 << 24) - 1
MAX_CONTROL = 255


class TunnelError(ValueError):
    """A protocol violation on a tunnel; the connection must be closed."""


#: ALPN name prefix by which a resuming device names, in its ClientHello,
#: the session its tunnel is for (p2pt1.<32 hex digits>).
ALPN_PREFIX = b"p2pt1."


def alpn_for(session_id):
    return ALPN_PREFIX + session_id.hex().encode()


def session_from_alpn(offered):
    """
    The session ID (16 bytes) named in a ClientHello's ALPN list, or None:
    the first name shaped like L{alpn_for}'s decides.
    """
    for name in offered or ():
        if name.startswith(ALPN_PREFIX) and len(name) == len(ALPN_PREFIX) + 32:
            try:
                # unhexlify, not bytes.fromhex: fromhex skips whitespace, so
                # 32 spaces would name a 0-byte session.
                return binascii.unhexlify(name[len(ALPN_PREFIX):])
            except ValueError:  # binascii.Error: not 32 hex digits
                return None
    return None


def hello(session_id, nonce):
    return HELLO.pack(MAGIC, VERSION, session_id, nonce)


def parse_hello(data):
    """
    @return: ``(session_id, nonce)``.
    @raise TunnelError: when it is not a version-1 hello.
    """
    if len(data) != HELLO.size:
        raise TunnelError("hello size")
    magic, version, session_id, nonce = HELLO.unpack(data)
    if magic != MAGIC or version != VERSION:
        raise TunnelError("not a p2pnat tunnel hello")
    return session_id, nonce


def frame(ftype, payload=b""):
    """Encode one frame (use L{data_frames} for arbitrary-size data)."""
    if len(payload) > MAX_FRAME:
        raise TunnelError("frame too large")
    return _HEAD.pack((ftype << 24) | len(payload)) + payload


def data_header(length):
    """The header of a DATA frame of C{length} bytes (payload sent apart)."""
    return _HEAD.pack((DATA << 24) | length)


class FrameDecoder:
    """
    Incremental decoder.  DATA payloads are handed to C{on_data} in pieces
    as they arrive; OPEN and END are handed whole to C{on_open}/C{on_end}.

    @raise TunnelError: from L{feed}, on an unknown frame type or an
        oversized control frame.
    """

    def __init__(self, on_open, on_data, on_end, on_opened=None):
        self.on_open = on_open
        self.on_data = on_data
        self.on_end = on_end
        self.on_opened = on_opened
        self._head = b""
        self._type = None
        self._left = 0
        self._control = b""

    def feed(self, data):
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if self._type is None:
                need = 4 - len(self._head)
                self._head += bytes(view[pos:pos + need])
                pos += need
                if len(self._head) < 4:
                    return
                (word,) = _HEAD.unpack(self._head)
                self._head = b""
                self._type, self._left = word >> 24, word & 0xFFFFFF
                if self._type not in (OPEN, DATA, END, OPENED):
                    raise TunnelError(f"unknown frame type {self._type}")
                if self._type != DATA and self._left > MAX_CONTROL:
                    raise TunnelError("control frame too large")
                if self._left == 0:
                    self._dispatch()
                continue
            take = min(self._left, n - pos)
            chunk = data if take == n else view[pos:pos + take]
            pos += take
            self._left -= take
            if self._type == DATA:
                self.on_data(chunk if chunk is data else bytes(chunk))
                if self._left == 0:
                    self._type = None
            else:
                self._control += bytes(chunk)
                if self._left == 0:
                    self._dispatch()

    def _dispatch(self):
        ftype, payload = self._type, self._control
        self._type, self._control = None, b""
        if ftype == OPEN:
            try:
                self.on_open(payload.decode("ascii"))
            except UnicodeDecodeError:
                raise TunnelError("service name not ascii")
        elif ftype == END:
            self.on_end()
        elif ftype == OPENED:
            if self.on_opened is None:
                raise TunnelError("unexpected OPENED")
            self.on_opened()
        # An empty DATA frame carries nothing.
