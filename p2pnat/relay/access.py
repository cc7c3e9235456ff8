# -*- test-case-name: tests.unit.test_relay_access -*-
"""
The relay's access rules for terminals, as pure functions of a parsed
request: which scheme the terminal really used (TLS, or a trusted proxy's
word for it), which login cookie goes with it, whether a state-changing
request comes from the device's own origin, and which devices an
anonymous terminal may learn anything about.

Every device's pages live under ``*.<relay host>``: one site, in the
browser's sense, for all of them.  So a page of device A can send requests
to device B that carry B's cookies (``SameSite`` does not separate
siblings), and can set cookies for the whole relay domain (cookie
tossing).  The rules here keep the relay's own login from being usable
that way; ``docs/security.rst`` says what operators do about the devices'
own cookies.

No I/O, no clock: L{p2pnat.relay.terminal_machine.TerminalCore} calls them.
"""

import ipaddress
from urllib.parse import urlsplit

from p2pnat.relay.http import COOKIE, PLAIN_COOKIE

#: Methods a browser may send cross-origin without the target's consent
#: and that must not change state (RFC 9110 safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Sec-Fetch-Site values of a request the device's own page (or the user,
#: typing the address) made.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def cookie_name(https):
    """
    The login cookie's name for a request that came over C{https} or not
    (plain HTTP: no TLS, no trusted proxy saying https; a browser refuses
    ``__Host-`` and ``Secure`` there).
    """
    return COOKIE if https else PLAIN_COOKIE


def set_cookie(token, https):
    """
    The Set-Cookie header value giving the login C{token}: never a
    ``Domain`` (host-only: one device's cookie goes to that device only).

    ``SameSite=Lax``, not ``Strict``: a link to the device from elsewhere
    (the vendor's portal, a bookmark, a mail) opens it signed in, and
    ``Strict`` would not stop sibling devices anyway (they are same-site);
    what stops cross-origin state changes is L{cross_origin}.
    """
    secure = "; Secure" if https else ""
    return f"{cookie_name(https)}={token}; Path=/{secure}; HttpOnly; SameSite=Lax"


def host_port(request, https):
    """
    The C{(host, port)} the terminal addressed (its Host header), the port
    defaulting to the scheme's; host lower-case, without IPv6 brackets.
    None if the Host header has a port that is not a number.
    """
    raw = request.headers.get("host", "").strip().lower()
    host = request.host
    port = raw[len(host):]
    if host.startswith("["):
        host = host[1:-1]
    if not port:
        return host, 443 if https else 80
    if not port.startswith(":") or not port[1:].isdigit() or not port[1:].isascii():
        return None
    return host, int(port[1:])


def parse_origin(text):
    """``(scheme, host, port)`` of an Origin header, or None if it is none (``null``...)."""
    try:
        url = urlsplit(text.strip())
        port = url.port
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.hostname or url.path or url.query \
            or url.username is not None:
        return None
    return url.scheme, url.hostname, port or (443 if url.scheme == "https" else 80)


def cross_origin(request, https):
    """
    Why C{request} must not reach a device whose login the relay keeps,
    or None if it may: a state-changing method (not L{SAFE_METHODS}) that
    a browser says came from another origin (``Sec-Fetch-Site`` other than
    same-origin or none), or whose ``Origin`` is not the request's own
    (scheme, host, port).  A request with neither header (``curl``, the
    CLI, an old browser's same-origin form) passes.
    """
    if request.method in SAFE_METHODS:
        return None
    headers = request.headers
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _OWN_FETCH_SITES:
        return f"Sec-Fetch-Site: {site.strip()[:40]}"
    origin = headers.get("origin")
    if origin is None:
        return None
    own = host_port(request, https)
    given = parse_origin(origin)
    if given is None or own is None or given != ("https" if https else "http", *own):
        return f"Origin: {origin.strip()[:100]}"
    return None


def hidden(device):
    """
    Whether an anonymous terminal must learn nothing of the device with
    state C{device} (None: unknown): whether it exists, was revoked, is
    offline.  Devices whose access mode is "device" show their own login
    page once reached, so they are visible anyway; every other ID looks
    like a device whose login the relay keeps.
    """
    return device is None or device.access_mode != "device"


# -- the credential check of a device that has none -------------------------------

# -- trusted proxies ---------------------------------------------------------------

def parse_networks(items):
    """
    The IP networks of C{items} (addresses or CIDRs, IPv4 or IPv6).

    @raise ValueError: naming the first item that is neither.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)")
    return tuple(networks)


def check_networks(value):
    """The setting check of ``terminal.trusted_proxies``."""
    parse_networks(value)


def peer_ip(peer):
    """The IP address of a ``host:port`` peer text, or None."""
    host = peer.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def forwarded_proto(request):
    """
    The scheme a proxy says the client used: ``proto=`` of the last
    element of ``Forwarded`` (the one the nearest proxy added), else the
    last value of ``X-Forwarded-Proto``; None if neither names http or
    https.
    """
    forwarded = request.headers.get("forwarded")
    if forwarded:
        last = forwarded.rsplit(",", 1)[-1]
        for pair in last.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.strip().lower() == "proto":
                value = value.strip().strip('"').lower()
                return value if value in ("http", "https") else None
        return None
    xfp = request.headers.get("x-forwarded-proto")
    if xfp:
        value = xfp.rsplit(",", 1)[-1].strip().lower()
        return value if value in ("http", "https") else None
    return None


class TrustedProxies:
    """
    The addresses whose word about the client's scheme the relay takes
    (``terminal.trusted_proxies``): a TLS-terminating proxy in front of the
    relay's plain ``terminal.http`` port.
    """

    def __init__(self, items=()):
        self.networks = parse_networks(items)

    def __bool__(self):
        return bool(self.networks)

    def trusts(self, peer):
        """Whether the connection from C{peer} (``host:port``) comes from a trusted proxy."""
        if not self.networks:
            return False
        ip = peer_ip(peer)
        if ip is None:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def https(self, request, tls, peer):
        """
        Whether the terminal's request came over HTTPS: over TLS to the
        relay itself; or from a trusted proxy that says so (``Forwarded:
        proto=https`` or ``X-Forwarded-Proto: https``).  From anyone else
        those headers are ignored.
        """
        if tls or not self.trusts(peer):
            return tls
        return forwarded_proto(request) == "https"


#: No proxy is trusted (the relay's default).
NO_PROXIES = TrustedProxies()
