# -*- test-case-name: tests.unit.test_stun -*-
"""
STUN (RFC 8489) message codec, the Binding server rule and the Binding client
helpers: pure functions and classes, no sockets and no clock.

What it promises:

- :func:`parse_message` accepts RFC 8489/5389 messages (with the magic cookie,
  96-bit transaction id) and classic RFC 3489 ones (no cookie, 128-bit id),
  checks every length and raises :class:`StunError` -- and nothing else -- on
  any malformed input. ``StunError.reason`` is one short word from
  :data:`REASONS`, meant as a metrics label.
- :func:`encode_message` writes a message with 4-byte attribute padding and
  optional MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
- :func:`answer_binding` is the whole server side of a UDP Binding service:
  bytes in, the smallest correct answer (or ``None``) out. See its docstring
  for the sizes.
- :func:`binding_request` / :func:`parse_binding_response` are the client side,
  for NAT behaviour discovery (RFC 5780).
- :func:`is_stun` / :func:`demux` tell STUN apart from other protocols sharing
  a UDP port by the first byte (RFC 7983, RFC 9443).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import stringprep
import struct
import unicodedata
from dataclasses import dataclass, field
from enum import Enum, IntEnum

__all__ = [
    "MAGIC_COOKIE",
    "FINGERPRINT_XOR",
    "HEADER_SIZE",
    "REASONS",
    "StunError",
    "StunErrorResponse",
    "MessageClass",
    "Method",
    "Attr",
    "CHANGE_IP",
    "CHANGE_PORT",
    "Message",
    "BindingResult",
    "Kind",
    "is_stun",
    "demux",
    "message_type",
    "split_message_type",
    "parse_message",
    "encode_message",
    "encode_address",
    "decode_address",
    "encode_xor_address",
    "decode_xor_address",
    "encode_error_code",
    "decode_error_code",
    "encode_unknown_attributes",
    "decode_unknown_attributes",
    "encode_change_request",
    "decode_change_request",
    "encode_response_port",
    "decode_response_port",
    "decode_text",
    "saslprep",
    "short_term_key",
    "long_term_key",
    "verify_integrity",
    "verify_integrity_sha256",
    "answer_binding",
    "binding_request",
    "parse_binding_response",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
FINGERPRINT_XOR = 0x5354554E
HEADER_SIZE = 20

#: Every ``StunError.reason`` this module raises.
REASONS = frozenset(
    {
        "truncated",  # shorter than its header, or an attribute runs past the end
        "bad-length",  # length field not a multiple of 4, or bytes after the message
        "not-stun",  # first two bits set, or a cookie-less type RFC 3489 never had
        "bad-attribute",  # a known attribute with a value of the wrong size or form
        "bad-fingerprint",  # FINGERPRINT wrong, misplaced or of the wrong size
        "wrong-transaction",  # a response to some other request
        "not-response",  # expected a response, got a request or an indication
        "error-response",  # a well-formed error response (StunErrorResponse)
        "no-mapped-address",  # a success response without any mapped address
        "bad-credentials",  # a password or username SASLprep refuses
        "oversized",  # a request whose answer would not fit STUN's 16-bit length
    }
)


class StunError(Exception):
    """
    Malformed or unusable STUN input. ``reason`` is one of :data:`REASONS`.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StunErrorResponse(StunError):
    """
    A well-formed Binding error response: ``code`` (e.g. 420) and its
    ``reason_phrase``; ``unknown`` lists UNKNOWN-ATTRIBUTES when given.
    """

    def __init__(self, code: int, reason_phrase: str, unknown: tuple[int, ...] = ()):
        super().__init__("error-response", f"{code} {reason_phrase}".strip())
        self.code = code
        self.reason_phrase = reason_phrase
        self.unknown = unknown


class MessageClass(IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(IntEnum):
    BINDING = 0x001


class Attr(IntEnum):
    """Attribute types this module knows by name (IANA STUN registry)."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489 only; never honoured
    CHANGE_REQUEST = 0x0003  # RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489 only
    CHANGED_ADDRESS = 0x0005  # RFC 3489 only
    USERNAME = 0x0006
    PASSWORD = 0x0007  # RFC 3489 only
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REFLECTED_FROM = 0x000B  # RFC 3489 only
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026  # RFC 5780
    RESPONSE_PORT = 0x0027  # RFC 5780
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780


#: CHANGE-REQUEST flags (RFC 5780 section 7.2).
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

# Value sizes checked at parse time for the attributes whose size is fixed.
_FIXED_SIZE = {
    Attr.MESSAGE_INTEGRITY: 20,
    Attr.FINGERPRINT: 4,
    Attr.CHANGE_REQUEST: 4,
    Attr.RESPONSE_PORT: 4,
}
_ADDRESS_ATTRS = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.RESPONSE_ORIGIN,
        Attr.OTHER_ADDRESS,
        Attr.ALTERNATE_SERVER,
        Attr.SOURCE_ADDRESS,
        Attr.CHANGED_ADDRESS,
        Attr.RESPONSE_ADDRESS,
        Attr.REFLECTED_FROM,
    }
)
# RFC 3489 message types: without the magic cookie only these are accepted,
# which keeps random bytes whose first byte happens to be 0..3 out.
_CLASSIC_TYPES = frozenset({0x0001, 0x0101, 0x0111, 0x0002, 0x0102, 0x0112})


# --- demultiplexing -----------------------------------------------------------


class Kind(Enum):
    """What the first byte of a datagram says it is (RFC 7983, RFC 9443)."""

    STUN = "stun"
    ZRTP = "zrtp"
    DTLS = "dtls"
    TURN_CHANNEL = "turn-channel"
    QUIC = "quic"
    RTP = "rtp"
    UNKNOWN = "unknown"


def is_stun(first_byte: int) -> bool:
    """
    True if a datagram starting with this byte is STUN by RFC 7983's rule
    (first byte 0..3: the two top bits of every STUN message are zero).
    """
    return 0 <= first_byte <= 3


def demux(data: bytes, *, turn_channels: bool = False) -> Kind:
    """
    Classify a datagram by its first byte: 0..3 STUN, 16..19 ZRTP, 20..63
    DTLS, 128..191 RTP/RTCP (RFC 7983); 64..127 and 192..255 QUIC short and
    long headers (RFC 9443). 64..79 is also TURN ChannelData (RFC 7983); a
    port that carries both must know from context which it has, so those
    bytes are QUIC unless ``turn_channels`` says this port relays TURN
    (p2pnat's ports do not).
    """
    if not data:
        return Kind.UNKNOWN
    b = data[0]
    if b <= 3:
        return Kind.STUN
    if 16 <= b <= 19:
        return Kind.ZRTP
    if 20 <= b <= 63:
        return Kind.DTLS
    if 64 <= b <= 79 and turn_channels:
        return Kind.TURN_CHANNEL
    if 128 <= b <= 191:
        return Kind.RTP
    if 64 <= b <= 127 or b >= 192:
        return Kind.QUIC
    return Kind.UNKNOWN


# --- message type -------------------------------------------------------------


def message_type(method: int, msg_class: int) -> int:
    """The 14-bit message type: method bits M0..M11 interleaved with C0, C1."""
    if not 0 <= method <= 0xFFF or not 0 <= msg_class <= 3:
        raise ValueError("method must fit 12 bits and class 2 bits")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((msg_class & 1) << 4)
        | ((msg_class & 2) << 7)
    )


def split_message_type(mtype: int) -> tuple[int, MessageClass]:
    """The inverse of :func:`message_type`: ``(method, class)``."""
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    msg_class = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)
    return method, MessageClass(msg_class)


# --- messages -----------------------------------------------------------------


@dataclass
class Message:
    """
    One STUN message. ``transaction_id`` is 12 bytes for RFC 5389/8489
    messages (the magic cookie is implied) and 16 bytes for classic RFC 3489
    ones. ``attributes`` keeps wire order, duplicates and unknown types; it
    does not hold MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 or FINGERPRINT
    when the message was parsed -- those are checked through ``raw`` and the
    offsets, and added by :func:`encode_message`.
    """

    method: int
    msg_class: MessageClass
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    # Set by parse_message only:
    raw: bytes = b""
    integrity_offset: int | None = None
    integrity_sha256_offset: int | None = None
    has_fingerprint: bool = False

    @property
    def classic(self) -> bool:
        """True for an RFC 3489 message (no magic cookie, 128-bit id)."""
        return len(self.transaction_id) == 16

    @property
    def xor_key(self) -> bytes:
        """The 16 header bytes XOR-MAPPED-ADDRESS is masked with."""
        return self.transaction_id if self.classic else _COOKIE_BYTES + self.transaction_id

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def types(self) -> list[int]:
        return [t for t, _ in self.attributes]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def parse_message(data: bytes) -> Message:
    """
    Parse one STUN message that fills ``data`` exactly (a UDP datagram).

    Checks: header size, the two zero top bits, the length field (a multiple
    of 4, equal to what follows the header), every attribute header and
    padded value against the end of the message, the fixed sizes of
    MESSAGE-INTEGRITY(-SHA256), FINGERPRINT, CHANGE-REQUEST, RESPONSE-PORT and
    address attributes, and the FINGERPRINT value and position. Attributes
    after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and
    FINGERPRINT are ignored (RFC 8489 section 14.5), as are those after
    MESSAGE-INTEGRITY-SHA256 other than FINGERPRINT. Raises only
    :class:`StunError`.
    """
    try:
        data = bytes(data)
    except (TypeError, ValueError):
        raise StunError("not-stun", "not bytes") from None
    if len(data) < HEADER_SIZE:
        raise StunError("truncated", f"{len(data)} bytes")
    mtype, length = struct.unpack_from("!HH", data, 0)
    if mtype & 0xC000:
        raise StunError("not-stun", "top bits set")
    if length % 4:
        raise StunError("bad-length", f"length {length} not a multiple of 4")
    if HEADER_SIZE + length > len(data):
        raise StunError("truncated", f"length {length}, {len(data) - HEADER_SIZE} follow")
    if HEADER_SIZE + length < len(data):
        raise StunError("bad-length", f"length {length}, {len(data) - HEADER_SIZE} follow")
    if data[4:8] == _COOKIE_BYTES:
        txid = data[8:20]
    else:
        if mtype not in _CLASSIC_TYPES:
            raise StunError("not-stun", f"type {mtype:#06x} without magic cookie")
        txid = data[4:20]
    method, msg_class = split_message_type(mtype)
    msg = Message(method, msg_class, txid, raw=data)

    pos = HEADER_SIZE
    end = HEADER_SIZE + length
    ignoring = False  # after MESSAGE-INTEGRITY(-SHA256)
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated", "attribute header")
        atype, alen = struct.unpack_from("!HH", data, pos)
        vstart = pos + 4
        if vstart + _pad4(alen) > end:
            raise StunError("truncated", f"attribute {atype:#06x} of {alen} bytes")
        value = data[vstart : vstart + alen]
        if msg.has_fingerprint:
            raise StunError("bad-fingerprint", "attribute after FINGERPRINT")
        want = _FIXED_SIZE.get(atype)
        if want is not None and alen != want:
            raise StunError("bad-attribute", f"{atype:#06x} of {alen} bytes")
        if atype in _ADDRESS_ATTRS and alen not in (8, 20):
            raise StunError("bad-attribute", f"address {atype:#06x} of {alen} bytes")
        if atype == Attr.FINGERPRINT:
            (got,) = struct.unpack("!I", value)
            if got != _fingerprint(data[:pos], pos + 8 - HEADER_SIZE):
                raise StunError("bad-fingerprint")
            msg.has_fingerprint = True
        elif atype == Attr.MESSAGE_INTEGRITY_SHA256:
            if not (16 <= alen <= 32 and alen % 4 == 0):
                raise StunError("bad-attribute", f"MESSAGE-INTEGRITY-SHA256 of {alen} bytes")
            if msg.integrity_sha256_offset is None:
                msg.integrity_sha256_offset = pos
            ignoring = True
        elif atype == Attr.MESSAGE_INTEGRITY:
            if msg.integrity_offset is None and msg.integrity_sha256_offset is None:
                msg.integrity_offset = pos
            ignoring = True
        elif not ignoring:
            msg.attributes.append((atype, value))
        pos = vstart + _pad4(alen)
    return msg


def _fingerprint(prefix: bytes, length: int) -> int:
    """CRC-32 of the message up to FINGERPRINT, length field set to ``length``."""
    crc = binascii.crc32(prefix[:2] + struct.pack("!H", length) + prefix[4:])
    return crc ^ FINGERPRINT_XOR


def encode_message(
    msg: Message,
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """
    Encode ``msg`` (its ``attributes``, each padded with zero bytes to a
    multiple of 4), then append MESSAGE-INTEGRITY (HMAC-SHA1 with
    ``integrity_key``), MESSAGE-INTEGRITY-SHA256 and FINGERPRINT as asked.
    Raises ValueError for values that cannot be encoded (a caller bug).
    """
    tid = bytes(msg.transaction_id)
    if len(tid) == 12:
        id_part = _COOKIE_BYTES + tid
    elif len(tid) == 16:
        id_part = tid
    else:
        raise ValueError("transaction id must be 12 or 16 bytes")
    mtype = message_type(msg.method, msg.msg_class)
    body = bytearray()
    for atype, value in msg.attributes:
        if not 0 <= atype <= 0xFFFF or len(value) > 0xFFFF:
            raise ValueError(f"attribute {atype} cannot be encoded")
        body += struct.pack("!HH", atype, len(value)) + value
        body += b"\x00" * (_pad4(len(value)) - len(value))

    def header(extra: int) -> bytes:
        n = len(body) + extra
        if n > 0xFFFC:
            raise ValueError("message too long")
        return struct.pack("!HH", mtype, n) + id_part

    if integrity_key is not None:
        mac = hmac.new(integrity_key, header(24) + body, hashlib.sha1).digest()
        body += struct.pack("!HH", Attr.MESSAGE_INTEGRITY, 20) + mac
    if integrity_sha256_key is not None:
        mac = hmac.new(integrity_sha256_key, header(36) + body, hashlib.sha256).digest()
        body += struct.pack("!HH", Attr.MESSAGE_INTEGRITY_SHA256, 32) + mac
    if fingerprint:
        head = header(8)
        crc = binascii.crc32(head + body) ^ FINGERPRINT_XOR
        return head + bytes(body) + struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
    return header(0) + bytes(body)


# --- attribute values -----------------------------------------------------------


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address object from a host string; IPv4-mapped IPv6 becomes IPv4."""
    host = host.split("%", 1)[0]  # drop an IPv6 scope id
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def encode_address(host: str, port: int) -> bytes:
    """MAPPED-ADDRESS style value (also RESPONSE-ORIGIN, OTHER-ADDRESS)."""
    ip = _ip(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port out of range")
    family = 1 if ip.version == 4 else 2
    return struct.pack("!BBH", 0, family, port) + ip.packed


def decode_address(value: bytes) -> tuple[str, int]:
    """``(ip, port)`` from a MAPPED-ADDRESS style value; StunError if bad."""
    if len(value) == 8 and value[1] == 1:
        return str(ipaddress.IPv4Address(value[4:8])), struct.unpack_from("!H", value, 2)[0]
    if len(value) == 20 and value[1] == 2:
        return str(ipaddress.IPv6Address(value[4:20])), struct.unpack_from("!H", value, 2)[0]
    raise StunError("bad-attribute", "address family/size")


def _xor(value: bytes, key: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(value, key))


def encode_xor_address(host: str, port: int, xor_key: bytes) -> bytes:
    """
    XOR-MAPPED-ADDRESS value. ``xor_key`` is :attr:`Message.xor_key`: the
    magic cookie followed by the 12-byte transaction id.
    """
    plain = encode_address(host, port)
    return plain[:2] + _xor(plain[2:], xor_key[:2] + xor_key[:4] + xor_key[4:16])


def decode_xor_address(value: bytes, xor_key: bytes) -> tuple[str, int]:
    """``(ip, port)`` from an XOR-MAPPED-ADDRESS value; StunError if bad."""
    if len(value) not in (8, 20) or len(xor_key) != 16:
        raise StunError("bad-attribute", "xor address size")
    return decode_address(value[:2] + _xor(value[2:], xor_key[:2] + xor_key))


def encode_error_code(code: int, reason: str = "") -> bytes:
    """ERROR-CODE value: class (3..6) and number (0..99), then the reason."""
    if not 300 <= code <= 699:
        raise ValueError("error code must be 300..699")
    text = reason.encode("utf-8")
    if len(text) > 763:
        raise ValueError("reason phrase too long")
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


def decode_error_code(value: bytes) -> tuple[int, str]:
    """``(code, reason phrase)``; StunError if the value is malformed."""
    if len(value) < 4:
        raise StunError("bad-attribute", "ERROR-CODE too short")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise StunError("bad-attribute", "ERROR-CODE out of range")
    return cls * 100 + number, value[4:].decode("utf-8", "replace")


def encode_unknown_attributes(types: list[int] | tuple[int, ...], classic: bool = False) -> bytes:
    """
    UNKNOWN-ATTRIBUTES value. RFC 3489 wanted a whole number of 32-bit words
    and had an odd list repeat an entry; ``classic=True`` does that.
    """
    types = list(types)
    if classic and len(types) % 2:
        types.append(types[-1])
    return b"".join(struct.pack("!H", t) for t in types)


def decode_unknown_attributes(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise StunError("bad-attribute", "UNKNOWN-ATTRIBUTES of odd size")
    return struct.unpack(f"!{len(value) // 2}H", value)


def encode_change_request(change_ip: bool = False, change_port: bool = False) -> bytes:
    return struct.pack("!I", (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0))


def decode_change_request(value: bytes) -> tuple[bool, bool]:
    """``(change_ip, change_port)``."""
    if len(value) != 4:
        raise StunError("bad-attribute", "CHANGE-REQUEST size")
    (flags,) = struct.unpack("!I", value)
    return bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT)


def encode_response_port(port: int) -> bytes:
    return struct.pack("!HH", port, 0)


def decode_response_port(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("bad-attribute", "RESPONSE-PORT size")
    return struct.unpack_from("!H", value)[0]


def decode_text(value: bytes) -> str:
    """USERNAME, SOFTWARE, REALM, NONCE: UTF-8 text; StunError if it is not."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError("bad-attribute", "not UTF-8") from None


# --- credentials --------------------------------------------------------------


def saslprep(text: str) -> str:
    """
    SASLprep (RFC 4013) for stored-string-free use (unassigned code points
    allowed, as for queries): map soft hyphens and friends to nothing,
    non-ASCII spaces to SPACE, NFKC, then refuse prohibited characters and
    broken bidirectional text with StunError("bad-credentials").
    """
    chars = []
    for ch in text:
        if stringprep.in_table_b1(ch):
            continue
        chars.append(" " if stringprep.in_table_c12(ch) else ch)
    out = unicodedata.normalize("NFKC", "".join(chars))
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for ch in out:
        if any(check(ch) for check in prohibited):
            raise StunError("bad-credentials", f"prohibited character U+{ord(ch):04X}")
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out) or not (
            stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])
        ):
            raise StunError("bad-credentials", "bidirectional text")
    return out


def short_term_key(password: str) -> bytes:
    """Short-term credential key: the SASLprep'd password (RFC 5389 15.4)."""
    return saslprep(password).encode("utf-8")


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """
    Long-term credential key: MD5(username ":" realm ":" SASLprep(password)).
    The username and realm are used as sent (the client sends them already
    prepared, as RFC 5769 section 2.4 does).
    """
    text = f"{username}:{realm}:{saslprep(password)}"
    return hashlib.md5(text.encode("utf-8")).digest()


def verify_integrity(msg: Message, key: bytes) -> bool:
    """True if ``msg`` (from :func:`parse_message`) has a valid MESSAGE-INTEGRITY."""
    off = msg.integrity_offset
    if off is None:
        return False
    value = msg.raw[off + 4 : off + 24]
    signed = msg.raw[:2] + struct.pack("!H", off + 24 - HEADER_SIZE) + msg.raw[4:off]
    return hmac.compare_digest(hmac.new(key, signed, hashlib.sha1).digest(), value)


def verify_integrity_sha256(msg: Message, key: bytes) -> bool:
    """True if ``msg`` has a valid (possibly truncated) MESSAGE-INTEGRITY-SHA256."""
    off = msg.integrity_sha256_offset
    if off is None:
        return False
    (alen,) = struct.unpack_from("!H", msg.raw, off + 2)
    value = msg.raw[off + 4 : off + 4 + alen]
    signed = msg.raw[:2] + struct.pack("!H", off + 4 + alen - HEADER_SIZE) + msg.raw[4:off]
    return hmac.compare_digest(hmac.new(key, signed, hashlib.sha256).digest()[:alen], value)


# --- server side --------------------------------------------------------------

# Comprehension-required attributes a Binding request may carry that we
# understand. USERNAME / MESSAGE-INTEGRITY(-SHA256) and friends are understood
# and ignored: this is an unauthenticated Binding service and the answer is not
# signed. CHANGE-REQUEST is understood (see answer_binding). Everything else
# below 0x8000 -- notably RESPONSE-ADDRESS (RFC 3489 reflection to a third
# party) and RESPONSE-PORT (reflection to another port of the source's IP,
# another user's mapping behind a shared NAT), which we refuse to honour --
# gets a 420, as RFC 5780 section 6.1 asks of a server without them.
_SERVER_UNDERSTOOD = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.CHANGE_REQUEST,
        Attr.USERNAME,
        Attr.ERROR_CODE,
        Attr.UNKNOWN_ATTRIBUTES,
        Attr.REALM,
        Attr.NONCE,
        Attr.PASSWORD_ALGORITHM,
        Attr.USERHASH,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.PADDING,
    }
)


def answer_binding(
    data: bytes,
    source: tuple,
    *,
    response_origin: tuple[str, int] | None = None,
    other_address: tuple[str, int] | None = None,
    software: str | None = None,
    honour_change: bool = False,
) -> bytes | None:
    """
    The answer a Binding server sends back to ``source`` (``(host, port)``,
    extra tuple items such as IPv6 flow info ignored) for the datagram
    ``data``; ``None`` when a valid message needs no answer (indications,
    responses, methods other than Binding); :class:`StunError` when ``data``
    is malformed, or so large that its answer could not be encoded (drop it,
    count ``e.reason``).

    The answer is kept minimal because it goes to an address nobody has
    verified: only what the request and RFC 5780 need, nothing optional.

    - RFC 5389/8489 request: XOR-MAPPED-ADDRESS.
    - Classic RFC 3489 request (no magic cookie): MAPPED-ADDRESS *instead of*
      XOR-MAPPED-ADDRESS (RFC 5389 section 12.2), the 128-bit id echoed. It
      is what such clients read; Debian's ``stun`` misdecodes an
      XOR-MAPPED-ADDRESS in such an answer as 0.0.0.0:0.
    - ``response_origin`` / ``other_address``, when the caller passes them,
      as RESPONSE-ORIGIN / OTHER-ADDRESS (SOURCE-ADDRESS / CHANGED-ADDRESS
      for a classic request). An RFC 5780 server passes both for every
      request, CHANGE-REQUEST or not (section 6.1): a standard client
      reads OTHER-ADDRESS from its first, plain answer and runs no test
      without it.
    - CHANGE-REQUEST with no flag set is honoured trivially. With "change IP"
      or "change port" set, which one socket cannot do, the request is
      answered with error 420 naming CHANGE-REQUEST (RFC 5780 section 6.1:
      a server without an alternate address MUST), so a client learns the
      test is unsupported instead of reading a reply from our one address
      as a NAT filtering result; a silent drop would read as filtering.
      With ``honour_change`` the caller promises to send the answer from
      the address the flags ask for (a sibling socket, see
      :mod:`p2pnat.net.udp`): the request is then answered normally.
    - PADDING in the request (RFC 5780 path MTU probing) is echoed with the
      same length, so the answer tracks the request's size.
    - Every other comprehension-required attribute we do not serve gets
      error 420 listing it: RESPONSE-ADDRESS (RFC 3489's answer to a third
      party) and RESPONSE-PORT (RFC 5780's answer to another port of the
      source's IP, which behind a shared NAT is someone else's mapping), so
      an answer only ever goes back where the request came from.
    - SOFTWARE only when the caller passes it (+4 and the padded text).

    Sizes in bytes (FP: the request carries FINGERPRINT, and so does the
    answer; addresses of RFC 5780: ``response_origin`` and
    ``other_address`` given, of the source's family). docs/stun.rst has
    the whole table and why the ratio is acceptable:

    =====================================  =======  ======  ======
    request                                request  IPv4    IPv6
    =====================================  =======  ======  ======
    bare                                   20       32      44
    FP                                     28       40      52
    CHANGE-REQUEST without flags           28       32      44
    bare, addresses of RFC 5780            20       56      92
    FP, addresses of RFC 5780              28       64      100
    change refused: 420                    28       36      36
    change refused: 420, FP                36       44      44
    one unknown attribute (RESPONSE-PORT)  28       36      36
    PADDING of n (a multiple of 4)         24 + n   36 + n  48 + n
    =====================================  =======  ======  ======

    The worst ratio is 4.6 (20 -> 92: a bare request over IPv6 to an
    RFC 5780 server). PADDING is echoed byte for byte, so no answer is
    more than 72 bytes larger than its request (without SOFTWARE).
    """
    msg = parse_message(data)
    if msg.method != Method.BINDING or msg.msg_class != MessageClass.REQUEST:
        return None
    host, port = source[0], source[1]

    unknown = []
    for t in msg.types():
        if t < 0x8000 and t not in _SERVER_UNDERSTOOD and t not in unknown:
            unknown.append(t)
    change = msg.get(Attr.CHANGE_REQUEST)
    if change is not None and any(decode_change_request(change)) and not honour_change:
        if Attr.CHANGE_REQUEST not in unknown:
            unknown.append(Attr.CHANGE_REQUEST)
    if unknown:
        reply = Message(
            Method.BINDING,
            MessageClass.ERROR,
            msg.transaction_id,
            [
                (Attr.ERROR_CODE, encode_error_code(420)),
                (Attr.UNKNOWN_ATTRIBUTES, encode_unknown_attributes(unknown, msg.classic)),
            ],
        )
        return encode_message(reply, fingerprint=msg.has_fingerprint)

    attrs: list[tuple[int, bytes]] = []
    if msg.classic:
        attrs.append((Attr.MAPPED_ADDRESS, encode_address(host, port)))
        if response_origin is not None:
            attrs.append((Attr.SOURCE_ADDRESS, encode_address(*response_origin)))
        if other_address is not None:
            attrs.append((Attr.CHANGED_ADDRESS, encode_address(*other_address)))
    else:
        attrs.append((Attr.XOR_MAPPED_ADDRESS, encode_xor_address(host, port, msg.xor_key)))
        if response_origin is not None:
            attrs.append((Attr.RESPONSE_ORIGIN, encode_address(*response_origin)))
        if other_address is not None:
            attrs.append((Attr.OTHER_ADDRESS, encode_address(*other_address)))
    padding = msg.get(Attr.PADDING)
    if padding is not None:
        attrs.append((Attr.PADDING, bytes(len(padding))))
    if software is not None:
        attrs.append((Attr.SOFTWARE, software.encode("utf-8")))
    # Only a request near STUN's 64 KiB limit, larger than a UDP datagram
    # carries, gets here: the PADDING it asks back plus our addresses would
    # not fit the length field.
    size = sum(4 + _pad4(len(v)) for _, v in attrs) + (8 if msg.has_fingerprint else 0)
    if size > 0xFFFC:
        raise StunError("oversized", f"the answer would need {size} bytes of attributes")
    reply = Message(Method.BINDING, MessageClass.SUCCESS, msg.transaction_id, attrs)
    return encode_message(reply, fingerprint=msg.has_fingerprint)


# --- client side --------------------------------------------------------------


@dataclass(frozen=True)
class BindingResult:
    """What a Binding success response says: our reflexive address and, when
    the server gave them, where it answered from and its other address."""

    mapped: tuple[str, int]
    response_origin: tuple[str, int] | None = None
    other_address: tuple[str, int] | None = None


def binding_request(
    transaction_id: bytes | None = None,
    *,
    change_ip: bool = False,
    change_port: bool = False,
    fingerprint: bool = True,
    padding: int = 0,
) -> tuple[bytes, bytes]:
    """
    A Binding request: ``(transaction id, datagram)``. A fresh random 12-byte
    id unless one is given. CHANGE-REQUEST only when a flag is set; PADDING of
    ``padding`` zero bytes when > 0; FINGERPRINT by default (20 bytes bare,
    28 with FINGERPRINT).
    """
    tid = os.urandom(12) if transaction_id is None else bytes(transaction_id)
    if len(tid) != 12:
        raise ValueError("transaction id must be 12 bytes")
    attrs: list[tuple[int, bytes]] = []
    if change_ip or change_port:
        attrs.append((Attr.CHANGE_REQUEST, encode_change_request(change_ip, change_port)))
    if padding:
        attrs.append((Attr.PADDING, bytes(padding)))
    msg = Message(Method.BINDING, MessageClass.REQUEST, tid, attrs)
    return tid, encode_message(msg, fingerprint=fingerprint)


def parse_binding_response(data: bytes, transaction_id: bytes) -> BindingResult:
    """
    Read the answer to the Binding request ``transaction_id``. XOR-MAPPED-
    ADDRESS is preferred, MAPPED-ADDRESS accepted (old servers). Raises
    StunError: malformed input, "wrong-transaction", "not-response",
    "no-mapped-address", or :class:`StunErrorResponse` for an error response.
    """
    msg = parse_message(data)
    if msg.transaction_id != bytes(transaction_id):
        raise StunError("wrong-transaction")
    if msg.method != Method.BINDING or msg.msg_class not in (
        MessageClass.SUCCESS,
        MessageClass.ERROR,
    ):
        raise StunError("not-response")
    if msg.msg_class == MessageClass.ERROR:
        value = msg.get(Attr.ERROR_CODE)
        if value is None:
            raise StunError("bad-attribute", "error response without ERROR-CODE")
        code, phrase = decode_error_code(value)
        unknown = msg.get(Attr.UNKNOWN_ATTRIBUTES)
        raise StunErrorResponse(
            code, phrase, decode_unknown_attributes(unknown) if unknown is not None else ()
        )
    xor = msg.get(Attr.XOR_MAPPED_ADDRESS)
    plain = msg.get(Attr.MAPPED_ADDRESS)
    if xor is not None:
        mapped = decode_xor_address(xor, msg.xor_key)
    elif plain is not None:
        mapped = decode_address(plain)
    else:
        raise StunError("no-mapped-address")
    origin = msg.get(Attr.RESPONSE_ORIGIN)
    if origin is None:
        origin = msg.get(Attr.SOURCE_ADDRESS)
    other = msg.get(Attr.OTHER_ADDRESS)
    if other is None:
        other = msg.get(Attr.CHANGED_ADDRESS)
    return BindingResult(
        mapped,
        decode_address(origin) if origin is not None else None,
        decode_address(other) if other is not None else None,
    )
