"""
Raw IPv4/UDP packets, for the attacks the lab tests play: build one from any
source address (spoofing), mend the checksums of a captured one, send one as
it is, capture them on an interface (both ways), read the header of the
p2pnat frame one carries, and forge QUIC packets from a captured one.  Pure
standard library; sending and capturing need root in the namespace they
run in.
"""

import os
import socket
import struct
import sys
import time

_SOL_PACKET, _PACKET_STATISTICS, _SO_RCVBUFFORCE = 263, 6, 33
_ETH_P_ALL, _ETH_P_IP = 0x0003, 0x0800


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_udp_packet(src, dst, payload):
    """An IPv4/UDP packet from ``src`` to ``dst`` ((ip, port) pairs)."""
    sip, dip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    length = 8 + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    check = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, os.getpid() & 0xFFFF, 0, 64,
                     socket.IPPROTO_UDP, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


def fix_checksums(packet):
    """
    ``packet`` (IPv4/UDP) with its IP and UDP checksums computed again: a
    packet captured on a veth may carry only the partial checksum that
    checksum offload leaves for the hardware to finish.
    """
    packet = bytearray(packet)
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", _checksum(bytes(packet[:ihl])))
    if packet[9] == socket.IPPROTO_UDP:
        udp = packet[ihl:]
        udp[6:8] = b"\0\0"
        pseudo = bytes(packet[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
        udp[6:8] = struct.pack("!H", _checksum(pseudo + bytes(udp)) or 0xFFFF)
        packet[ihl:] = udp
    return bytes(packet)


def send_raw(packet, count=1):
    """Send a complete IPv4 packet ``count`` times as it is (source address included)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        dst = socket.inet_ntoa(packet[16:20])
        for _ in range(count):
            s.sendto(packet, (dst, 0))
    finally:
        s.close()


def hostport(text):
    """``"ip:port"`` -> ``(ip, port)``."""
    host, port = text.rsplit(":", 1)
    return host, int(port)


class Capture:
    """
    A capture of the IPv4 packets on an interface (both ways), open from
    the moment this is made: traffic sent after that is seen.
    """

    #: Receive buffer (bytes): a capture read by Python, on a CPU shared with
    #: the peers it watches, falls behind a stream of several MB/s; the
    #: kernel drops what does not fit (see :meth:`kernel_dropped`).
    BUFFER = 64 << 20

    def __init__(self, iface):
        self.iface = iface
        # ETH_P_ALL, not ETH_P_IP: a socket bound to one protocol sees only
        # the packets coming in.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                   socket.htons(_ETH_P_ALL))
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.BUFFER)
            self._sock.bind((iface, 0))
        except BaseException:
            self._sock.close()
            raise

    def udp(self, timeout):
        """
        The UDP packets captured for at most ``timeout`` seconds, as they
        come: ``(packet, src, dst, payload)``, ``src`` and ``dst`` as
        ``"ip:port"``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                packet, (_, proto, *_) = self._sock.recvfrom(65535)
            except socket.timeout:
                return
            if proto != _ETH_P_IP or len(packet) < 28 or packet[9] != socket.IPPROTO_UDP:
                continue
            ihl = (packet[0] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", packet, ihl)
            yield (packet, f"{socket.inet_ntoa(packet[12:16])}:{sport}",
                   f"{socket.inet_ntoa(packet[16:20])}:{dport}", packet[ihl + 8:])

    def kernel_dropped(self):
        """Packets the kernel dropped for want of buffer since this was made."""
        raw = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        return int.from_bytes(raw[4:], sys.byteorder)

    def close(self):
        self._sock.close()


def frame_info(payload):
    """``(type, key_id)`` of the p2pnat frame ``payload`` starts with, or None."""
    from p2pnat.protocol import wire

    if len(payload) < 14 or payload[0] != wire.MARKER:
        return None
    klen = payload[12]
    try:
        return payload[2], payload[13:13 + klen].decode("ascii")
    except UnicodeDecodeError:
        return None


def udp_payload(packet):
    """The UDP payload of IPv4/UDP ``packet``."""
    return packet[(packet[0] & 0x0F) * 4 + 8:]


def is_quic(payload):
    """
    Whether a UDP payload on a path's ports is a QUIC packet: its first byte
    has the fixed bit 0x40 (RFC 9000 section 17), which p2pnat frames
    (first byte ``wire.MARKER``, 0x0C) and STUN (0..3) do not.
    """
    from p2pnat.protocol import wire

    return bool(payload) and payload[0] & 0x40 and payload[0] != wire.MARKER


#: The connection IDs p2pnat issues are this long (``p2pnat.quic.endpoint.CID_LENGTH``).
QUIC_CID_LENGTH = 8
#: Kinds of :func:`quic_forgery`.
QUIC_FORGERIES = ("flip", "random", "cid")


def quic_forgery(payload, kind, cid_length=QUIC_CID_LENGTH):
    """
    A forgery made from ``payload``, a genuine short-header QUIC packet
    (first byte, destination connection ID of ``cid_length`` bytes, then
    the protected packet number and payload), of the same length:

    - ``flip``: one byte of the protected payload flipped (the AEAD tag
      must then fail);
    - ``random``: random bytes under the same connection ID, with the
      fixed bit 0x40 set and the long-header bit clear (it reaches the
      connection and must fail authentication there);
    - ``cid``: the packet as it is under a random connection ID (no
      connection has it).
    """
    head = 1 + cid_length
    if len(payload) < head + 24 or payload[0] & 0xC0 != 0x40:
        raise ValueError(f"not a short-header QUIC packet: {payload[:16].hex()}")
    if kind == "flip":
        out = bytearray(payload)
        # Past the packet number (at most 4 bytes) and the header
        # protection sample that follows it: ciphertext.
        out[(head + 4 + len(payload)) // 2] ^= 0xFF
        return bytes(out)
    if kind == "random":
        return bytes([0x40 | os.urandom(1)[0] & 0x3F]) + payload[1:head] + os.urandom(
            len(payload) - head)
    if kind == "cid":
        return payload[:1] + os.urandom(cid_length) + payload[head:]
    raise ValueError(f"unknown forgery {kind!r}: one of {', '.join(QUIC_FORGERIES)}")
