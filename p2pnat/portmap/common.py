# -*- test-case-name: tests.unit.test_portmap_clients -*-
"""
What the port-mapping clients hand back: a granted :class:`Mapping`, or an
:class:`Attempt` that says why there is none.  Also where the default
gateway is found.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: The protocols, in order of preference when several grant.
PROTOCOLS = ("pcp", "nat-pmp", "upnp")

#: Our mappings' description (UPnP shows it in the router's table).
DESCRIPTION = "p2pnat"


@dataclass(frozen=True)
class Mapping:
    """
    A port mapping the gateway granted: datagrams (or connections) to
    ``external`` reach this host's ``internal_port`` until
    ``granted_at + lifetime``.
    """

    protocol: str  # "pcp" | "nat-pmp" | "upnp"
    external: tuple  # (public ip text, public port)
    internal_port: int
    lifetime: float  # seconds granted
    granted_at: float  # reactor.seconds() when granted

    @property
    def expires_at(self):
        """The reactor time at which the gateway forgets the mapping."""
        return self.granted_at + self.lifetime

    def same_as(self, other):
        """Whether ``other`` is the same mapping on the gateway (renewed or asked twice)."""
        return (other is not None and self.external == other.external
                and self.internal_port == other.internal_port)


@dataclass(frozen=True)
class Attempt:
    """
    What one protocol's request came to: ``mapping`` when granted, else
    ``None`` and ``reason`` (``no-answer``, ``refused``: nothing listens on
    the gateway, ``unsupported-version``, a result code's name...).
    ``restarted`` is set when the gateway's epoch shows it lost its
    mappings since our last exchange with it.
    """

    protocol: str
    mapping: Mapping | None
    reason: str = "granted"
    restarted: bool = False


def parse_default_gateway(route_text):
    """
    The IPv4 default gateway in the text of ``/proc/net/route``, or
    ``None``: the first up (``RTF_UP``) default route through a gateway
    (``RTF_GATEWAY``), with the lowest metric.
    """
    best = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 7:
            continue
        try:
            destination = int(fields[1], 16)
            gateway = int(fields[2], 16)
            flags = int(fields[3], 16)
            metric = int(fields[6])
        except ValueError:
            continue
        if destination != 0 or flags & 0x3 != 0x3 or gateway == 0:
            continue
        # The kernel prints the address in host (little-endian) byte order.
        address = str(ipaddress.IPv4Address(struct.pack("<I", gateway & 0xFFFFFFFF)))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def default_gateway(path="/proc/net/route"):
    """This host's IPv4 default gateway, or ``None`` (no route, no procfs)."""
    try:
        with open(path) as f:
            return parse_default_gateway(f.read())
    except OSError:
        return None


def check_gateway(gateway):
    """``gateway`` as IPv4 text; ``ValueError`` for anything else."""
    try:
        return str(ipaddress.IPv4Address(gateway))
    except (ipaddress.AddressValueError, ValueError) as e:
        raise ValueError(f"gateway {gateway!r} is not an IPv4 address") from e


__all__ = [
    "DESCRIPTION",
    "PROTOCOLS",
    "Attempt",
    "Mapping",
    "check_gateway",
    "default_gateway",
    "parse_default_gateway",
]
