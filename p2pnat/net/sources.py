# -*- test-case-name: tests.unit.test_relay_limits,tests.unit.test_udp_rfc5780 -*-
"""
What counts as one source for every per-source limit (connections,
credential guesses, STUN answers): one rule, so that an IPv6 host cannot
multiply a limit by using many addresses of its own /64.
"""

import socket

_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_of_host(host):
    """
    The source an IP address counts as: an IPv4 address itself (also when
    it comes IPv4-mapped), the /64 of an IPv6 one, ``"local"`` for none;
    anything else is its own source.
    """
    if not host:
        return "local"
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, ValueError):
        return host
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    # socket, not ipaddress: a tenth of the cost, paid on every connection.
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
