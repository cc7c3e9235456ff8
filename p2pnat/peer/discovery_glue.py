# -*- test-case-name: tests.unit.test_discovery -*-
"""
Between NAT discovery (L{p2pnat.peer.discovery}) and what the lobby and the
punch planner carry (L{p2pnat.protocol.p2p.NatInfo}).
"""

from twisted.internet import defer

from p2pnat.protocol.p2p import ALLOCATIONS, MAPPINGS, NatInfo


def parse_nat(text):
    """``MAPPING/ALLOCATION[/STEP[/RATE]]`` as given to ``--nat``."""
    parts = text.split("/")
    if len(parts) < 2 or parts[0] not in MAPPINGS or parts[1] not in ALLOCATIONS:
        raise ValueError(f"--nat: expected MAPPING/ALLOCATION[/STEP[/RATE]] with MAPPING in"
                         f" {', '.join(MAPPINGS)} and ALLOCATION in {', '.join(ALLOCATIONS)}")
    step = int(parts[2]) if len(parts) > 2 else (1 if parts[1] == "sequential" else 0)
    rate = float(parts[3]) if len(parts) > 3 else 0.0
    return NatInfo(parts[0], "unknown", parts[1], step, rate)


@defer.inlineCallbacks
def discover_nat(reactor, servers, interface, args):
    """
    The NAT of this host: given with --nat, else measured against the
    lobby's addresses C{servers}.
    """
    if getattr(args, "nat", None):
        return parse_nat(args.nat)
    from p2pnat.peer import discovery

    found = yield discovery.discover(reactor, servers, interface=interface)
    return discovery.to_nat_info(found)
