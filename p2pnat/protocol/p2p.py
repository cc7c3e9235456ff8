# -*- test-case-name: tests.unit.test_p2p_messages -*-
"""
Wire messages of the P2P path (types 0x20-0x3F of the p2pnat frame; see
``docs/protocol.rst``).

Lobby messages are authenticated with the client's key (key ID: the
client ID).  Punch probes and path traffic are authenticated with the
session key the lobby hands to both peers; their key ID is
``SESSION.a`` or ``SESSION.b`` (the session ID in hex and the sender's
role), so that each direction has its own replay window.

The session key travels to each peer encrypted with a pad derived from
that peer's own key (HMAC-SHA256 as a PRF over the session ID), and the
whole message is MAC'd: only the two peers and the lobby know it.
"""

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from p2pnat.protocol import wire
from p2pnat.protocol.wire import (
    Message,
    WireError,
    pack_addr,
    register,
    unpack_addr,
    unpack_head,
    unpack_head_addr,
    unpack_tail,
    zero_padding,
)

#: Request IDs, session IDs.
SESSION_ID_LEN = 16


def seal_session_key(client_key, session_id, session_key):
    """Encrypt a 32-byte session key for the client owning C{client_key}."""
    pad = hmac.new(client_key, b"p2pnat session key\0" + session_id, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(session_key, pad))


open_session_key = seal_session_key  # XOR with the same pad

#: Length of a role's bind secret (L{bind_proof}).
BIND_SECRET_LEN = 16


def seal_bind_secret(client_key, session_id, secret):
    """
    Encrypt a role's bind secret for the client owning C{client_key}, as
    L{seal_session_key} does the session key, with a pad of its own.
    """
    pad = hmac.new(client_key, b"p2pnat bind secret\0" + session_id, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(secret, pad[:BIND_SECRET_LEN]))


open_bind_secret = seal_bind_secret  # XOR with the same pad


def bind_proof(secret, key_id, timestamp):
    """
    The proof a L{RelayBind} carries to a relay on another node than the
    sender's: a MAC under the role's bind secret over the bind's key ID
    (session and role) and frame timestamp, which the relay's replay guard
    admits once.  The peer, who holds the session key but not this
    secret, cannot make one.
    """
    data = b"p2pnat relay bind\0" + key_id.encode("ascii") + struct.pack("!Q", timestamp)
    return hmac.new(secret, data, hashlib.sha256).digest()[:BIND_SECRET_LEN]


def session_key_id(session_id, role):
    """The key ID of path traffic sent by C{role} ('a' or 'b')."""
    return f"{session_id.hex()}.{role}"


def parse_session_key_id(key_id):
    """``(session_id, role)`` of a path key ID, or None."""
    sid, _, role = key_id.partition(".")
    if role not in ("a", "b") or len(sid) != 2 * SESSION_ID_LEN:
        return None
    try:
        return bytes.fromhex(sid), role
    except ValueError:
        return None


# -- NAT information, as clients report it -------------------------------------

MAPPINGS = ("unknown", "none", "endpoint-independent", "address-dependent",
            "address-and-port-dependent")
ALLOCATIONS = ("unknown", "preserving", "sequential", "random")
_NAT = struct.Struct("!BBBhH")


@dataclass(frozen=True)
class NatInfo:
    """
    What a client learnt of its NAT (see L{p2pnat.protocol.nat}), as carried
    on the wire: mapping and filtering behaviour, port allocation and its
    step, and the rate (ports per second) other traffic consumes.
    """

    mapping: str = "unknown"
    filtering: str = "unknown"
    allocation: str = "unknown"
    step: int = 0
    rate: float = 0.0

    def encode(self):
        return _NAT.pack(MAPPINGS.index(self.mapping), MAPPINGS.index(self.filtering),
                         ALLOCATIONS.index(self.allocation), self.step,
                         min(65535, int(round(self.rate * 10))))

    @classmethod
    def decode(cls, data, offset=0):
        if len(data) < offset + _NAT.size:
            raise WireError("bad-body", "nat info truncated")
        m, f, a, step, rate = _NAT.unpack_from(data, offset)
        try:
            return cls(MAPPINGS[m], MAPPINGS[f], ALLOCATIONS[a], step, rate / 10), \
                offset + _NAT.size
        except IndexError:
            raise WireError("bad-body", "nat info values")


def _id(data, offset):
    if len(data) < offset + 1:
        raise WireError("bad-body", "id truncated")
    n = data[offset]
    end = offset + 1 + n
    if len(data) < end:
        raise WireError("bad-body", "id truncated")
    try:
        text = data[offset + 1:end].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("bad-body", "id not ascii")
    if not wire.valid_key_id(text):
        raise WireError("bad-body", "bad id")
    return text, end


def _pack_id(text):
    raw = text.encode("ascii")
    return bytes([len(raw)]) + raw


# -- candidates ------------------------------------------------------------------

#: Frame flag (header byte 4) on Login, Keepalive, ConnectRequest and Answer:
#: the sender understands candidate lists in Invite and Introduce.  On a
#: Welcome: this lobby relays candidates.  Receivers of older releases
#: ignore header flags, so the flag is how both sides learn that the other
#: reads the longer bodies before anything sends one.
FLAG_CANDIDATES = 0x01
#: At most this many extra candidates travel with one introduction.
MAX_CANDIDATES = 4


def valid_candidate(addr):
    """
    Whether C{addr} may be offered to a peer as a candidate: a unicast
    address a peer could send to (not loopback, multicast, unspecified,
    link-local, reserved or IPv4-mapped) and a port other than 0.
    """
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return False
    return 0 < addr[1] <= 65535 and not (
        ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local
        or ip.is_reserved)


def _pack_candidates(candidates):
    """
    The optional candidate block: count u8, then that many addresses.  An
    empty list packs to nothing, so that a body without candidates is the
    body older releases send.
    """
    if not candidates:
        return b""
    if len(candidates) > MAX_CANDIDATES:
        raise WireError("bad-body", f"more than {MAX_CANDIDATES} candidates")
    return bytes([len(candidates)]) + b"".join(pack_addr(*c) for c in candidates)


def _candidates(body, offset, zero_count=False):
    """
    Decode a candidate block at C{offset} if one is there: ``(candidates,
    end)``.  A zero byte (or the end of the body) means none: it is the
    first byte of the padding older releases send; with C{zero_count} (a
    body without padding) a zero byte is a count of none, and is read.
    """
    if len(body) <= offset:
        return (), offset
    if body[offset] == 0:
        return (), offset + 1 if zero_count else offset
    n = body[offset]
    if n > MAX_CANDIDATES:
        raise WireError("bad-body", f"{n} candidates")
    found, end = [], offset + 1
    for _ in range(n):
        addr, end = unpack_addr(body, end)
        found.append(addr)
    return tuple(found), end


# -- lobby ---------------------------------------------------------------------

@register
@dataclass
class Login(Message):
    """
    Client to lobby: I am here (and this is my NAT).  Answered by
    L{Welcome}.  An ordinary fresh frame: the client learns the lobby's
    clock first with a L{wire.Ping}.
    """

    TYPE = 0x20
    local: tuple = ("0.0.0.0", 0)
    nat: NatInfo = NatInfo()
    padding: int = 32

    def encode_body(self):
        return pack_addr(*self.local) + self.nat.encode() + bytes(self.padding)

    @classmethod
    def decode_body(cls, body):
        local, end = unpack_addr(body)
        nat, end = NatInfo.decode(body, end)
        return cls(local, nat, zero_padding(body, end, "login"))


@register
@dataclass
class Welcome(Message):
    """
    Lobby to client: logged in (or presence refreshed).  Echoes the
    request's timestamp; tells the observed address, the lobby's clock and
    the keepalive interval to keep presence.
    """

    TYPE = 0x21
    ECHO_BOUND = True
    echo: int = 0
    observed: tuple = ("0.0.0.0", 0)
    server_time: int = 0
    keepalive: int = 20

    def encode_body(self):
        return struct.pack("!Q", self.echo) + pack_addr(*self.observed) + struct.pack(
            "!QH", self.server_time, self.keepalive)

    @classmethod
    def decode_body(cls, body):
        (echo,), end = unpack_head("!Q", body, "welcome")
        observed, end = unpack_addr(body, end)
        server_time, keepalive = unpack_tail("!QH", body, end, "welcome")
        return cls(echo, observed, server_time, keepalive)


@register
@dataclass
class Keepalive(wire.Padded):
    """Client to lobby: keep my presence (and the NAT mapping).  Answered by L{Welcome}."""

    TYPE = 0x22
    padding: int = 40  # a Welcome with an IPv6 address must not be larger


@register
@dataclass
class Logout(Message):
    """Client to lobby: I am leaving.  Not answered."""

    TYPE = 0x23


@register
@dataclass
class ConnectRequest(Message):
    """
    A to lobby, sent from a fresh local port (the lobby observes the fresh
    mapping P+b): introduce me to C{peer}.  C{local} is this socket's own
    address (for peers on the same LAN); C{candidates} are more addresses
    where this client takes probes (a port-mapped external address, a
    global IPv6 address), up to L{MAX_CANDIDATES}, sent only to a lobby
    that set L{FLAG_CANDIDATES}.
    """

    TYPE = 0x24
    request_id: int = 0
    peer: str = ""
    local: tuple = ("0.0.0.0", 0)
    nat: NatInfo = NatInfo()
    padding: int = 0
    candidates: tuple = ()

    def encode_body(self):
        return (struct.pack("!Q", self.request_id) + _pack_id(self.peer)
                + pack_addr(*self.local) + self.nat.encode()
                + _pack_candidates(self.candidates) + bytes(self.padding))

    @classmethod
    def decode_body(cls, body):
        (rid,), end = unpack_head("!Q", body, "connect")
        peer, end = _id(body, end)
        local, end = unpack_addr(body, end)
        nat, end = NatInfo.decode(body, end)
        candidates, end = _candidates(body, end)
        return cls(rid, peer, local, nat, zero_padding(body, end, "connect"), candidates)


@dataclass
class _Introduction(Message):
    """
    Lobby to a peer: the other side's ID, observed fresh address, local
    address and NAT, the session (ID and encrypted key), and the other
    side's candidates (only to a client that set L{FLAG_CANDIDATES}: the
    block at the end of the body is new).

    In a lobby cluster, when the session is relayed by another node than
    the receiver's: C{relay}, that node's address (the peer binds its role
    there, and takes relayed datagrams from there only), and
    C{sealed_secret}, the receiver's bind secret (L{seal_bind_secret};
    its L{RelayBind} proves the role with L{bind_proof}).  They follow the
    candidate block, which then always has its count (0: none), so that a
    body without them is byte for byte the body of a single lobby.
    """

    TYPE = None
    request_id: int = 0
    peer: str = ""
    observed: tuple = ("0.0.0.0", 0)
    local: tuple = ("0.0.0.0", 0)
    nat: NatInfo = NatInfo()
    session_id: bytes = bytes(SESSION_ID_LEN)
    sealed_key: bytes = bytes(32)
    accepted: bool = True
    candidates: tuple = ()
    relay: tuple = None
    sealed_secret: bytes = bytes(BIND_SECRET_LEN)

    _SESSION = struct.Struct(f"!{SESSION_ID_LEN}s32s")

    def encode_body(self):
        body = (struct.pack("!QB", self.request_id, int(self.accepted)) + _pack_id(self.peer)
                + pack_addr(*self.observed) + pack_addr(*self.local) + self.nat.encode()
                + self.session_id + self.sealed_key)
        if self.relay is None:
            return body + _pack_candidates(self.candidates)
        if len(self.sealed_secret) != BIND_SECRET_LEN:
            raise WireError("bad-body", "bind secret of the wrong length")
        return (body + (_pack_candidates(self.candidates) or b"\0") + pack_addr(*self.relay)
                + self.sealed_secret)

    @classmethod
    def decode_body(cls, body):
        (rid, accepted), end = unpack_head("!QB", body, "introduction")
        peer, end = _id(body, end)
        observed, end = unpack_addr(body, end)
        local, end = unpack_addr(body, end)
        nat, end = NatInfo.decode(body, end)
        if len(body) < end + cls._SESSION.size:
            raise WireError("bad-body", "introduction truncated")
        sid, key = cls._SESSION.unpack_from(body, end)
        end += cls._SESSION.size
        start = end
        candidates, end = _candidates(body, end, zero_count=True)
        relay, secret = None, bytes(BIND_SECRET_LEN)
        if end < len(body) or (end > start and not candidates):
            # A relay block follows the candidates (a count of none is
            # there only for it: a stray zero byte is refused).
            relay, end = unpack_addr(body, end)
            secret = body[end:end + BIND_SECRET_LEN]
            if len(secret) != BIND_SECRET_LEN:
                raise WireError("bad-body", "bind secret truncated")
            end += BIND_SECRET_LEN
        wire.expect_end(body, end, "introduction")
        return cls(rid, peer, observed, local, nat, sid, key, bool(accepted), candidates,
                   relay, bytes(secret))


@register
@dataclass
class Invite(_Introduction):
    """Lobby to B (at B's presence address): A asks to connect; here is A."""

    TYPE = 0x25


@register
@dataclass
class Answer(Message):
    """
    B to lobby, from a fresh local port (the lobby observes Q+d): accept or
    refuse the request.  Retransmitted until the lobby's L{AnswerAck}.
    """

    TYPE = 0x26
    request_id: int = 0
    accepted: bool = False
    local: tuple = ("0.0.0.0", 0)
    nat: NatInfo = NatInfo()
    padding: int = 16
    candidates: tuple = ()  # as in L{ConnectRequest}

    def encode_body(self):
        return (struct.pack("!QB", self.request_id, int(self.accepted))
                + pack_addr(*self.local) + self.nat.encode()
                + _pack_candidates(self.candidates) + bytes(self.padding))

    @classmethod
    def decode_body(cls, body):
        (rid, accepted), end = unpack_head("!QB", body, "answer")
        local, end = unpack_addr(body, end)
        nat, end = NatInfo.decode(body, end)
        candidates, end = _candidates(body, end)
        return cls(rid, bool(accepted), local, nat, zero_padding(body, end, "answer"),
                   candidates)


@register
@dataclass
class Introduce(_Introduction):
    """
    Lobby to A (to A's fresh mapping, the source of its request): B's
    answer, B's observed fresh address Q+d, and the session.
    """

    TYPE = 0x27


@register
@dataclass
class AnswerAck(Message):
    """Lobby to B: your answer arrived (from this observed address)."""

    TYPE = 0x28
    request_id: int = 0
    observed: tuple = ("0.0.0.0", 0)

    def encode_body(self):
        return struct.pack("!Q", self.request_id) + pack_addr(*self.observed)

    @classmethod
    def decode_body(cls, body):
        (rid,), observed = unpack_head_addr("!Q", body, "answer ack")
        return cls(rid, observed)


#: A L{Refusal}'s code when the sender is not logged in (L{REFUSALS}).
NOT_LOGGED_IN = 5
#: Reasons of a L{Refusal}.
REFUSALS = {1: "no such client", 2: "peer offline", 3: "refused by the peer",
            4: "too many requests", 5: "not logged in", 6: "lobby cluster unavailable"}


@register
@dataclass
class Refusal(Message):
    """Lobby to a client: your request C{request_id} failed (C{code} in L{REFUSALS})."""

    TYPE = 0x29
    request_id: int = 0
    code: int = 0

    def encode_body(self):
        return struct.pack("!QB", self.request_id, self.code)

    @classmethod
    def decode_body(cls, body):
        return cls(*unpack_tail("!QB", body, 0, "refusal"))


#: First body byte of a L{RelayBind} that carries a proof (a plain one is
#: all zero padding).
_PROVEN = 0x01


@register
@dataclass
class RelayBind(Message):
    """
    A peer to the lobby, key ID ``SESSION.ROLE``: relay this session's
    datagrams to me at this (observed) address.  Sent from the socket of
    the peer's L{ConnectRequest} or L{Answer}: the lobby binds a role only
    to the fresh mapping it observed for that role.  Answered by
    L{RelayBound}.

    To a relay on another lobby node than the peer's own (an
    introduction's C{relay}), which never observed the peer's fresh
    mapping, the bind carries C{proof} instead (L{bind_proof}): the body is
    then L{_PROVEN}, the 16-byte proof, and the padding; without a proof
    it is the zero padding it always was.
    """

    TYPE = 0x2A
    padding: int = 8
    proof: bytes = b""

    def encode_body(self):
        if not self.proof:
            return bytes(self.padding)
        if len(self.proof) != BIND_SECRET_LEN:
            raise WireError("bad-body", "bind proof of the wrong length")
        return bytes([_PROVEN]) + self.proof + bytes(self.padding)

    @classmethod
    def decode_body(cls, body):
        if not body or body[0] == 0:
            return cls(padding=zero_padding(body, 0, "relay bind"))
        if body[0] != _PROVEN or len(body) < 1 + BIND_SECRET_LEN:
            raise WireError("bad-body", "relay bind proof")
        end = 1 + BIND_SECRET_LEN
        return cls(zero_padding(body, end, "relay bind"), bytes(body[1:end]))


@register
@dataclass
class RelayBound(Message):
    """Lobby to a peer: relaying; C{ready} once both peers are bound."""

    TYPE = 0x2B
    ready: bool = False

    def encode_body(self):
        return bytes([int(self.ready)])

    @classmethod
    def decode_body(cls, body):
        (ready,) = unpack_tail("!B", body, 0, "relay bound")
        return cls(bool(ready))


# -- path ---------------------------------------------------------------------

@register
@dataclass
class Probe(Message):
    """
    A punch probe, peer to peer (key ID ``SESSION.ROLE``).  Answered by a
    L{ProbeAck} from the socket it reached.
    """

    TYPE = 0x30
    round: int = 0
    index: int = 0
    padding: int = 24

    def encode_body(self):
        return struct.pack("!HH", self.round, self.index) + bytes(self.padding)

    @classmethod
    def decode_body(cls, body):
        (rnd, index), end = unpack_head("!HH", body, "probe")
        return cls(rnd, index, zero_padding(body, end, "probe"))


@register
@dataclass
class ProbeAck(Message):
    """Answer to a L{Probe}: its round and index, and its source as seen here."""

    TYPE = 0x31
    round: int = 0
    index: int = 0
    observed: tuple = ("0.0.0.0", 0)

    def encode_body(self):
        return struct.pack("!HH", self.round, self.index) + pack_addr(*self.observed)

    @classmethod
    def decode_body(cls, body):
        (rnd, index), observed = unpack_head_addr("!HH", body, "probe ack")
        return cls(rnd, index, observed)


@register
@dataclass
class Data(Message):
    """An application datagram on a path (direct, or relayed by the lobby)."""

    TYPE = 0x32
    payload: bytes = b""

    def encode_body(self):
        return self.payload

    @classmethod
    def decode_body(cls, body):
        return cls(bytes(body))


@register
@dataclass
class PathKeepalive(Message):
    """Keeps a direct path's NAT mappings open; answered by nothing."""

    TYPE = 0x33


@register
@dataclass
class PathClose(Message):
    """The sender closed the path."""

    TYPE = 0x34


#: Largest application payload in one L{Data} frame.
MAX_PAYLOAD = wire.MAX_DATAGRAM - wire.MIN_FRAME - 2 * wire.MAX_KEY_ID
