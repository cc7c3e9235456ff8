"""
Port mapping: ask the gateway to forward a public port to us, with PCP
(RFC 6887), NAT-PMP (RFC 6886) and UPnP IGD v1/v2, and keep the mapping
while we run.  See ``docs/portmap.rst``.

- :class:`PortMapper`: a service that holds one mapping (race, renewal,
  deletion at stop) and tells subscribers when it changes.
- :func:`probe`: what the gateway offers, keeping nothing.
- :class:`Mapping`: a granted mapping.
"""

from p2pnat.portmap.common import PROTOCOLS, Attempt, Mapping
from p2pnat.portmap.mapper import PortMapper, probe

__all__ = ["PROTOCOLS", "Attempt", "Mapping", "PortMapper", "probe"]
