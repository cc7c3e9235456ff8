"""
Fuzz targets for every parser that reads bytes from the network: the
control wire format and its P2P messages, STUN, the tunnel's hello, frames
and ALPN names, the relay terminal's HTTP head, cookie tokens and
connection, and the relay's and the lobby's UDP sockets fed arbitrary
datagrams.

Each target is a L{Target}: a hypothesis strategy and a check that raises
AssertionError (or lets an unexpected exception through) when a property
fails.  The property is always at least "nothing but the parser's own
error escapes"; where the code promises more (a round trip, a size bound,
split-invariance, no answer to a forgery) the check asserts that too.

Here the targets run with a fixed, small budget and derandomized, so that
CI tries the same inputs every time; C{scripts/fuzz} runs the same targets
for longer with random seeds.

Every failing example found so far is kept as an explicit C{@example}.
"""

import base64
import binascii
import gc
import hashlib
import ipaddress
import struct
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import crypto
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.deployment import pki
from p2pnat.deployment.registry import Registry
from p2pnat.lobby.server import ByteBudget, Lobby, Session
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import p2p, stun, tunnel, wire
from p2pnat.protocol.stun import Attr, MessageClass, StunError
from p2pnat.relay.core import Relay, synchronous
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.notify import NotifyHandler
from p2pnat.relay.terminal import BadRequest, Terminal, Tokens, parse_head
from p2pnat.relay.tunnel import RelayTunnel
from tests.support.udp import FakeUDPTransport
from tests.unit.test_relay_terminal import FakeSocket, Transport

#: The CI budget: deterministic, and small enough for the whole module to
#: take well under 30 seconds on a shared 2-core machine.
CI = settings(max_examples=100, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)


@dataclass(frozen=True)
class Target:
    """
    One fuzz target: C{check(value)} for every C{value} C{strategy} draws.

    @ivar examples: values always tried first (regressions).
    @ivar budget: examples per CI run (scaled by scripts/fuzz).
    """

    name: str
    strategy: st.SearchStrategy
    check: object
    examples: tuple = ()
    budget: int = 100


def ci_test(target):
    """A test method running C{target} with the CI budget and its examples."""

    def test(self, value):
        target.check(value)

    test.__name__ = test.__qualname__ = "test_" + target.name
    test.__doc__ = target.check.__doc__
    for value in reversed(target.examples):
        test = example(value)(test)
    return settings(CI, max_examples=target.budget)(given(target.strategy)(test))


# -- generic byte strategies ----------------------------------------------------

@st.composite
def mutated(draw, base):
    """
    Bytes from C{base} (a strategy) with a few random edits: byte
    overwrites, bit flips, truncation, insertion and extension.  Valid
    inputs slightly broken find far more than random bytes do.
    """
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "flip", "cut", "insert", "extend"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


def maybe_mutated(base):
    """C{base} as it is, or slightly broken."""
    return st.one_of(base, mutated(base))


ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2 ** 32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2 ** 128 - 1))
ports = st.integers(0, 65535)
addresses = st.tuples(st.one_of(ipv4, ipv6), ports)
key_ids = st.from_regex(wire._KEY_ID, fullmatch=True)


# -- the control wire format and its messages (p2pnat.protocol.wire, p2p) ----------

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
_HEAD = struct.Struct("!BBBBQB")


def frame_bytes(mtype, key_id, body, key, timestamp, flags=0):
    """A frame with any type and body, MAC'd with C{key} (wire.seal checks both)."""
    kid = key_id.encode("ascii")
    signed = (_HEAD.pack(wire.MARKER, wire.VERSION, mtype, flags, timestamp, len(kid)) + kid
              + struct.pack("!H", len(body)) + body)
    return signed + wire.mac(key, signed)


def nat_infos():
    return st.builds(p2p.NatInfo, st.sampled_from(p2p.MAPPINGS), st.sampled_from(p2p.MAPPINGS),
                     st.sampled_from(p2p.ALLOCATIONS), st.integers(-2 ** 15, 2 ** 15 - 1),
                     st.integers(0, 65535).map(lambda r: r / 10))


u64 = st.integers(0, 2 ** 64 - 1)
#: Request IDs: small ones, so that an answer can match its request.
rids = st.one_of(st.integers(0, 3), u64)
#: Peers the lobby's tests know, or any ID.
peers = st.one_of(st.sampled_from(["alice", "bob", "carol"]), key_ids)
u16 = st.integers(0, 65535)
pad = st.integers(0, 48)
b16 = st.binary(min_size=16, max_size=16)

#: A valid instance of every message type of the catalogue, fields drawn at random.
MESSAGE_STRATEGIES = {
    wire.Ping: st.builds(wire.Ping, pad),
    wire.Pong: st.builds(wire.Pong, u64, addresses, u64),
    wire.PeriodRequest: st.builds(wire.PeriodRequest, pad),
    wire.Period: st.builds(wire.Period, st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1),
                           u64, u64),
    wire.NotifyA: st.builds(wire.NotifyA, addresses, pad),
    wire.NotifyB: st.builds(wire.NotifyB, addresses, pad),
    wire.NotifyAck: st.builds(wire.NotifyAck, u64, addresses, st.integers(0, 255)),
    wire.ConnectRequest: st.builds(wire.ConnectRequest, b16, b16, u16,
                                   st.sampled_from(["", "relay.example.org", "198.51.100.1"])),
    p2p.Login: st.builds(p2p.Login, addresses, nat_infos(), pad),
    p2p.Welcome: st.builds(p2p.Welcome, u64, addresses, u64, u16),
    p2p.Keepalive: st.builds(p2p.Keepalive, pad),
    p2p.Logout: st.just(p2p.Logout()),
    p2p.ConnectRequest: st.builds(p2p.ConnectRequest, rids, peers, addresses, nat_infos(), pad),
    p2p.Invite: st.builds(p2p.Invite, rids, peers, addresses, addresses, nat_infos(), b16,
                          st.binary(min_size=32, max_size=32), st.booleans()),
    p2p.Answer: st.builds(p2p.Answer, rids, st.booleans(), addresses, nat_infos(), pad),
    p2p.Introduce: st.builds(p2p.Introduce, rids, peers, addresses, addresses, nat_infos(), b16,
                             st.binary(min_size=32, max_size=32), st.booleans()),
    p2p.AnswerAck: st.builds(p2p.AnswerAck, u64, addresses),
    p2p.Refusal: st.builds(p2p.Refusal, u64, st.integers(0, 255)),
    p2p.RelayBind: st.builds(p2p.RelayBind, pad),
    p2p.RelayBound: st.builds(p2p.RelayBound, st.booleans()),
    p2p.Probe: st.builds(p2p.Probe, u16, u16, pad),
    p2p.ProbeAck: st.builds(p2p.ProbeAck, u16, u16, addresses),
    p2p.Data: st.builds(p2p.Data, st.binary(max_size=64)),
    p2p.PathKeepalive: st.just(p2p.PathKeepalive()),
    p2p.PathClose: st.just(p2p.PathClose()),
}


def typed_bodies_of(types):
    """
    ``(type byte, body)`` for the message types C{types}: bodies of valid
    messages, broken ones and random bytes.
    """
    classes = sorted((c for c in MESSAGE_STRATEGIES if c.TYPE in types), key=lambda c: c.TYPE)
    return st.one_of(
        st.sampled_from(classes).flatmap(
            lambda cls: st.tuples(st.just(cls.TYPE),
                                  maybe_mutated(MESSAGE_STRATEGIES[cls].map(
                                      lambda m: m.encode_body())))),
        st.tuples(st.sampled_from(sorted(types)), st.binary(max_size=80)),
    )


typed_bodies = typed_bodies_of(frozenset(wire.MESSAGES))

valid_frames = st.builds(
    lambda tb, kid, ts, flags: frame_bytes(tb[0], kid, tb[1], KEY, ts, flags),
    typed_bodies, key_ids, u64, st.integers(0, 255))

wire_datagrams = st.one_of(st.binary(max_size=120), maybe_mutated(valid_frames),
                           st.binary(min_size=1300, max_size=1300))


def check_wire_parse(data):
    """wire.parse raises only WireError; a frame it returns is the datagram, split."""
    try:
        frame = wire.parse(data)
    except wire.WireError as e:
        assert e.reason in {"truncated", "oversized", "bad-marker", "bad-version", "bad-type",
                            "bad-length", "bad-key-id"}, e.reason
        return
    assert len(data) <= wire.MAX_DATAGRAM
    assert frame.signed + frame.mac == data
    assert len(frame.mac) == wire.MAC_LEN
    assert frame.type in wire.MESSAGES
    assert wire.valid_key_id(frame.key_id)
    assert frame.signed.endswith(frame.body)


def _unseal(data):
    try:
        return wire.unseal(data, lambda key_id, mtype: KEY)
    except wire.WireError as e:
        assert e.reason in {"truncated", "oversized", "bad-marker", "bad-version", "bad-type",
                            "bad-length", "bad-key-id", "bad-mac", "bad-body"}, e.reason
        return None, None


def check_wire_unseal(data):
    """
    wire.unseal (parse, MAC, every message type's decode_body) raises only
    WireError, whatever the body under a valid MAC.
    """
    frame, message = _unseal(data)
    if message is not None:
        assert type(message) is wire.MESSAGES[frame.type]
    # The MAC is checked: under another key the same bytes are refused.
    if frame is not None:
        try:
            wire.unseal(data, lambda key_id, mtype: OTHER_KEY)
        except wire.WireError as e:
            assert e.reason == "bad-mac"
        else:
            raise AssertionError("a frame opened under the wrong key")


def check_wire_round_trip(typed_body):
    """
    A body that decodes re-encodes to a body that decodes to the same
    message: what a peer accepts, we can say back (and seal) unchanged.
    """
    mtype, body = typed_body
    cls = wire.MESSAGES[mtype]
    try:
        message = cls.decode_body(body)
    except wire.WireError:
        return
    again = cls.decode_body(message.encode_body())
    assert again == message, (again, message)
    wire.seal(message, "k", KEY, 1)


def check_session_key_id(key_id):
    """p2p.parse_session_key_id never raises and round-trips session_key_id."""
    parsed = p2p.parse_session_key_id(key_id)
    if parsed is not None:
        sid, role = parsed
        assert len(sid) == p2p.SESSION_ID_LEN and role in ("a", "b")
        assert p2p.session_key_id(sid, role).lower() == key_id.lower()


session_key_ids = st.one_of(
    key_ids, st.builds(p2p.session_key_id, b16, st.sampled_from("ab")),
    st.builds(lambda h, r: h + "." + r, st.text("0123456789abcdefABCDEFgx", min_size=30,
                                                 max_size=34), st.sampled_from("abc")))

WIRE_PARSE = Target("wire_parse", wire_datagrams, check_wire_parse, budget=200)
WIRE_UNSEAL = Target("wire_unseal", maybe_mutated(valid_frames), check_wire_unseal, budget=250)
WIRE_ROUND_TRIP = Target(
    "wire_round_trip", typed_bodies, check_wire_round_trip, budget=250,
    examples=(
        # ConnectRequest naming the tunnel host "a..b": decode accepts any
        # ASCII, encode (IDNA) raises UnicodeError on the empty label.
        (0x15, bytes(32) + b"\x00\x01\x04a..b"),
        # ... and a 254-byte host: decode accepts it, encode refuses it.
        (0x15, bytes(32) + b"\x00\x01\xfe" + b"a" * 254),
    ))
SESSION_KEY_ID = Target("session_key_id", session_key_ids, check_session_key_id)


class WireFuzzTests(SynchronousTestCase):
    """The control frame and every message body, P2P ones included."""

    test_wire_parse = ci_test(WIRE_PARSE)
    test_wire_unseal = ci_test(WIRE_UNSEAL)
    test_session_key_id = ci_test(SESSION_KEY_ID)


class WireRoundTripTests(SynchronousTestCase):
    """
    Every message body that decodes encodes back to the same bytes.  A
    regression test: L{wire.ConnectRequest.decode_body} accepted tunnel
    hosts its encode_body cannot write (an empty IDNA label, more than 253
    bytes).
    """

    test_wire_round_trip = ci_test(WIRE_ROUND_TRIP)


# -- STUN (p2pnat.protocol.stun) -----------------------------------------------------

_ADDRESS_TYPES = sorted(stun._ADDRESS_ATTRS)
attr_types = st.one_of(st.sampled_from(list(Attr)), st.integers(0, 0xFFFF))


def _address_value(family_port_ip):
    family, port, ip = family_port_ip
    return bytes([0, family]) + struct.pack("!H", port) + ip


attr_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([4, 8, 20, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.tuples(st.sampled_from([1, 2, 0, 3]), ports,
              st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
              ).map(_address_value),
    st.text(max_size=20).map(lambda t: t.encode("utf-8")),
)


@st.composite
def stun_datagrams(draw):
    """
    STUN-shaped datagrams: a header (with the magic cookie or RFC 3489's
    16-byte id), attributes of known and unknown types with values of the
    sizes that matter, optional MESSAGE-INTEGRITY(-SHA256) and a correct
    FINGERPRINT; sometimes a wrong length or padding.
    """
    classic = draw(st.integers(0, 3)) == 0
    mtype = draw(st.one_of(st.sampled_from(sorted(stun._CLASSIC_TYPES | {0x0011, 0x0012})),
                           st.integers(0, 0x3FFF)))
    txid = draw(st.binary(min_size=16, max_size=16) if classic
                else st.binary(min_size=12, max_size=12))
    body = bytearray()
    for atype, value in draw(st.lists(st.tuples(attr_types, attr_values), max_size=5)):
        body += struct.pack("!HH", atype, len(value)) + value
        padding = (-len(value)) % 4
        body += draw(st.sampled_from([bytes(padding), b"\xff" * padding]))
    for atype, size in draw(st.lists(st.sampled_from([(Attr.MESSAGE_INTEGRITY, 20),
                                                      (Attr.MESSAGE_INTEGRITY_SHA256, 32),
                                                      (Attr.MESSAGE_INTEGRITY_SHA256, 16)]),
                                     max_size=2)):
        body += struct.pack("!HH", atype, size) + draw(st.binary(min_size=size, max_size=size))
    head = struct.pack("!H", mtype) + (b"" if classic else stun._COOKIE_BYTES) + txid
    if draw(st.booleans()):
        length = len(body) + 8
        crc = binascii.crc32(head[:2] + struct.pack("!H", length) + head[2:] + body)
        body += struct.pack("!HHI", Attr.FINGERPRINT, 4, crc ^ stun.FINGERPRINT_XOR)
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
    return head[:2] + struct.pack("!H", length) + head[2:] + bytes(body)


stun_inputs = st.one_of(maybe_mutated(stun_datagrams()), st.binary(max_size=60),
                        st.binary(max_size=60).map(lambda b: b"\x00\x01" + b))


def _stun(call, *args):
    """C{call(*args)}, or None if it raised StunError (with a reason of stun.REASONS)."""
    try:
        return call(*args)
    except StunError as e:
        assert e.reason in stun.REASONS, e.reason
        return None


def check_stun_parse(data):
    """
    stun.parse_message raises only StunError (with a reason from
    stun.REASONS); every attribute decoder, the integrity checks and
    SASLprep on what it returns raise only StunError too.
    """
    msg = _stun(stun.parse_message, data)
    if msg is None:
        return
    assert msg.raw == bytes(data)
    assert len(msg.transaction_id) in (12, 16)
    assert isinstance(msg.msg_class, MessageClass)
    assert isinstance(stun.verify_integrity(msg, KEY), bool)
    assert isinstance(stun.verify_integrity_sha256(msg, KEY), bool)
    decoders = {t: stun.decode_address for t in _ADDRESS_TYPES}
    decoders.update({
        Attr.XOR_MAPPED_ADDRESS: lambda v: stun.decode_xor_address(v, msg.xor_key),
        Attr.ERROR_CODE: stun.decode_error_code,
        Attr.UNKNOWN_ATTRIBUTES: stun.decode_unknown_attributes,
        Attr.CHANGE_REQUEST: stun.decode_change_request,
        Attr.RESPONSE_PORT: stun.decode_response_port,
        Attr.USERNAME: lambda v: stun.saslprep(stun.decode_text(v)),
        Attr.PASSWORD: lambda v: stun.short_term_key(stun.decode_text(v)),
        Attr.REALM: lambda v: stun.long_term_key("u", stun.decode_text(v), "p"),
        Attr.NONCE: stun.decode_text,
        Attr.SOFTWARE: stun.decode_text,
    })
    for atype, value in msg.attributes:
        if atype in decoders:
            _stun(decoders[atype], value)


def _mapped(source):
    """The (host, port) a Binding answer must report for C{source}."""
    ip = ipaddress.ip_address(source[0].split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), source[1]


sources = st.one_of(
    st.tuples(ipv4, ports),
    st.tuples(ipv6, ports, st.just(0), st.just(0)),
    st.tuples(ipv4.map(lambda a: "::ffff:" + a), ports, st.just(0), st.just(0)),
    st.tuples(st.just("fe80::1%eth0"), ports, st.just(0), st.just(2)),
)


def check_stun_answer(args):
    """
    stun.answer_binding: None, StunError, or an answer that parses as the
    response to the request's transaction, says the source's address, and
    is at most 24 bytes larger than the request (12 for an IPv4 source):
    the bound the relay's and the lobby's rate limit is sized for.
    """
    data, source = args
    answer = _stun(stun.answer_binding, data, source)
    if answer is None:
        return
    request = stun.parse_message(data)
    host, port = _mapped(source)
    extra = 12 if ipaddress.ip_address(host).version == 4 else 24
    assert len(answer) <= len(data) + extra, (len(answer), len(data))
    msg = stun.parse_message(answer)
    assert msg.transaction_id == request.transaction_id
    assert msg.has_fingerprint == request.has_fingerprint
    try:
        result = stun.parse_binding_response(answer, request.transaction_id)
    except stun.StunErrorResponse as e:
        assert e.code == 420 and e.unknown, e
    else:
        assert result.mapped == (host, port), (result.mapped, source)


def check_stun_response(args):
    """stun.parse_binding_response raises only StunError, and reports a real address."""
    data, txid = args
    result = _stun(stun.parse_binding_response, data, txid)
    if result is None:
        return
    for addr in (result.mapped, result.response_origin, result.other_address):
        if addr is not None:
            ipaddress.ip_address(addr[0])
            assert 0 <= addr[1] <= 65535


def check_saslprep(text):
    """stun.saslprep raises only StunError("bad-credentials"); its result encodes."""
    try:
        out = stun.saslprep(text)
    except StunError as e:
        assert e.reason == "bad-credentials", e.reason
        return
    out.encode("utf-8")


def _binding_request_with_padding(n):
    return stun.binding_request(bytes(12), padding=n, fingerprint=False)[1]


STUN_PARSE = Target("stun_parse", stun_inputs, check_stun_parse, budget=250)
STUN_ANSWER = Target(
    "stun_answer", st.tuples(stun_inputs, sources), check_stun_answer, budget=250,
    examples=(
        # A request at STUN's length limit, nearly all PADDING (larger than
        # UDP carries, but answer_binding takes any bytes): the echoed
        # PADDING plus an IPv6 XOR-MAPPED-ADDRESS made the answer too long
        # to encode, and ValueError escaped answer_binding.
        (_binding_request_with_padding(0xFFFC - 4), ("2001:db8::1", 1, 0, 0)),
    ))
STUN_RESPONSE = Target("stun_response", st.tuples(stun_inputs, st.sampled_from(
    [bytes(12), bytes(16)])), check_stun_response, budget=200)
SASLPREP = Target("saslprep", st.text(max_size=20), check_saslprep)


class StunFuzzTests(SynchronousTestCase):
    """STUN messages, attributes, the Binding server rule and the client side."""

    test_stun_parse = ci_test(STUN_PARSE)
    test_stun_answer = ci_test(STUN_ANSWER)
    test_stun_response = ci_test(STUN_RESPONSE)
    test_saslprep = ci_test(SASLPREP)


# -- the tunnel (p2pnat.protocol.tunnel) ------------------------------------------------

def check_hello(data):
    """tunnel.parse_hello raises only TunnelError; what it accepts, hello() writes."""
    try:
        session_id, nonce = tunnel.parse_hello(data)
    except tunnel.TunnelError:
        return
    assert tunnel.hello(session_id, nonce) == data


hellos = st.one_of(
    maybe_mutated(st.builds(tunnel.hello, b16, b16)),
    st.binary(max_size=50),
)


def _decode(data, cuts):
    """
    Feed C{data} to a FrameDecoder in pieces cut at C{cuts}.

    @return: ``(events, error)``: the frames seen, consecutive DATA pieces
        joined, and the TunnelError raised (or None).
    """
    events = []

    def data_event(piece):
        assert isinstance(piece, (bytes, bytearray, memoryview)), type(piece)
        if events and events[-1][0] == "data":
            events[-1] = ("data", events[-1][1] + bytes(piece))
        else:
            events.append(("data", bytes(piece)))

    def on_open(name):
        assert isinstance(name, str), type(name)
        events.append(("open", name))

    decoder = tunnel.FrameDecoder(on_open, data_event, lambda: events.append(("end",)),
                                  lambda: events.append(("opened",)))
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    try:
        for start, stop in zip(bounds, bounds[1:]):
            decoder.feed(data[start:stop])
    except tunnel.TunnelError as e:
        return events, str(e)
    return events, None


frames_in = st.lists(st.one_of(
    st.tuples(st.just(tunnel.OPEN), st.text(st.characters(max_codepoint=127), max_size=40)),
    st.tuples(st.just(tunnel.DATA), st.binary(max_size=300)),
    st.tuples(st.just(tunnel.END), st.just(b"")),
    st.tuples(st.just(tunnel.OPENED), st.just(b"")),
), max_size=8)


def check_frames(args):
    """
    Frames written with tunnel.frame decode to the same frames, however
    the stream is cut into reads.
    """
    frames, cuts = args
    data = b""
    expected = []
    for ftype, payload in frames:
        if ftype == tunnel.OPEN:
            data += tunnel.frame(ftype, payload.encode("ascii"))
            expected.append(("open", payload))
        elif ftype == tunnel.DATA:
            data += tunnel.frame(ftype, payload)
            if payload:
                if expected and expected[-1][0] == "data":
                    expected[-1] = ("data", expected[-1][1] + payload)
                else:
                    expected.append(("data", payload))
        else:
            data += tunnel.frame(ftype)
            expected.append(("end",) if ftype == tunnel.END else ("opened",))
    assert _decode(data, cuts) == (expected, None)


def check_frame_garbage(args):
    """
    FrameDecoder.feed raises only TunnelError on any bytes, and sees the
    same frames and the same error whether the bytes come in one read or
    in many.
    """
    data, cuts = args
    whole = _decode(data, [])
    assert _decode(data, cuts) == whole


tunnel_streams = st.one_of(
    st.binary(max_size=200),
    maybe_mutated(frames_in.map(lambda fs: b"".join(
        tunnel.frame(t, p.encode("ascii") if isinstance(p, str) else p) for t, p in fs))),
)
cut_points = st.lists(st.integers(0, 400), max_size=6)


def check_alpn(offered):
    """
    tunnel.session_from_alpn returns None or a 16-byte session ID: the one
    alpn_for() wrote into the first name of the list that has its shape.
    """
    found = tunnel.session_from_alpn(offered)
    assert found is None or (isinstance(found, bytes) and len(found) == 16), found
    candidates = [n for n in offered if n.startswith(tunnel.ALPN_PREFIX)
                  and len(n) == len(tunnel.ALPN_PREFIX) + 32]
    if candidates:
        first = candidates[0][len(tunnel.ALPN_PREFIX):]
        if all(c in b"0123456789abcdefABCDEF" for c in first):
            assert found == bytes.fromhex(first.decode("ascii"))
        else:
            assert found is None


alpn_names = st.one_of(
    st.builds(tunnel.alpn_for, b16),
    maybe_mutated(st.builds(tunnel.alpn_for, b16)),
    st.binary(min_size=32, max_size=32).map(lambda b: tunnel.ALPN_PREFIX + b),
    st.text("0123456789abcdefABCDEF \t\n\x0b\x0c\r", min_size=32, max_size=32).map(
        lambda t: tunnel.ALPN_PREFIX + t.encode("ascii")),
    st.sampled_from([b"http/1.1", b"h2", b""]),
)

HELLO = Target("hello", hellos, check_hello)
FRAMES = Target("frames", st.tuples(frames_in, cut_points), check_frames, budget=200)
FRAME_GARBAGE = Target("frame_garbage", st.tuples(tunnel_streams, cut_points),
                       check_frame_garbage, budget=200)
ALPN = Target(
    "alpn", st.lists(alpn_names, max_size=4), check_alpn, budget=200,
    examples=(
        # bytes.fromhex skips whitespace: 32 spaces named a 0-byte session.
        [tunnel.ALPN_PREFIX + b" " * 32],
        [tunnel.ALPN_PREFIX + b"00 " * 10 + b"00"],
    ))


class TunnelFuzzTests(SynchronousTestCase):
    """The tunnel's hello, its frame decoder and the session named in ALPN."""

    test_hello = ci_test(HELLO)
    test_frames = ci_test(FRAMES)
    test_frame_garbage = ci_test(FRAME_GARBAGE)
    test_alpn = ci_test(ALPN)


# -- UDP sockets of the relay and the lobby, fed arbitrary datagrams ------------------

@dataclass(frozen=True)
class ToSeal:
    """
    A frame the harness seals when it sends it, stamped on the daemon's
    clock as a live peer would (a fixed timestamp would mostly be refused
    as a replay or stale, and the handlers behind never reached).
    """

    type: int
    key_id: str
    body: bytes
    wrong_key: bool = False


@dataclass
class Sent:
    datagram: bytes
    source: tuple
    authentic: bool  # passes the MAC under the key its key ID names
    exempt: bool  # of a type answered whatever its timestamp's age (PROBE)


class UdpHarness:
    """
    A daemon's L{ControlProtocol} on a fake transport, and the properties
    every datagram must keep: nothing escapes or reaches the catch-all
    ("internal-error"); nothing but a STUN answer goes back for a datagram
    that is not authentic; what goes back to the source of a datagram an
    attacker could replay is never larger than it (STUN answers: at most 24
    bytes larger, rate-limited); every frame sent parses.
    """

    ADDR = ("198.18.0.1", 7478)

    def __init__(self, handler, clock, metrics, keys):
        self.clock = clock
        self.metrics = metrics
        self.keys = keys  # key ID -> key, as the daemon knows them
        self.proto = ControlProtocol(handler, clock, metrics, wire.ReplayGuard(clock),
                                     stamper=wire.Stamper(clock))
        self.proto.makeConnection(FakeUDPTransport(None, *self.ADDR))
        self.handler = handler
        self.peer_stamper = wire.Stamper(clock)

    def classify(self, data, source):
        authentic = exempt = False
        try:
            frame = wire.parse(data)
        except wire.WireError:
            frame = None
        if frame is not None:
            key = self.handler.key_for(frame.key_id, frame.type)
            if key is not None:
                try:
                    frame.open(key)
                    authentic = True
                except wire.WireError:
                    pass
            exempt = wire.MESSAGES[frame.type].PROBE
        return Sent(data, source, authentic, exempt)

    def feed(self, data, source):
        if isinstance(data, ToSeal):
            key = OTHER_KEY if data.wrong_key else self.keys[data.key_id]
            data = frame_bytes(data.type, data.key_id, data.body, key, self.peer_stamper())
        sent = self.classify(data, source)
        written = self.proto.transport.written
        before = len(written)
        self.proto.datagramReceived(data, source)
        assert self.metrics.value("p2pnat_udp_dropped_total", reason="internal-error") == 0, \
            "a handler raised"
        for out, to in written[before:]:
            if out[:1] and out[0] < 4:
                assert to == source
                assert len(out) <= len(data) + 24, ("STUN answer", len(out), len(data))
                stun.parse_message(out)
                continue
            frame = wire.parse(out)
            key = self.keys.get(frame.key_id)
            assert key is not None, frame.key_id
            frame.open(key)
            if to != source:
                continue
            assert sent.authentic, ("answered a forgery", out, data)
            if sent.exempt:
                assert len(out) <= len(data), ("amplified", len(out), len(data))


def _to_seal(keys, kinds):
    """L{ToSeal} frames under the daemon's keys (or a wrong one), bodies of any shape."""
    return st.builds(
        lambda kid, tb, wrong: ToSeal(tb[0], kid, tb[1], wrong),
        st.sampled_from(sorted(keys)),
        st.one_of(typed_bodies_of(kinds), typed_bodies_of(kinds), typed_bodies),
        st.integers(0, 9).map(lambda n: n == 0))


def _sealed(keys, kinds):
    """Sealed frames with timestamps of any age."""
    key_ids = st.sampled_from(sorted(keys))
    return st.builds(
        lambda kid, tb, ts_offset, wrong: frame_bytes(
            tb[0], kid, tb[1], OTHER_KEY if wrong else keys[kid],
            int((1_700_000_000 + ts_offset) * 1e6)),
        key_ids,
        st.one_of(typed_bodies_of(kinds), typed_bodies),
        st.one_of(st.floats(-2, 2), st.floats(-200, 200)),
        st.integers(0, 9).map(lambda n: n == 0))


V4_SOURCES = [("203.0.113.5", 40000), ("203.0.113.5", 40001)]
#: Twisted gives an IPv6 datagram's source as (host, port, flow info, scope ID).
V6_SOURCE = ("2001:db8::5", 40000, 0, 0)


def udp_rounds(keys, kinds, sources):
    """Up to 6 datagrams, from C{sources}, with some seconds between them."""
    # Mostly frames the daemon can open, so that its handlers are reached.
    kinds_of_datagram = [_to_seal(keys, kinds)] * 10 + [
        maybe_mutated(_sealed(keys, kinds))] * 2 + [stun_inputs, st.binary(max_size=80),
                                                    st.just(b"")]
    datagram = st.integers(0, len(kinds_of_datagram) - 1).flatmap(
        kinds_of_datagram.__getitem__)
    return st.lists(st.tuples(datagram, st.sampled_from(sources),
                              st.sampled_from([0, 0, 0.5, 20])),
                    min_size=1, max_size=8)


def _ping_from_v6(key_id):
    """A genuine Ping (default padding) from an IPv6 source: its Pong crashed."""
    return [(ToSeal(wire.Ping.TYPE, key_id, wire.Ping().encode_body()), V6_SOURCE, 0)]


RELAY_KEYS = {"dev-1": KEY, "dev-2": bytes(32)}


def check_relay_udp(rounds):
    """The relay's notify socket keeps the L{UdpHarness} properties."""
    clock = Clock()
    clock.advance(1_700_000_000)
    table = DeviceTable(300)
    table.put(DeviceState("dev-1", KEY))
    table.put(DeviceState("dev-2", bytes(32), revoked=True))
    metrics = Metrics("relay")
    h = UdpHarness(NotifyHandler(table, clock, metrics), clock, metrics, RELAY_KEYS)
    for data, source, wait in rounds:
        clock.advance(wait)
        h.feed(data, source)


SID = bytes(range(16))
LOBBY_KEYS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32,
              p2p.session_key_id(SID, "a"): bytes([9]) * 32,
              p2p.session_key_id(SID, "b"): bytes([9]) * 32}


def check_lobby_udp(rounds):
    """
    The lobby's socket keeps the L{UdpHarness} properties, with two
    clients and one introduced session whose peers may bind and relay.
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = Metrics("lobby")
    clients = {k: v for k, v in LOBBY_KEYS.items() if "." not in k}
    lobby = Lobby(clients.get, clock, metrics, keepalive=20, relay_rate=2000)
    # Each role may bind only from the fresh mapping the lobby observed for it.
    lobby.sessions[SID] = Session(SID, bytes([9]) * 32, "alice", "bob", clock.seconds(),
                                  ByteBudget(clock, 2000),
                                  {"a": V4_SOURCES[0], "b": V4_SOURCES[1]})
    h = UdpHarness(lobby, clock, metrics, LOBBY_KEYS)
    for data, source, wait in rounds:
        clock.advance(wait)
        h.feed(data, source)


_RELAY_KINDS = frozenset({wire.Ping.TYPE, wire.PeriodRequest.TYPE, wire.NotifyA.TYPE,
                          wire.NotifyB.TYPE})
_LOBBY_KINDS = frozenset(Lobby._FROM_CLIENTS | Lobby._FROM_PEERS)
RELAY_UDP = Target("relay_udp", udp_rounds(RELAY_KEYS, _RELAY_KINDS, V4_SOURCES),
                   check_relay_udp, budget=120)
LOBBY_UDP = Target("lobby_udp", udp_rounds(LOBBY_KEYS, _LOBBY_KINDS, V4_SOURCES),
                   check_lobby_udp, budget=150)
RELAY_UDP6 = Target("relay_udp6", udp_rounds(RELAY_KEYS, _RELAY_KINDS, V4_SOURCES + [V6_SOURCE]),
                    check_relay_udp, budget=120, examples=(_ping_from_v6("dev-1"),))
LOBBY_UDP6 = Target("lobby_udp6", udp_rounds(LOBBY_KEYS, _LOBBY_KINDS, V4_SOURCES + [V6_SOURCE]),
                    check_lobby_udp, budget=150,
                    examples=(_ping_from_v6("alice"),))


class DatagramFuzzTests(SynchronousTestCase):
    """
    The relay's and the lobby's UDP sockets, from IPv4 sources: drop what
    is malformed, never raise (L{DatagramIPv6Tests} adds IPv6).
    """

    test_relay_udp = ci_test(RELAY_UDP)
    test_lobby_udp = ci_test(LOBBY_UDP)


class DatagramIPv6Tests(SynchronousTestCase):
    """
    The same from IPv6 sources.  A regression test: Twisted gives an IPv6
    source as a 4-tuple (host, port, flow info, scope ID) and the handlers
    put it as it was in Pong, NotifyAck, Welcome, AnswerAck...: wire.pack_addr
    got 4 arguments, TypeError, and ControlProtocol dropped the datagram as
    "internal-error" with a traceback in the log, so every genuine request
    from an IPv6 device or client went unanswered.  ControlProtocol now
    hands the handlers (host, port).
    """

    test_relay_udp6 = ci_test(RELAY_UDP6)
    test_lobby_udp6 = ci_test(LOBBY_UDP6)


# -- the relay's terminal side (p2pnat.relay.terminal) --------------------------------

latin1 = st.characters(max_codepoint=255)
header_text = st.text(st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=40)


@st.composite
def http_heads(draw):
    """Request heads shaped like what browsers and `p2pnat forward` send, or almost."""
    method = draw(st.sampled_from(["GET", "POST", "CONNECT", "HEAD", "get", "G T", ""]))
    if method == "CONNECT":
        target = draw(st.sampled_from(["cam", "safe", "nope", "bad_$", ""])) + draw(
            st.sampled_from(["", ":", ":ssh", ":\xe9", ":" + "s" * 300])) \
            if draw(st.booleans()) else draw(header_text)
    else:
        target = draw(st.one_of(st.sampled_from(
            ["/", "/connect?ID=cam", "/connect?id=safe", "/connect?ID=%00", "/.p2pnat/login",
             "/x?y=1", "//evil", "*"]), header_text))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x"]))
    lines = [f"{method} {target} {version}"]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["Host", "Cookie", "Authorization", "Proxy-Authorization",
                                     "Content-Length", "X", "Bad Name", ""]))
        value = draw(st.one_of(
            st.sampled_from(["cam.relay.test", "safe.relay.test", "relay.test", "RELAY.TEST:8443",
                             "[::1]:80", "[::1", "a.relay.test.relay.test", "p2pnat_auth=",
                             "Basic " + base64.b64encode(b":open sesame").decode(),
                             "Basic " + base64.b64encode(b":\xff").decode(), "Basic !!",
                             "Bearer open sesame", "Bearer ", "5", "-1", "99999", "\xb2"]),
            header_text))
        lines.append(f"{name}:{draw(st.sampled_from([' ', '', '  ']))}{value}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1")


head_bytes = st.one_of(http_heads(), maybe_mutated(http_heads()), st.binary(max_size=60))


def check_parse_head(data):
    """
    parse_head raises only BadRequest (with a status the relay can
    answer); the Request it returns answers .host and .cookie() with text.
    """
    try:
        req = parse_head(data)
    except BadRequest as e:
        assert e.status in (400, 431), e.status
        return
    assert req.head_size == len(data)
    assert isinstance(req.host, str)
    for name in ("p2pnat_auth", "", "x"):
        value = req.cookie(name)
        assert value is None or isinstance(value, str)


token_texts = st.one_of(
    st.text(max_size=30),
    st.text("0123456789.", max_size=30),
    st.builds(lambda digits, rest: digits + rest, st.text("0123456789\xb2\u0663", max_size=12),
              st.text(max_size=30)),
)


def check_tokens(args):
    """
    Tokens.check answers True or False for any cookie value, never raises,
    and accepts exactly the tokens made for that device and credential.
    """
    token, device_id = args
    clock = Clock()
    clock.advance(1_700_000_000)
    tokens = Tokens(b"s" * 32, clock)
    assert tokens.check(token, device_id, "hash") in (True, False)
    good = tokens.make(device_id, "hash")
    assert tokens.check(good, device_id, "hash") is True
    assert tokens.check(good, device_id + "x", "hash") is False
    assert tokens.check(good, device_id, "other") is False
    if token != good:
        assert tokens.check(token, device_id, "hash") is False


_CA = pki.create_ca("fuzz CA")
_CERT = pki.issue_device_cert(*_CA, "cam")[0]
_CERT_X509 = crypto.load_certificate(crypto.FILETYPE_PEM, pki.cert_pem(_CERT))
#: A credential hash with scrypt's cheapest parameters, so that each
#: example checks one in microseconds instead of 50 ms.
_CHEAP_HASH = "scrypt$n=2,r=1,p=1${}${}".format(
    base64.b64encode(bytes(16)).decode().rstrip("="),
    base64.b64encode(hashlib.scrypt(b"open sesame", salt=bytes(16), n=2, r=1, p=1,
                                    dklen=32)).decode().rstrip("="))


class TerminalWorld:
    """
    A relay with three devices: C{cam} (online, with an idle tunnel),
    C{safe} (online, access mode "relay", credential "open sesame") and
    C{gone} (revoked).  The registry is made once per process (it is only
    read); the relay and its tables once per example.
    """

    _shared = None

    @classmethod
    def shared(cls):
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self):
        self.registry = Registry(":memory:")
        fp = pki.fingerprint(_CERT)
        self.records = {
            "cam": self.registry.add_device("cam", KEY, fp, "device", None),
            "safe": replace(self.registry.add_device("safe", KEY, "ab" * 32, "device", None),
                            access_mode="relay", access_credential_hash=_CHEAP_HASH),
            "gone": self.registry.add_device("gone", KEY, "cd" * 32, "device", None),
        }

    def relay(self):
        clock = Clock()
        clock.advance(1_700_000_000)
        table = DeviceTable(300)
        socket = FakeSocket(clock)
        for device_id, rec in self.records.items():
            table.put(DeviceState(device_id, KEY, device_id == "gone", None, None,
                                  rec.access_mode, rec))
            table.notify_a(device_id, ("203.0.113.5", 40000), ("192.168.1.2", 1), socket,
                           clock.seconds())
        relay = Relay(clock, Metrics("relay"), table, self.registry, Tokens(b"s" * 32, clock),
                      hostname="relay.test", tunnel_port=7443, https_port=8443,
                      run_blocking=synchronous)
        # An idle tunnel of cam's, as a previous stream leaves it.
        t = Terminal(relay, True)
        t.makeConnection(Transport())
        t.dataReceived(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        tun = RelayTunnel(relay)
        tun.makeConnection(Transport(_CERT_X509))
        request = wire.unseal(socket.sent[-1][0], lambda key_id, ts: KEY)[1]
        tun.dataReceived(tunnel.hello(request.session_id, request.nonce))
        tun.dataReceived(tunnel.frame(tunnel.OPENED) + tunnel.frame(tunnel.END))
        assert tun.state == "idle", tun.state
        tun.transport.clear()
        return relay, clock, tun


def check_terminal(args):
    """
    A terminal connection sending C{data} (then C{body}) gets either a
    complete relay page (a status line and well-formed header lines) or its
    stream: then the tunnel carries an OPEN the device can decode, naming
    the service asked for.  Nothing raises, nothing is logged as a failure.
    """
    data, body = args
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    try:
        relay, clock, tun = TerminalWorld.shared().relay()
        term = Terminal(relay, True)
        term.makeConnection(Transport())
        term.dataReceived(data)
        if body:
            term.dataReceived(body)
        clock.advance(0.1)
        # An error left in a Deferred is logged when the Deferred is
        # collected: collect now, so that it fails this example.
        del relay, clock
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [f.getTraceback() for f in failures]
    out = term.transport.value()
    if term.state == "done":
        head, sep, _ = out.partition(b"\r\n\r\n")
        assert sep, out
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 ") and lines[0][9:12].isdigit(), lines[0]
        for line in lines[1:]:
            assert b"\r" not in line and b"\n" not in line and b": " in line, line
    elif term.state == "stream" and tun.terminal is term:
        events, error = _decode(tun.transport.value(), [])
        assert error is None, error
        assert events and events[0][0] == "open", events
        req = parse_head(data[:data.find(b"\r\n\r\n") + 4])
        service = req.target.partition(":")[2] if req.method == "CONNECT" else ""
        assert events[0][1] == service, (events[0], req.target)
    else:
        assert term.state in ("head", "body", "auth", "waiting", "stream"), term.state


TERMINAL = Target(
    "terminal",
    st.tuples(head_bytes, st.one_of(st.just(b""), st.binary(max_size=40), st.just(
        b"credential=open+sesame&next=/a"))),
    check_terminal, budget=100,
    examples=(
        # The service name is encoded as ASCII inside a Deferred's callback:
        # UnicodeEncodeError, unhandled; the terminal hangs in "stream".
        (b"CONNECT cam:\xe9 HTTP/1.1\r\n\r\n", b""),
        # A 300-byte service name makes an OPEN frame the device's decoder
        # refuses (control frames are at most 255 bytes): the tunnel dies.
        (b"CONNECT cam:" + b"s" * 300 + b" HTTP/1.1\r\n\r\n", b""),
    ))
PARSE_HEAD = Target("parse_head", head_bytes, check_parse_head, budget=200)
TOKENS = Target(
    "tokens", st.tuples(token_texts, st.sampled_from(["cam", "safe"])), check_tokens,
    budget=200,
    examples=(
        # compare_digest refuses non-ASCII str: TypeError.
        ("9999999999.\xe9", "cam"),
        # str.isdigit() is true for "²", int() refuses it: ValueError.
        ("\xb2.x", "cam"),
        # int() refuses more than 4300 digits: ValueError.
        ("9" * 5000 + ".x", "cam"),
    ))


class TerminalFuzzTests(SynchronousTestCase):
    """The relay's HTTP head parser."""

    test_parse_head = ci_test(PARSE_HEAD)


class TerminalConnectionTests(SynchronousTestCase):
    """
    Login cookies and whole terminal connections.  Regression tests:
    Tokens.check raised on some cookie values (C{9999999999.\xe9}, an
    expiry of C{\xb2} or of 5 000 digits), and a CONNECT service name that
    is not short ASCII left the terminal in its stream state with no OPEN
    sent (the examples of L{TOKENS} and L{TERMINAL}).
    """

    test_tokens = ci_test(TOKENS)
    test_terminal = ci_test(TERMINAL)


#: Every target, for scripts/fuzz.
TARGETS = (WIRE_PARSE, WIRE_UNSEAL, WIRE_ROUND_TRIP, SESSION_KEY_ID, STUN_PARSE, STUN_ANSWER,
           STUN_RESPONSE, SASLPREP, HELLO, FRAMES, FRAME_GARBAGE, ALPN, RELAY_UDP, LOBBY_UDP,
           RELAY_UDP6, LOBBY_UDP6, PARSE_HEAD, TOKENS, TERMINAL)
