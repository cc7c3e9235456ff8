# -*- test-case-name: tests.unit.test_portmap_codec -*-
"""
NAT-PMP (RFC 6886) and PCP (RFC 6887) messages: pure functions, no sockets,
no clock.

What it promises:

- The ``*_request`` functions build the requests a port-mapping client
  sends to its gateway's port 5351: NAT-PMP external address and UDP/TCP
  map requests, PCP MAP and ANNOUNCE requests.
- :func:`decode_response` reads any datagram from port 5351 (the two
  protocols share it and are told apart by the version byte) and returns a
  :class:`NatPmpResponse` or a :class:`PcpResponse`.  It checks every
  length, the version, the response bit and the option framing, and raises
  :class:`PortmapError` -- and nothing else -- on anything malformed.
  ``PortmapError.reason`` is one short word, meant as a log or metrics label.
- :func:`check_pcp_map` says whether a PCP response answers *our* MAP
  request (nonce, protocol, internal port): a response that does not is
  ignored, as RFC 6887 section 11.3 asks.
- :class:`EpochCheck` is the epoch rule of RFC 6887 section 8.5 (which also
  covers NAT-PMP's "seconds since start of epoch"): it tells when the
  gateway has lost its mappings (a reboot).
- :func:`retransmit_times` is the retransmission schedule, RFC 6886's
  250 ms doubling, cut to a budget.
- :func:`ssdp_search` and :func:`parse_ssdp_response` are the SSDP
  M-SEARCH that finds a UPnP Internet Gateway Device and its answer's
  description URL (UPnP Device Architecture 1.1, section 1.3).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "IGD_TYPES",
    "MAX_PCP_SIZE",
    "NATPMP_RESULTS",
    "NATPMP_VERSION",
    "PCP_RESULTS",
    "PCP_VERSION",
    "PORT",
    "SSDP_GROUP",
    "TRANSPORTS",
    "EpochCheck",
    "NatPmpResponse",
    "PcpResponse",
    "PortmapError",
    "check_pcp_map",
    "decode_response",
    "natpmp_external_request",
    "natpmp_map_request",
    "parse_ssdp_response",
    "pcp_announce_request",
    "pcp_map_request",
    "retransmit_times",
    "ssdp_search",
]

#: The port a NAT-PMP or PCP server listens on, on the client's gateway.
PORT = 5351
NATPMP_VERSION = 0
PCP_VERSION = 2
#: RFC 6887 section 7: no PCP message is larger than this.
MAX_PCP_SIZE = 1100

#: Transport name -> (NAT-PMP opcode, IP protocol number for PCP).
TRANSPORTS = {"udp": (1, 17), "tcp": (2, 6)}
_NATPMP_OPCODES = {op: name for name, (op, _) in TRANSPORTS.items()}
_PCP_PROTOCOLS = {num: name for name, (_, num) in TRANSPORTS.items()}

PCP_OP_ANNOUNCE = 0
PCP_OP_MAP = 1
_PCP_OPCODES = {PCP_OP_ANNOUNCE: "announce", PCP_OP_MAP: "map", 2: "peer"}
_PCP_HEADER = 24
_PCP_MAP_PAYLOAD = 36
NONCE_SIZE = 12

#: RFC 6886 section 3.5 result codes.
NATPMP_RESULTS = {
    0: "success",
    1: "unsupported-version",
    2: "not-authorized",
    3: "network-failure",
    4: "out-of-resources",
    5: "unsupported-opcode",
}

#: RFC 6887 section 7.4 result codes.
PCP_RESULTS = {
    0: "success",
    1: "unsupported-version",
    2: "not-authorized",
    3: "malformed-request",
    4: "unsupported-opcode",
    5: "unsupported-option",
    6: "malformed-option",
    7: "network-failure",
    8: "no-resources",
    9: "unsupported-protocol",
    10: "user-exceeded-quota",
    11: "cannot-provide-external",
    12: "address-mismatch",
    13: "excessive-remote-peers",
}


class PortmapError(ValueError):
    """
    A malformed or unusable NAT-PMP / PCP message.  ``reason`` is one short
    word (``short``, ``version``, ``length``, ``option``...).
    """

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class NatPmpResponse:
    """
    A NAT-PMP response.  ``opcode`` is the request's (0 external address,
    1 UDP, 2 TCP); ``result`` a key of :data:`NATPMP_RESULTS` (or another
    number a newer server sends).  The address or mapping fields are set
    only on success: RFC 6886 leaves them undefined otherwise, and an
    "unsupported version" answer to a PCP request has none at all.
    """

    opcode: int
    result: int
    epoch: int
    external_ip: str | None = None
    internal_port: int | None = None
    external_port: int | None = None
    lifetime: int | None = None

    @property
    def transport(self):
        """``"udp"``/``"tcp"`` for a map response, ``None`` for the address one."""
        return _NATPMP_OPCODES.get(self.opcode)

    @property
    def result_name(self):
        return NATPMP_RESULTS.get(self.result, f"result-{self.result}")


@dataclass(frozen=True)
class PcpResponse:
    """
    A PCP response.  The MAP fields are ``None`` for an ANNOUNCE, and for
    an error response that did not echo the request's payload.
    """

    opcode: int
    result: int
    lifetime: int
    epoch: int
    nonce: bytes | None = None
    protocol: int | None = None
    internal_port: int | None = None
    external_port: int | None = None
    external_ip: str | None = None

    @property
    def opcode_name(self):
        return _PCP_OPCODES.get(self.opcode, f"opcode-{self.opcode}")

    @property
    def result_name(self):
        return PCP_RESULTS.get(self.result, f"result-{self.result}")

    @property
    def transport(self):
        return _PCP_PROTOCOLS.get(self.protocol)


def _port(value, name, zero_ok=True):
    if not isinstance(value, int) or not (0 if zero_ok else 1) <= value <= 65535:
        raise PortmapError("argument", f"{name} {value!r} is not a port")
    return value


def _lifetime(value):
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise PortmapError("argument", f"lifetime {value!r} is not a 32-bit number of seconds")
    return value


def _transport(transport):
    try:
        return TRANSPORTS[transport]
    except KeyError:
        raise PortmapError("argument", f"transport {transport!r} is not udp or tcp") from None


def _mapped(ip):
    """An address as PCP's 128-bit field: IPv4 as IPv4-mapped IPv6."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _unmapped(raw):
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def natpmp_external_request():
    """The NAT-PMP request for the gateway's external address (2 bytes)."""
    return bytes([NATPMP_VERSION, 0])


def natpmp_map_request(transport, internal_port, external_port, lifetime):
    """
    A NAT-PMP map request (12 bytes).  ``external_port`` is a suggestion
    (0: none); a ``lifetime`` of 0 with ``external_port`` 0 deletes the
    mapping of ``internal_port`` (RFC 6886 section 3.4).
    """
    opcode, _ = _transport(transport)
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, opcode, 0, _port(internal_port, "internal port", False),
        _port(external_port, "external port"), _lifetime(lifetime),
    )


def pcp_map_request(client_ip, nonce, transport, internal_port, lifetime, external_port=0,
                    external_ip=None):
    """
    A PCP MAP request (60 bytes, no options).  ``client_ip`` must be the
    request's source address as the gateway sees it (else the gateway
    answers ``address-mismatch``); ``nonce`` is 12 bytes kept for the
    mapping's life, since renewal and deletion must repeat it.  A
    ``lifetime`` of 0 deletes the mapping.  ``external_port`` and
    ``external_ip`` are suggestions (0 / ``None``: none).
    """
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise PortmapError("argument", "the nonce is 12 bytes")
    _, protocol = _transport(transport)
    client = _mapped(client_ip)
    suggested = _mapped(external_ip) if external_ip else _mapped("0.0.0.0")
    header = struct.pack("!BBHI", PCP_VERSION, PCP_OP_MAP, 0, _lifetime(lifetime)) + client
    payload = nonce + struct.pack(
        "!B3xHH", protocol, _port(internal_port, "internal port", False),
        _port(external_port, "external port"),
    ) + suggested
    return header + payload


def pcp_announce_request(client_ip):
    """A PCP ANNOUNCE request (24 bytes): does the gateway speak PCP?"""
    return struct.pack("!BBHI", PCP_VERSION, PCP_OP_ANNOUNCE, 0, 0) + _mapped(client_ip)


def _check_options(data):
    """Walk the options after a PCP payload; raise on bad framing."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise PortmapError("option", "truncated option header")
        (length,) = struct.unpack_from("!H", data, offset + 2)
        padded = (length + 3) & ~3
        offset += 4 + padded
        if offset > len(data):
            raise PortmapError("option", "option longer than the message")


def _decode_natpmp(data):
    if len(data) < 8:
        raise PortmapError("short", f"{len(data)}-byte NAT-PMP response")
    _, opcode, result, epoch = struct.unpack_from("!BBHI", data)
    if opcode < 128:
        raise PortmapError("request", "a NAT-PMP request, not a response")
    opcode -= 128
    if result != 0:
        return NatPmpResponse(opcode, result, epoch)
    if opcode == 0:
        if len(data) < 12:
            raise PortmapError("short", f"{len(data)}-byte NAT-PMP address response")
        return NatPmpResponse(opcode, result, epoch,
                              external_ip=str(ipaddress.IPv4Address(data[8:12])))
    if opcode in _NATPMP_OPCODES:
        if len(data) < 16:
            raise PortmapError("short", f"{len(data)}-byte NAT-PMP map response")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return NatPmpResponse(opcode, result, epoch, internal_port=internal,
                              external_port=external, lifetime=lifetime)
    raise PortmapError("opcode", f"NAT-PMP opcode {opcode}")


def _decode_pcp(data):
    if len(data) < _PCP_HEADER:
        raise PortmapError("short", f"{len(data)}-byte PCP response")
    if len(data) > MAX_PCP_SIZE or len(data) % 4:
        raise PortmapError("length", f"{len(data)}-byte PCP response")
    _, op, _, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if not op & 0x80:
        raise PortmapError("request", "a PCP request, not a response")
    opcode = op & 0x7F
    if opcode == PCP_OP_MAP:
        if len(data) < _PCP_HEADER + _PCP_MAP_PAYLOAD:
            if result == 0:
                raise PortmapError("short", "PCP MAP response without its payload")
            _check_options(data[_PCP_HEADER:])
            return PcpResponse(opcode, result, lifetime, epoch)
        payload = data[_PCP_HEADER:_PCP_HEADER + _PCP_MAP_PAYLOAD]
        _check_options(data[_PCP_HEADER + _PCP_MAP_PAYLOAD:])
        protocol, internal, external = struct.unpack_from("!B3xHH", payload, NONCE_SIZE)
        return PcpResponse(opcode, result, lifetime, epoch, nonce=payload[:NONCE_SIZE],
                           protocol=protocol, internal_port=internal, external_port=external,
                           external_ip=_unmapped(payload[20:36]))
    # ANNOUNCE (a reboot notice, or the answer to our probe), PEER and
    # opcodes we never ask for: the header is all we read.
    if opcode != PCP_OP_ANNOUNCE:
        return PcpResponse(opcode, result, lifetime, epoch)
    _check_options(data[_PCP_HEADER:])
    return PcpResponse(opcode, result, lifetime, epoch)


def decode_response(data):
    """
    Decode a datagram from a gateway's port 5351: a :class:`NatPmpResponse`
    (version 0) or a :class:`PcpResponse` (version 2).  Raise
    :class:`PortmapError` on anything else.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PortmapError("type", type(data).__name__)
    data = bytes(data)
    if not data:
        raise PortmapError("short", "empty datagram")
    if data[0] == NATPMP_VERSION:
        return _decode_natpmp(data)
    if data[0] == PCP_VERSION:
        return _decode_pcp(data)
    raise PortmapError("version", f"version {data[0]}")


def check_pcp_map(response, nonce, transport, internal_port):
    """
    Whether ``response`` answers our MAP request for ``internal_port``
    (``transport``) made with ``nonce``.  An error response without the
    echoed payload is taken as ours: it carries nothing to check, and all
    it can do is end one attempt early.
    """
    if not isinstance(response, PcpResponse) or response.opcode != PCP_OP_MAP:
        return False
    if response.nonce is None:
        return response.result != 0
    _, protocol = _transport(transport)
    return (response.nonce == nonce and response.protocol == protocol
            and response.internal_port == internal_port)


class EpochCheck:
    """
    RFC 6887 section 8.5: a gateway's epoch counts seconds since it last
    lost its mappings; if it goes back, or runs much slower or faster than
    our own clock, the gateway has restarted and mappings made before are
    gone.  Feed it every response's epoch with our clock's time.
    """

    def __init__(self):
        self._last = None  # (our seconds, their epoch)

    def observe(self, now, epoch):
        """
        Record a response received at ``now`` with ``epoch``; return
        ``False`` when the gateway lost its state since the last one.
        """
        last, self._last = self._last, (now, epoch)
        if last is None:
            return True
        client_delta = now - last[0]
        server_delta = epoch - last[1]
        if epoch < last[1] - 1:
            return False
        # Each side's clock may run 1/16 off the other's, plus 2 s of rounding.
        return not (client_delta + 2 < server_delta - server_delta / 16
                    or server_delta + 2 < client_delta - client_delta / 16)


def retransmit_times(budget, first=0.25):
    """
    When to send a request, in seconds after the first send (0): RFC 6886
    section 3.1's schedule (250 ms, doubling) cut to ``budget``.  There is
    always the first send.
    """
    times = [0.0]
    gap = first
    while gap > 0 and times[-1] + gap < budget and len(times) < 9:
        times.append(times[-1] + gap)
        gap *= 2
    return times


#: Where SSDP searches go.
SSDP_GROUP = ("239.255.255.250", 1900)
#: The device types of IGD v1 and v2.
IGD_TYPES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
#: The most of an SSDP answer we read.
MAX_SSDP_SIZE = 2048


def ssdp_search(search_target, mx=1):
    """An SSDP M-SEARCH request for ``search_target`` (bytes)."""
    if not 1 <= mx <= 5:
        raise PortmapError("argument", "MX is 1 to 5 seconds")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_GROUP[0]}:{SSDP_GROUP[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_target}\r\n"
        "\r\n"
    ).encode("ascii")


def parse_ssdp_response(data):
    """
    The ``(search target, description URL)`` of an SSDP search answer;
    :class:`PortmapError` for anything else (a NOTIFY, another search,
    a malformed or oversized datagram, a URL that is not plain http).
    """
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_SSDP_SIZE:
        raise PortmapError("length", "not an SSDP answer")
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError:
        raise PortmapError("encoding", "an SSDP answer is ASCII") from None
    lines = text.split("\r\n")
    status = lines[0].split()
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise PortmapError("status", lines[0][:40])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    location, target = headers.get("location"), headers.get("st")
    if not location or not target:
        raise PortmapError("header", "an SSDP answer needs LOCATION and ST")
    if not location.startswith("http://") or any(c in location for c in " \t\"<>"):
        raise PortmapError("location", location[:60])
    return target, location
