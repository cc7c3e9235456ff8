# -*- test-case-name: tests.unit.test_wire -*-
"""
The p2pnat UDP control wire format, version 1.

Every control datagram (notify, connect request, lobby messages, punch
probes) has the same frame; see ``docs/protocol.rst`` for the byte layout
and the message catalogue.  In short::

    marker(1)=0x0C version(1)=1 type(1) flags(1) timestamp_us(8)
    key_id_len(1) key_id(key_id_len) body_len(2) body(body_len) mac(16)

The first byte 0x0C lies in the range RFC 7983 leaves unassigned (4..15),
so the same socket can tell our frames from STUN (0..3), DTLS (20..63) and
QUIC (64..127, 192..255).

The MAC is HMAC-SHA256 truncated to 16 bytes, keyed with the 32-byte key
named by ``key_id`` (a device ID, a lobby client ID or a punch session ID),
over every byte before it.  The timestamp is microseconds on the receiver's
clock as the sender estimates it; a receiver accepts a frame only if its
timestamp is newer than the last one seen for that key and within a window
of its own clock (:class:`ReplayGuard`).  Two kinds of message are checked
otherwise: clock probes (a sender's first frame, before it knows our clock)
are answered at most once per timestamp, and answers bound to our own
request by an echo are left to the handler that matches the echo.

This module is pure: bytes in, objects out, no sockets and no clocks of its
own.  Malformed input raises :class:`WireError` whose ``reason`` is a short
token used as a log and metrics label.
"""

import hashlib
import hmac
import re
import socket
import struct
from dataclasses import dataclass

MARKER = 0x0C
VERSION = 1
MAC_LEN = 16
KEY_LEN = 32
MAX_KEY_ID = 64
#: The largest datagram we send or accept: fits the IPv6 minimum MTU with
#: room for IP and UDP headers.
MAX_DATAGRAM = 1200

_HEAD = struct.Struct("!BBBBQB")  # marker, version, type, flags, timestamp, key_id_len
_BODY_LEN = struct.Struct("!H")
MIN_FRAME = _HEAD.size + 1 + _BODY_LEN.size + MAC_LEN


class WireError(ValueError):
    """
    A datagram that is not a valid frame.

    @ivar reason: short label: ``truncated``, ``oversized``, ``bad-marker``,
        ``bad-version``, ``bad-type``, ``bad-length``, ``bad-key-id``,
        ``bad-mac``, ``bad-body``.
    """

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- addresses ---------------------------------------------------------------

def pack_addr(host, port):
    """
    Encode an IP address and port as family(1) port(2) ip(4 or 16).
    """
    try:
        return _V4.pack(4, port) + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return _V4.pack(6, port) + socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise WireError("bad-body", f"not an IP address: {host!r}")


_V4 = struct.Struct("!BH")
ADDR_V6_SIZE = 3 + 16


def unpack_addr(data, offset=0):
    """
    Decode an address written by L{pack_addr}; return ``((host, port), end)``.
    """
    if len(data) < offset + 3:
        raise WireError("bad-body", "address truncated")
    family, port = _V4.unpack_from(data, offset)
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise WireError("bad-body", f"address family {family}")
    end = offset + 3 + size
    if len(data) < end:
        raise WireError("bad-body", "address truncated")
    # inet_ntop: the same text the kernel (and so Twisted) gives addresses.
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    return (socket.inet_ntop(af, bytes(data[offset + 3:end])), port), end


# -- message catalogue -------------------------------------------------------

class Message:
    """
    Base class of every message type.

    Subclasses set ``TYPE`` (the type byte) and implement ``encode_body``
    and the classmethod ``decode_body``.

    ``PROBE`` marks a clock probe: the one kind of request that may come
    from a sender whose clock is not yet aligned with ours (it asks for our
    time).  It is exempt from the freshness window but answered at most
    once per timestamp (L{ReplayGuard.check_probe}), and it changes no
    state.  ``ECHO_BOUND`` marks an answer that echoes the timestamp of our
    own request: exempt from the window, it is accepted by the handler only
    as the answer to a request still outstanding, once.
    """

    TYPE = None
    PROBE = False
    ECHO_BOUND = False

    def encode_body(self):
        return b""

    @classmethod
    def decode_body(cls, body):
        if body:
            raise WireError("bad-body", f"{cls.__name__} takes no body")
        return cls()


# -- body fields: what every decode_body checks -------------------------------

def unpack_head(fmt, body, name):
    """
    The fields of struct format C{fmt} at the start of C{body}, and the
    offset after them.

    @raise WireError: C{bad-body}, if C{body} is shorter (C{name} says
        which message).
    """
    size = struct.calcsize(fmt)
    if len(body) < size:
        raise WireError("bad-body", f"{name} truncated")
    return struct.unpack_from(fmt, body), size


def expect_end(body, end, name):
    """
    Check that C{body} ends at C{end}: a body of fixed fields has no more.

    @raise WireError: C{bad-body}, for a longer or shorter body.
    """
    if end != len(body):
        raise WireError("bad-body", f"{name} length")


def unpack_head_addr(fmt, body, name):
    """
    The fields of struct format C{fmt} and then one address (L{pack_addr})
    that ends C{body}: the shape of the answers that tell their asker the
    address they came from.

    @return: ``(fields, (host, port))``.
    """
    fields, end = unpack_head(fmt, body, name)
    addr, end = unpack_addr(body, end)
    expect_end(body, end, name)
    return fields, addr


def unpack_tail(fmt, body, offset, name):
    """The fields of struct format C{fmt} at C{offset}, which must end C{body}."""
    expect_end(body, offset + struct.calcsize(fmt), name)
    return struct.unpack_from(fmt, body, offset)


def zero_padding(body, end, name):
    """
    How many bytes of padding follow C{end}; they must all be zero (so
    that padding can carry nothing).

    @raise WireError: C{bad-body}, for a non-zero byte.
    """
    if any(body[end:]):
        raise WireError("bad-body", f"{name} padding must be zero")
    return len(body) - end


@dataclass
class Padded(Message):
    """
    A request whose body is only zero padding: enough of it that the
    answer it asks for is never larger (no amplification).  Subclasses set
    the default ``padding``.
    """

    padding: int = 0

    def encode_body(self):
        return bytes(self.padding)

    @classmethod
    def decode_body(cls, body):
        return cls(padding=zero_padding(body, 0, cls.__name__))


@dataclass
class Ping(Padded):
    """
    Clock probe (L{Message.PROBE}), padded to the size of the L{Pong} it
    asks for.  Stamped by L{Stamper.probe}, not on the receiver's clock.
    """

    TYPE = 0x01
    PROBE = True
    padding: int = 8 + ADDR_V6_SIZE + 8


@dataclass
class Pong(Message):
    """
    Answer to L{Ping}: echoes its timestamp, tells the observed source
    address (as STUN would) and the responder's clock.
    """

    TYPE = 0x02
    ECHO_BOUND = True
    echo: int = 0
    observed: tuple = ("0.0.0.0", 0)
    server_time: int = 0

    def encode_body(self):
        return struct.pack("!Q", self.echo) + pack_addr(*self.observed) + struct.pack(
            "!Q", self.server_time)

    @classmethod
    def decode_body(cls, body):
        (echo,), end = unpack_head("!Q", body, "pong")
        observed, end = unpack_addr(body, end)
        (server_time,) = unpack_tail("!Q", body, end, "pong")
        return cls(echo, observed, server_time)


@dataclass
class PeriodRequest(Padded):
    """
    Device to relay: what is the maximum access-check period?  A clock
    probe (L{Message.PROBE}), padded so the L{Period} answer is never
    larger.
    """

    TYPE = 0x10
    PROBE = True
    padding: int = 24


@dataclass
class Period(Message):
    """
    Relay to device: the access-check period (seconds), the longest notify-B
    interval the relay advises (seconds), the relay's clock (microseconds)
    and the timestamp of the request it answers.
    """

    TYPE = 0x11
    ECHO_BOUND = True
    period: int = 300
    notify_b_max: int = 25
    server_time: int = 0
    echo: int = 0
    _S = struct.Struct("!IIQQ")

    def encode_body(self):
        return self._S.pack(self.period, self.notify_b_max, self.server_time, self.echo)

    @classmethod
    def decode_body(cls, body):
        if len(body) != cls._S.size:
            raise WireError("bad-body", "period length")
        return cls(*cls._S.unpack(body))


@dataclass
class Notify(Message):
    """
    Device to relay.  Kind A (``TYPE`` 0x12) records the source address and
    the last access time; kind B (0x13) only keeps the NAT mapping open.
    ``local`` is the device's own socket address (for same-LAN detection).

    ``mapped`` is the public (host, port) its gateway granted for the
    device's notify socket by port mapping (PCP, NAT-PMP or UPnP), or None:
    the relay sends connect requests there too.  It follows ``local`` in
    the body, before the padding; without it the body is byte for byte
    the one of devices that know nothing of port mapping (an address's
    family byte is never zero, so a decoder tells it from the padding).
    A device sends it only to a relay whose NotifyAck carried
    L{TAKES_MAPPED}: an older relay refuses a body that is not zeros after
    ``local``.
    """

    TYPE = None
    local: tuple = ("0.0.0.0", 0)
    # Enough for the NotifyAck (observed address up to IPv6) to be no larger.
    padding: int = 24
    mapped: tuple = None

    def encode_body(self):
        mapped = pack_addr(*self.mapped) if self.mapped is not None else b""
        return pack_addr(*self.local) + mapped + bytes(self.padding)

    @classmethod
    def decode_body(cls, body):
        local, end = unpack_addr(body)
        mapped = None
        if end < len(body) and body[end]:
            mapped, end = unpack_addr(body, end)
        return cls(local=local, padding=zero_padding(body, end, "notify"), mapped=mapped)


@dataclass
class NotifyA(Notify):
    TYPE = 0x12


@dataclass
class NotifyB(Notify):
    TYPE = 0x13


#: NotifyAck flag: the relay has no recent notify A for this device.
NEED_NOTIFY_A = 0x01
#: NotifyAck flag: the relay takes a notify's L{Notify.mapped} address.
TAKES_MAPPED = 0x02

#: Frame flag (the header's flags byte) on a notify B: answer it with a
#: NotifyAck even if nothing changed.  A device asks now and then to learn
#: that its relay is still alive; relays that predate it ignore the flag.
ACK_REQUESTED = 0x01


@dataclass
class NotifyAck(Message):
    """
    Relay to device, answering a notify: echoes its timestamp and tells the
    observed (public) address; ``flags`` may ask for a notify A.
    """

    TYPE = 0x14
    echo: int = 0
    observed: tuple = ("0.0.0.0", 0)
    flags: int = 0

    def encode_body(self):
        return struct.pack("!QB", self.echo, self.flags) + pack_addr(*self.observed)

    @classmethod
    def decode_body(cls, body):
        (echo, flags), observed = unpack_head_addr("!QB", body, "notify ack")
        return cls(echo, observed, flags)


@dataclass
class ConnectRequest(Message):
    """
    Relay to device: open a TLS connection to ``tunnel`` (host, port) and
    present ``session_id`` and ``nonce`` on it.
    """

    TYPE = 0x15
    session_id: bytes = bytes(16)
    nonce: bytes = bytes(16)
    tunnel_port: int = 0
    tunnel_host: str = ""

    def encode_body(self):
        host = self.tunnel_host.encode("idna")
        if len(self.session_id) != 16 or len(self.nonce) != 16 or len(host) > 253:
            raise WireError("bad-body", "connect request fields")
        return self.session_id + self.nonce + struct.pack("!HB", self.tunnel_port, len(host)) + host

    @classmethod
    def decode_body(cls, body):
        if len(body) < 35:
            raise WireError("bad-body", "connect request truncated")
        port, hlen = struct.unpack_from("!HB", body, 32)
        if len(body) != 35 + hlen or hlen > 253:
            raise WireError("bad-body", "connect request length")
        try:
            host = body[35:].decode("ascii")
            # Only a host name the encoder could have written (IDNA, at
            # most 253 bytes): the device connects to it.
            if host and host.encode("idna") != body[35:]:
                raise UnicodeError("not in IDNA form")
        except UnicodeError:
            raise WireError("bad-body", "tunnel host is not a host name")
        return cls(bytes(body[:16]), bytes(body[16:32]), port, host)


#: Frame flag on a notify A or B: this device takes L{DirectConnectRequest}s.
#: A relay sends them only to a device whose latest notify had it, so an
#: agent that predates them never sees a type it would drop.
DIRECT_CAPABLE = 0x02

#: A direct secret's length, bytes.
SECRET_LEN = 16
#: The service header (L{p2pnat.quic.header}) of a direct session's QUIC
#: stream, which opens with the secret ...
DIRECT_SERVICE = "p2pnat-direct"
#: ... and the one byte the device answers once the stream reaches its service.
DIRECT_ACCEPTED = b"\x00"


def mask_secret(key, direct_id, secret):
    """
    The direct secret as L{DirectConnectRequest} carries it, or back again
    (XOR is its own inverse): XORed with HMAC-SHA256(device key,
    ``"p2pnat direct secret" || direct_id``), so that the secret, which
    lets a terminal reach the device's service, does not cross the
    network in clear.  The key stream differs for every (fresh, random)
    C{direct_id}.
    """
    if len(secret) != SECRET_LEN or len(direct_id) != 16:
        raise WireError("bad-body", "direct secret fields")
    pad = hmac.new(key, b"p2pnat direct secret" + bytes(direct_id), hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(secret, pad))


@dataclass
class DirectConnectRequest(Message):
    """
    Relay to device: a terminal at ``terminal`` (its (host, port) as the
    relay's STUN answer showed it) wants C{service} directly.  The device
    punches toward that address from the socket this request arrived on
    and accepts one QUIC connection whose first stream opens with the
    direct secret (``secret`` is L{mask_secret}ed with the device's key).
    ``direct_id`` names the offer (fresh and random; repeats are ignored).
    Sent only to devices that said they take it (L{DIRECT_CAPABLE}).
    """

    TYPE = 0x16
    direct_id: bytes = bytes(16)
    secret: bytes = bytes(SECRET_LEN)
    service: str = ""
    terminal: tuple = ("0.0.0.0", 0)

    def encode_body(self):
        service = self.service.encode("ascii")
        if len(self.direct_id) != 16 or len(self.secret) != SECRET_LEN or len(service) > 255:
            raise WireError("bad-body", "direct connect request fields")
        return (self.direct_id + self.secret + bytes([len(service)]) + service
                + pack_addr(*self.terminal))

    @classmethod
    def decode_body(cls, body):
        if len(body) < 33:
            raise WireError("bad-body", "direct connect request truncated")
        slen = body[32]
        end = 33 + slen
        if len(body) < end:
            raise WireError("bad-body", "direct connect request truncated")
        raw = bytes(body[33:end])
        if not raw.isascii() or not all(0x21 <= c < 0x7F for c in raw):
            raise WireError("bad-body", "service is not printable ASCII")
        terminal, end = unpack_addr(body, end)
        expect_end(body, end, "direct connect request")
        if not terminal[1]:
            raise WireError("bad-body", "terminal port 0")
        return cls(bytes(body[:16]), bytes(body[16:32]), raw.decode("ascii"), terminal)


MESSAGES = {cls.TYPE: cls for cls in (Ping, Pong, PeriodRequest, Period, NotifyA, NotifyB,
                                      NotifyAck, ConnectRequest, DirectConnectRequest)}


def register(cls):
    """
    Add a message class to the catalogue (used by the lobby and punch
    modules for their own types); returns it, so it works as a decorator.
    """
    if cls.TYPE in MESSAGES and MESSAGES[cls.TYPE] is not cls:
        raise ValueError(f"type 0x{cls.TYPE:02x} already taken by {MESSAGES[cls.TYPE].__name__}")
    MESSAGES[cls.TYPE] = cls
    return cls


# -- frames --------------------------------------------------------------------

@dataclass
class Frame:
    """
    A parsed but not yet authenticated datagram.
    """

    type: int
    flags: int
    timestamp: int
    key_id: str
    body: bytes
    signed: bytes
    mac: bytes

    def open(self, key):
        """
        Check the MAC with C{key} and decode the body.

        @return: the L{Message}.
        @raise WireError: ``bad-mac`` or ``bad-body``.
        """
        if not hmac.compare_digest(mac(key, self.signed), self.mac):
            raise WireError("bad-mac")
        cls = MESSAGES[self.type]
        return cls.decode_body(self.body)


def mac(key, data):
    """HMAC-SHA256 of C{data} under C{key}, truncated to L{MAC_LEN} bytes."""
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]


_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def valid_key_id(key_id):
    """
    Key IDs (device IDs, client IDs, session IDs) are 1..64 characters of
    ``[A-Za-z0-9._-]`` and start with a letter or digit.
    """
    return _KEY_ID.match(key_id) is not None


def parse(data):
    """
    Parse the frame of C{data} without checking its MAC.

    @raise WireError: if the bytes are not a well-formed frame.
    """
    n = len(data)
    if n > MAX_DATAGRAM:
        raise WireError("oversized", f"{n} bytes")
    if n < MIN_FRAME:
        raise WireError("truncated", f"{n} bytes")
    marker, version, mtype, flags, timestamp, klen = _HEAD.unpack_from(data)
    if marker != MARKER:
        raise WireError("bad-marker")
    if version != VERSION:
        raise WireError("bad-version", str(version))
    if mtype not in MESSAGES:
        raise WireError("bad-type", f"0x{mtype:02x}")
    if not 1 <= klen <= MAX_KEY_ID:
        raise WireError("bad-key-id", "length")
    off = _HEAD.size
    if n < off + klen + _BODY_LEN.size + MAC_LEN:
        raise WireError("truncated")
    try:
        key_id = bytes(data[off:off + klen]).decode("ascii")
    except UnicodeDecodeError:
        raise WireError("bad-key-id", "not ascii")
    if not valid_key_id(key_id):
        raise WireError("bad-key-id", "characters")
    off += klen
    (blen,) = _BODY_LEN.unpack_from(data, off)
    off += _BODY_LEN.size
    if off + blen + MAC_LEN != n:
        raise WireError("bad-length", f"body {blen} in {n} bytes")
    return Frame(mtype, flags, timestamp, key_id, bytes(data[off:off + blen]),
                 bytes(data[:off + blen]), bytes(data[off + blen:]))


def seal(message, key_id, key, timestamp, flags=0):
    """
    Encode C{message} as a frame authenticated with C{key}.

    @raise WireError: if the result would exceed L{MAX_DATAGRAM}.
    """
    kid = key_id.encode("ascii")
    if not valid_key_id(key_id):
        raise WireError("bad-key-id", key_id)
    body = message.encode_body()
    head = _HEAD.pack(MARKER, VERSION, message.TYPE, flags, timestamp, len(kid)) + kid
    signed = head + _BODY_LEN.pack(len(body)) + body
    out = signed + mac(key, signed)
    if len(out) > MAX_DATAGRAM:
        raise WireError("oversized", f"{len(out)} bytes")
    return out


def unseal(data, key_for):
    """
    Parse and authenticate C{data}; C{key_for(key_id, type)} returns the key
    or None.  Convenience for tests and clients; daemons use L{parse} and
    L{Frame.open} so that they can count each step.

    @return: ``(frame, message)``.
    @raise WireError: ``unknown-key`` when there is no key, or as L{parse}
        and L{Frame.open}.
    """
    frame = parse(data)
    key = key_for(frame.key_id, frame.type)
    if key is None:
        raise WireError("unknown-key", frame.key_id)
    return frame, frame.open(key)


# -- replay protection ---------------------------------------------------------

#: Seconds an ordinary frame's timestamp may be off the receiver's clock
#: (L{ReplayGuard}); L{Stamper.sync} keeps stamps the receiver may have
#: accepted within it.
REPLAY_WINDOW = 60.0


class ReplayGuard:
    """
    Accepts each authenticated frame at most once.

    - An ordinary frame's timestamp must be newer than the last one
      accepted for its key and within C{window} seconds of the local clock
      (L{check}).
    - A clock probe (L{Message.PROBE}) is exempt from the window, since its
      sender does not know our clock yet, but its timestamp must be above
      the highest probe timestamp accepted for its key (L{check_probe}); the
      sender stamps probes from a strictly increasing counter
      (L{Stamper.probe}), so a captured probe is never answered again.
    - An answer bound to our own request by an echo (L{Message.ECHO_BOUND})
      is left to the handler, which accepts it only for a request still
      outstanding (L{admit}).

    Memory is bounded: at most C{max_keys} keys are remembered in each
    table, the least recently used forgotten first; entries are made only
    for authenticated frames, so only for keys we know.  A forgotten key's
    old ordinary frames are still refused by the window; its old probes
    could be answered once more (a daemon sizes C{max_keys} above its
    number of keys).
    """

    def __init__(self, clock, window=REPLAY_WINDOW, max_keys=1_000_000):
        self._clock = clock
        self.window_us = int(window * 1_000_000)
        self.max_keys = max_keys
        self._last = {}
        self._probes = {}

    def admit(self, message_class, key_id, timestamp):
        """
        The check that applies to a frame of C{message_class}.

        @return: None if acceptable (and remembered), else the drop reason.
        """
        if message_class.PROBE:
            return self.check_probe(key_id, timestamp)
        if message_class.ECHO_BOUND:
            return None
        return self.check(key_id, timestamp)

    def check(self, key_id, timestamp):
        """
        @return: None if acceptable (and remembered), else the reason:
            ``replay`` or ``stale``.
        """
        last = self._last.get(key_id)
        if last is not None and timestamp <= last:
            return "replay"
        now = int(self._clock.seconds() * 1_000_000)
        if abs(timestamp - now) > self.window_us:
            return "stale"
        self._remember(self._last, key_id, timestamp)
        return None

    def check_probe(self, key_id, timestamp):
        """
        A clock probe: acceptable only above the highest probe timestamp
        accepted for C{key_id}, whatever our clock says.

        @return: None if acceptable (and remembered), else ``probe-replay``.
        """
        last = self._probes.get(key_id)
        if last is not None and timestamp <= last:
            return "probe-replay"
        self._remember(self._probes, key_id, timestamp)
        return None

    def _remember(self, table, key_id, timestamp):
        if key_id in table:
            del table[key_id]  # re-insert: dicts keep insertion order, so LRU
        elif len(table) >= self.max_keys:
            del table[next(iter(table))]
        table[key_id] = timestamp

    def forget(self, key_id):
        self._last.pop(key_id, None)


#: Clock probes left unanswered before L{Stamper.probe} starts catching up.
PROBE_CATCH_UP_AFTER = 3
#: Each further unanswered probe moves the next one this many times further ahead.
PROBE_CATCH_UP_FACTOR = 16
#: The furthest ahead (seconds) a catching-up probe goes: 2**32 s, 136 years.
PROBE_CATCH_UP_MAX = 2 ** 32


class Stamper:
    """
    Makes strictly increasing timestamps for one sender, on the receiver's
    clock as far as we know it (C{offset} seconds are added to ours; set
    it from a L{Pong} or L{Period}).

    Clock probes get their own counter (L{probe}): it never follows the
    offset, so that learning the receiver's clock never makes a probe look
    older than one already sent.
    """

    def __init__(self, clock, offset=0.0, window=REPLAY_WINDOW):
        self._clock = clock
        self.offset = offset
        #: The receiver's replay window (L{ReplayGuard}): a stamp within it
        #: may have been accepted (see L{sync}).
        self.window = window
        self._last = 0
        self._last_probe = 0
        self._probe_misses = 0

    def seconds(self):
        """
        The receiver's clock as we estimate it: a clock (for
        L{ReplayGuard}) that checks the freshness of what the receiver
        sends back.
        """
        return self._clock.seconds() + self.offset

    def __call__(self):
        now = int((self._clock.seconds() + self.offset) * 1_000_000)
        self._last = max(now, self._last + 1)
        return self._last

    def probe(self):
        """
        The timestamp of a clock probe: our own clock in microseconds,
        strictly increasing.  The receiver answers only a probe above the
        highest it has answered for our key.

        A sender whose clock went back (a device without a battery-backed
        clock, booting at 1970) is below that mark until its clock passes
        it again.  So from the L{PROBE_CATCH_UP_AFTER}th probe left
        unanswered in a row (see L{probe_unsent}, L{sync}), each probe goes
        L{PROBE_CATCH_UP_FACTOR} times further ahead of our clock: 1 s,
        16 s, 256 s ... up to L{PROBE_CATCH_UP_MAX} (136 years, the twelfth
        probe).  A clock that went back by D is over the mark after about
        4 + log16(D) probes: bounded, whatever D is.
        """
        n = self._probe_misses - PROBE_CATCH_UP_AFTER
        ahead = 0 if n < 0 else min(PROBE_CATCH_UP_FACTOR ** n, PROBE_CATCH_UP_MAX)
        self._probe_misses += 1
        self._last_probe = max(int((self._clock.seconds() + ahead) * 1_000_000),
                               self._last_probe + 1)
        return self._last_probe

    def probe_unsent(self):
        """
        The last probe could not be sent (no route): it does not count as
        unanswered, so that a network that is down does not push the
        receiver's mark far ahead.
        """
        self._probe_misses = max(0, self._probe_misses - 1)

    def sync(self, sent_local, received_local, server_time_us):
        """
        Set the offset from one request/response exchange: the server's
        clock read at mid-flight (so off by at most half the exchange).

        Stamps made before on a guessed clock (an optimistic login: see
        L{p2pnat.peer.client.LobbyClient}) may have run ahead of the
        receiver's.  Later stamps never go back below one the receiver may
        have accepted, i.e. one within its replay window (L{window}) of its
        clock: they would be refused as replays until its clock passed it.
        Only a stamp beyond the window, which no receiver accepted, is left
        behind.
        """
        self._probe_misses = 0
        mid = (sent_local + received_local) / 2
        self.offset = server_time_us / 1_000_000 - mid
        now = int((self._clock.seconds() + self.offset) * 1_000_000)
        error = max(0.0, received_local - sent_local) / 2 + 0.001
        if self._last > now + int((self.window + error) * 1_000_000):
            self._last = now - 1


def format_addr(addr):
    """An ``(ip, port)`` address as ``ip:port``, or ``[ip]:port`` for IPv6 (for logs)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
