# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
nftables rulesets for the NAT lab, as text.

Pure functions: they only build the text that :mod:`p2pnat.lab.topology`
loads with ``nft -f -`` inside a router's namespace, so every recipe can be
checked without root.
"""

import ipaddress

from p2pnat.lab.errors import LabConfigError

#: The router kinds the lab can build, with what each one models.
KINDS = {
    "public": "no NAT: the host sits directly on the internet segment",
    "cone": "masquerade: endpoint-independent mapping, port preserving, "
    "address-and-port-dependent filtering",
    "symmetric-random": "masquerade fully-random: a random port per flow",
    "symmetric-sequential": "snat through a numgen map: the next port "
    "(base + k*step) per new UDP flow, the seed's router",
    "double": "a cone home router behind a symmetric carrier-grade NAT (100.64.0.0/10)",
}

#: Kinds that are a single NAT router, i.e. have one ruleset of their own.
NAT_KINDS = ("cone", "symmetric-random", "symmetric-sequential")

TABLE = "p2pnat"
TABLE6 = "p2pnat6"
LOSS_TABLE = "p2pnat_loss"


def check_port_plan(base, count, step):
    """
    Check a sequential port plan and return the ports it hands out, in order.

    The plan gives ``base, base+step, ..., base+(count-1)*step``; every port
    must be a valid unprivileged port, so that a wrap never produces port 0
    or a port a real service might hold.
    """
    if count < 2:
        raise LabConfigError(f"port_count must be at least 2, not {count}")
    if step < 1:
        raise LabConfigError(f"port_step must be at least 1, not {step}")
    last = base + (count - 1) * step
    if base < 1024 or last > 65535:
        raise LabConfigError(f"sequential ports {base}..{last} leave 1024-65535")
    return range(base, last + 1, step)


def router_ruleset(kind, wan_ip, wan="wan", port_base=20000, port_count=2000, port_step=1):
    """
    The ruleset of a NAT router of ``kind`` whose WAN interface is ``wan``
    with address ``wan_ip``.

    It always holds the home-router firewall: from the WAN only
    ``ct state established,related`` is accepted, on input and on forward.
    Without the input rule a peer's early probe to the router's address makes
    a conntrack entry on the router itself, and the kernel then gives the
    local host's own outbound flow a different port (a lab artefact that
    breaks punching between two cone NATs).
    """
    if kind not in NAT_KINDS:
        raise LabConfigError(f"no ruleset for router kind {kind!r}")
    wan_ip = ipaddress.IPv4Address(wan_ip)
    if kind == "cone":
        # Linux keeps the source port when it is free: endpoint-independent
        # mapping in practice; filtering comes from conntrack (address and port).
        nat = [f'oifname "{wan}" masquerade']
    elif kind == "symmetric-random":
        nat = [f'oifname "{wan}" masquerade fully-random']
    else:
        ports = check_port_plan(port_base, port_count, port_step)
        # numgen's value is in host byte order, so "numgen inc mod N offset B"
        # would give byte-swapped ports; a map from counter to port does not.
        # The NAT rule runs once per new conntrack entry, so each new UDP flow
        # takes the next port.
        elements = ", ".join(f"{i} : {p}" for i, p in enumerate(ports))
        nat = [
            f'oifname "{wan}" meta l4proto udp snat to {wan_ip} : '
            f"numgen inc mod {len(ports)} map {{ {elements} }}",
            # TCP and ICMP: a plain masquerade is enough (UDP is what we punch).
            f'oifname "{wan}" masquerade',
        ]
    lines = [
        f"table ip {TABLE} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
        f'    iifname "{wan}" drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
        f'    iifname "{wan}" drop',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *(f"    {rule}" for rule in nat),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def ipv6_firewall_ruleset(wan="wan", lan="lan"):
    """
    The IPv6 ruleset of a home router that routes a global /64 to its LAN:
    a stateful firewall, no NAT66.

    Forwarded packets pass when conntrack knows their flow
    (``established,related``: replies, and ICMPv6 errors about them) or when
    they go from ``lan`` out of ``wan``; everything else is dropped, so an
    unsolicited datagram from the internet never reaches a host, however
    global its address.  To the router itself, from the WAN, only replies and
    neighbour discovery (without which nobody could route the LAN's prefix to
    it) get in.
    """
    lines = [
        f"table ip6 {TABLE6} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
        f'    iifname "{wan}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept',
        f'    iifname "{wan}" drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{lan}" oifname "{wan}" accept',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def loss_ruleset(port, loss_pct):
    """
    A bridge-family ruleset that drops ``loss_pct`` percent of the frames
    crossing bridge port ``port`` in each direction, independently.

    It is loaded in the namespace *upstream* of a router, on the bridge port
    that is the other end of the router's WAN link: packets are lost on the
    wire, after the router's NAT and conntrack have seen them, as on a real
    lossy link.  It needs no ``sch_netem``.
    """
    if not 0 < loss_pct < 100:
        raise LabConfigError(f"loss must be between 0 and 100 percent, not {loss_pct}")
    # Resolution of 1/10000: enough for "0.5 %" without float rules.
    threshold = round(loss_pct * 100)
    drop = f"numgen random mod 10000 < {threshold} drop"
    lines = [
        f"table bridge {LOSS_TABLE}_{port} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{port}" {drop}',
        f'    oifname "{port}" {drop}',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{port}" {drop}',
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f'    oifname "{port}" {drop}',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def accept_dnat_rule(wan="wan"):
    """
    An ``nft -f`` command that lets through a router's firewall what a
    port-mapping daemon on it (miniupnpd, :mod:`p2pnat.lab.upnp`) forwards:
    the forward chain of :func:`router_ruleset` drops every new flow from
    the WAN, and a drop in one nftables chain wins over an accept in
    another table's, so miniupnpd's own accept rules are not enough.  Only
    flows that a DNAT rule rewrote match, and only miniupnpd adds DNAT
    rules in the lab.
    """
    return f'insert rule ip {TABLE} forward iifname "{wan}" ct status dnat accept\n'
