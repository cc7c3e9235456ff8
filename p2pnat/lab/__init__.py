"""
p2pnat.lab: the NAT lab.

Topologies of network namespaces with the Linux kernel's real NAT, built on
demand for tests, benchmarks and people (``p2pnat lab up``).  See
:class:`Lab`; the probe tool is ``python -m p2pnat.lab.probe``.

Pure standard library (no Twisted), so the probe starts fast.
"""

from p2pnat.lab.errors import LabConfigError, LabError, LabUnavailable
from p2pnat.lab.nft import KINDS
from p2pnat.lab.topology import (
    Host,
    Lab,
    LabProcess,
    Router,
    destroy_named,
    reap_stale,
    unavailable_reason,
)

__all__ = [
    "KINDS",
    "Host",
    "Lab",
    "LabConfigError",
    "LabError",
    "LabProcess",
    "LabUnavailable",
    "Router",
    "destroy_named",
    "reap_stale",
    "unavailable_reason",
]
