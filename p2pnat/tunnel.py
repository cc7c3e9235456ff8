# -*- test-case-name: tests.test_tunnel -*-
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

import struct

from twisted.internet.protocol import Factory

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


def nodelay(transport):
    """
    Turn Nagle's algorithm off on a (possibly TLS-wrapped) TCP transport: a
    proxy that writes a frame header and its payload, or a small answer,
    must not wait for the peer's delayed ACK (40 ms stalls otherwise).
    """
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


def close_after_writes(transport):
    """
    Close C{transport} once what was written is sent.  A producer still
    registered on a TLS transport would hold the close back for ever, so
    it is unregistered first.
    """
    try:
        transport.unregisterProducer()
    except (AttributeError, RuntimeError):
        pass
    transport.loseConnection()


def client_endpoint(reactor, host, port, timeout=10):
    """
    A TCP client endpoint: a plain TCP4/TCP6 one for an IP literal (no
    trip through the resolver's thread pool: ~0.4 ms per connection), a
    HostnameEndpoint for a name.
    """
    import ipaddress

    from twisted.internet import endpoints

    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = endpoints.TCP4ClientEndpoint if version == 4 else endpoints.TCP6ClientEndpoint
    return cls(reactor, host, port, timeout=timeout)


def bigger_reads(transport, size=256 * 1024):
    """
    Read up to C{size} bytes per system call on the TCP connection under
    C{transport} (TLS-wrapped or not): fewer reads, frames and writes per
    megabyte on a proxy's data path.
    """
    t = transport
    for _ in range(3):
        if hasattr(t, "bufferSize") and hasattr(t, "socket"):
            t.bufferSize = size
            return
        t = getattr(t, "transport", None)
        if t is None:
            return


def tune(transport):
    """
    Set up a proxy's TCP (or TLS-over-TCP) connection for its data path: no
    Nagle, bigger reads, and writes sent at once (L{fastio.write_through}).
    """
    from p2pnat import fastio

    nodelay(transport)
    bigger_reads(transport)
    fastio.write_through(transport)


class OneShotFactory(Factory):
    """
    Builds the one protocol instance given, for an outgoing connection
    (like endpoints.connectProtocol's, without a log line per connection).
    """

    noisy = False

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class IdleTimeout:
    """
    Mixin of both ends of a tunnel: an idle tunnel (state ``idle``) is
    closed after C{timeout} seconds without a stream.
    """

    _idle_timer = None

    def _start_idle(self, clock, timeout):
        self._cancel_idle()
        self._idle_timer = clock.callLater(timeout, self._idle_late)

    def _cancel_idle(self):
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle_late(self):
        self._idle_timer = None
        if self.state == "idle":
            self.transport.loseConnection()


#: ALPN name prefix by which a resuming device names, in its ClientHello,
#: the session its tunnel is for (p2pt1.<32 hex digits>).
ALPN_PREFIX = b"p2pt1."


def alpn_for(session_id):
    return ALPN_PREFIX + session_id.hex().encode()


def session_from_alpn(offered):
    """The session ID named in a ClientHello's ALPN list, or None."""
    for name in offered or ():
        if name.startswith(ALPN_PREFIX) and len(name) == len(ALPN_PREFIX) + 32:
            try:
                return bytes.fromhex(name[len(ALPN_PREFIX):].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
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
