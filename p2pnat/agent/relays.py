# -*- test-case-name: tests.unit.test_agent_relays -*-
"""
The relays a device agent may report to, and the order it tries them in.

``agent.relay`` names one relay (``"relay.example.org:7478"``) or several
(a list, or on the command line a comma-separated string).  Each entry is
``host:port``, with IPv6 literals as ``[2001:db8::1]:7478``; a host name
may resolve to several addresses, IPv4 and IPv6.  The agent reports to one
address at a time and moves to the next when it stops answering
(L{p2pnat.agent.notifier.Notifier}): entries in the configured order, the
addresses of one name with IPv6 and IPv4 interleaved (IPv6 first, as
RFC 8305 asks), the first again after the last.

This module is pure: resolving names is the caller's job.
"""

import ipaddress
import re

from p2pnat.daemon import config as C

#: At most this many relay entries, and addresses per resolved name.
MAX_RELAYS = 32

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _items(value):
    """The entries of a string (comma-separated) or a list of strings."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        for v in value:
            if not isinstance(v, str):
                raise ValueError(f"expected \"host:port\" strings, got {v!r}")
        return [v.strip() for v in value]
    raise ValueError(f"expected \"host:port\" or a list of them, got {value!r}")


def ip_literal(host):
    """C{host} as an IP address in its canonical text, or None for a name."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return None


def parse_address(text, what="address"):
    """
    One ``host:port`` (or ``[ipv6]:port``) entry: ``(host, port)`` with an
    IP literal in canonical form.

    @raise ValueError: naming C{text} and what is wrong with it.
    """
    if isinstance(text, str):
        # Said in the agent's words before parse_hostport's general ones.
        if not text.startswith("[") and text.count(":") > 1:
            # "2001:db8::1:7478" reads as an address with or without a port.
            raise ValueError(f"{text!r}: write an IPv6 {what} as [address]:port")
        if text.startswith("[") and ":" not in text[1:].partition("]")[0]:
            raise ValueError(f"{text!r}: brackets are for IPv6 addresses only")
    host, port = C.parse_hostport(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    literal = ip_literal(host)
    if literal is None:
        name = host[:-1] if host.endswith(".") else host
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ValueError(f"{text!r}: not an IP address or a host name")
        return name.lower(), port
    if ipaddress.ip_address(literal).is_unspecified:
        raise ValueError(f"{text!r}: not an address one can send to")
    return literal, port


def parse_relays(value):
    """
    The entries of C{agent.relay}: a list of ``(host, port)`` in the
    configured order, without repeats.

    @raise ValueError: for an empty list, too many entries or a bad one.
    """
    items = _items(value)
    if not items:
        raise ValueError("needs at least one relay address")
    if len(items) > MAX_RELAYS:
        raise ValueError(f"at most {MAX_RELAYS} relays, got {len(items)}")
    out = []
    for item in items:
        entry = parse_address(item, "relay address")
        if entry not in out:
            out.append(entry)
    return out


def check_relays(value):
    """The L{p2pnat.daemon.config.Setting} check of C{agent.relay}."""
    parse_relays(value)


def parse_listen(value):
    """
    The notify sockets of C{udp.listen}: at most one ``ip:port`` per
    family, as ``{4: (ip, port), 6: (ip, port)}``.  A family not given is
    bound to its wildcard address, port 0, when a relay needs it.

    @raise ValueError: for a name, two addresses of one family, or a bad entry.
    """
    items = _items(value)
    if not items:
        raise ValueError("needs at least one address")
    out = {}
    for item in items:
        host, port = C.parse_hostport(item)
        literal = ip_literal(host)
        if literal is None:
            raise ValueError(f"{item!r}: listen address must be an IP address")
        family = family_of(literal)
        if family in out:
            raise ValueError(f"{item!r}: one address per family (IPv4, IPv6)")
        out[family] = (literal, port)
    return out


def check_listen(value):
    """The L{p2pnat.daemon.config.Setting} check of C{udp.listen}."""
    parse_listen(value)


def family_of(ip):
    """4 or 6: the family of IP literal C{ip}."""
    return 6 if ":" in ip else 4


WILDCARD = {4: "0.0.0.0", 6: "::"}


def interleave(addresses):
    """
    C{addresses} (IP literals) in the order to try them: IPv6 and IPv4
    alternating, IPv6 first, each family in its given order; repeats and
    anything beyond L{MAX_RELAYS} left out.
    """
    seen, v6, v4 = set(), [], []
    for ip in addresses:
        ip = ip_literal(ip) or ip
        if ip not in seen:
            seen.add(ip)
            (v6 if family_of(ip) == 6 else v4).append(ip)
    out = []
    for i in range(max(len(v6), len(v4))):
        out.extend(family[i] for family in (v6, v4) if i < len(family))
    return out[:MAX_RELAYS]


def candidates(entries, resolved):
    """
    The addresses to try, in order: for each of C{entries} (from
    L{parse_relays}) its IP literal, or the addresses C{resolved[host]}
    gives for its name (L{interleave}d); repeats left out.

    @return: a list of ``(ip, port)``.
    """
    out = []
    for host, port in entries:
        ips = [host] if ip_literal(host) else interleave(resolved.get(host, ()))
        for ip in ips:
            if (ip, port) not in out:
                out.append((ip, port))
    return out


class RelayRing:
    """
    Which relay address the agent reports to, and which comes next.

    It moves only when told (L{advance}: the current one stopped
    answering), so it never goes back to an earlier address by itself;
    after the last address comes the first.  L{reload} takes a fresh
    resolution of the names and keeps the current address as the current
    one when it is still in the list.
    """

    def __init__(self, entries):
        self.entries = list(entries)
        self.addresses = []
        self.index = 0

    @property
    def names(self):
        """The host names among the entries (to resolve)."""
        return [host for host, port in self.entries if ip_literal(host) is None]

    @property
    def current(self):
        """The ``(ip, port)`` reported to, or None when no address is known."""
        return self.addresses[self.index] if self.addresses else None

    def reload(self, resolved):
        """Use the addresses C{resolved} (host name -> IP literals) gives the names."""
        was = self.current
        self.addresses = candidates(self.entries, resolved)
        self.index = self.addresses.index(was) if was in self.addresses else 0

    def advance(self):
        """
        Move to the next address.

        @return: True when it wrapped around to the first (time to
            resolve the names again).
        """
        if not self.addresses:
            return True
        self.index = (self.index + 1) % len(self.addresses)
        return self.index == 0
