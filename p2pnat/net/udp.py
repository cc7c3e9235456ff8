# -*- test-case-name: tests.unit.test_udp_rfc5780,tests.unit.test_relay_notify -*-
"""
The UDP control socket shared by the lobby, the relay and the device agent.

L{ControlProtocol} receives every datagram and sorts it by its first byte
(RFC 7983): STUN Binding requests (0..3) get a STUN answer; p2pnat frames
(0x0C) are parsed, their key looked up, their MAC and timestamp checked,
and only then given to the daemon's handler.  Anything else, and anything
malformed, forged, replayed or too large, is dropped: counted in the
metrics by reason and logged, with the log rate-limited so that a flood
cannot fill the disk.  No exception from a handler escapes into the
reactor.

Replies obey one rule: a reply to a datagram is never larger than the
datagram (no amplification); STUN answers, which the STUN standard makes
larger than a bare request, are rate-limited per source address instead,
by one limit shared by all the sockets of a daemon (L{share_stun_limit}).

A daemon with several sockets (the lobby, a relay given several
addresses) links them with L{link_siblings}; a STUN Binding request whose
CHANGE-REQUEST asks for another port and/or IP is then answered from the
sibling socket that has it (RFC 5780), so that a client can learn how its
NAT filters.  When a socket has a concrete address and a sibling with
another IP and another port, every Binding answer from it names that
sibling (OTHER-ADDRESS) and where the answer left from (RESPONSE-ORIGIN):
a standard RFC 5780 client runs its tests only after seeing them.
"""

import errno
import ipaddress
import socket
import sys
from collections import OrderedDict

from twisted.internet import error
from twisted.internet import udp as _twisted_udp
from twisted.internet.protocol import DatagramProtocol

from p2pnat.daemon.logs import Logger
from p2pnat.net.sources import source_of_host
from p2pnat.protocol import stun, wire


class TokenBucket:
    """
    Per-key token buckets (C{rate} per second, up to C{burst}), remembering
    at most C{max_keys} keys (least recently used forgotten first).
    """

    def __init__(self, clock, rate, burst, max_keys=65536):
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets = OrderedDict()

    def allow(self, key):
        now = self._clock.seconds()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        ok = tokens >= 1
        if ok:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok


class DropLog:
    """
    Logs dropped datagrams: the first C{burst} per reason in each
    C{interval} seconds one by one, then how many more were dropped.
    """

    def __init__(self, log, clock, interval=60.0, burst=10):
        self.log = log
        self._clock = clock
        self.interval = interval
        self.burst = burst
        self._window = {}  # reason -> (window start, count)

    def __call__(self, reason, addr, detail=""):
        now = self._clock.seconds()
        start, count = self._window.get(reason, (now, 0))
        if now - start >= self.interval:
            if count > self.burst:
                self.log.warn("dropped {n} more datagrams ({reason}) in the last {secs:.0f}s",
                              n=count - self.burst, reason=reason, secs=now - start)
            start, count = now, 0
        count += 1
        self._window[reason] = (start, count)
        if count <= self.burst:
            self.log.info("dropped datagram from {addr}: {reason} {detail}", addr=wire.format_addr(addr),
                          reason=reason, detail=detail)


# <linux/in.h>, <linux/in6.h>; Python's socket module does not name them.
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE = 10, 23, 3


def no_fragmentation(transport):
    """
    Have the kernel send the UDP socket under C{transport} with the
    don't-fragment bit set and never fragment its datagrams, whatever path
    MTU it has learnt from ICMP (Linux's C{IP_PMTUDISC_PROBE}, for IPv4
    and IPv6).  QUIC requires it (RFC 9000 section 14): its path MTU
    probes must find what the path carries whole, not what IP fragments
    carry (fragments that NATs and firewalls often drop).  Every datagram
    p2pnat sends otherwise fits the 1200 bytes every path carries.

    @return: whether it was set (False for a transport without a socket, or
        off Linux: the kernel's default stays).
    """
    sock = getattr(transport, "socket", None)
    if sock is None or not sys.platform.startswith("linux"):
        return False
    done = False
    options = [(socket.IPPROTO_IP, _IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        # A dual-stack socket's IPv4 traffic follows the IPv4 option.
        options.append((socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER))
    for level, option in options:
        try:
            sock.setsockopt(level, option, _PMTUDISC_PROBE)
            done = True
        except OSError:
            pass
    return done


class SendTo:
    """
    Twisted's C{Port.write}, without its address checks for an address it
    has already taken from this sender.

    Twisted checks, for every datagram, that the address is an IP literal
    of the port's family (a host name would make C{sendto} resolve it,
    blocking the reactor); for a stream of packets to one peer that check
    cost a third of each send's CPU outside the kernel.  Here an address's
    first datagram goes through C{Port.write} (checked, and refused as
    there), and the next ones to the same address on the same port go to
    the socket directly, with the same handling of errors: EINTR retried,
    EMSGSIZE raised as C{MessageLengthError}, ECONNREFUSED ignored.  Any
    other transport (a connected port, a test's) gets C{write} every time.
    """

    def __init__(self):
        self._port = None
        self._addr = None

    def __call__(self, transport, data, addr):
        """Send C{data} to C{addr} on C{transport}."""
        if transport is self._port and addr == self._addr:
            while True:
                try:
                    transport.socket.sendto(data, addr)
                    return
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    if e.errno == errno.EMSGSIZE:
                        raise error.MessageLengthError("message too long") from None
                    if e.errno == errno.ECONNREFUSED:
                        return
                    raise
        transport.write(data, addr)
        if type(transport) is _twisted_udp.Port and not transport._connectedAddr:
            self._port, self._addr = transport, addr


def stun_bucket(clock, rate):
    """
    The token bucket of STUN answers: C{rate} per second per source
    (L{p2pnat.net.sources.source_of_host}: an IPv4 address, an IPv6 /64),
    bursts of twice that.
    """
    return TokenBucket(clock, rate, max(1.0, rate * 2))


def share_stun_limit(protocols):
    """
    Make the L{ControlProtocol}s C{protocols} (the sockets of one daemon)
    share one STUN limit per source IP: the first one's.  A source then
    gets C{udp.stun_rate} answers per second from the daemon, not that many
    from each of its sockets.
    """
    protocols = list(protocols)
    limit = next((p.stun_limit for p in protocols if p.stun_limit is not None), None)
    for proto in protocols:
        if proto.stun_limit is not None:
            proto.stun_limit = limit
    return limit


def link_siblings(protocols):
    """
    Make the listening L{ControlProtocol}s C{protocols} (the sockets of
    one daemon) siblings of each other: each one's C{siblings} becomes the
    same mapping from local C{(host, port)} to protocol.  Call it once all
    of them are bound (their transports give the addresses, so port 0
    works).  Return the mapping.
    """
    siblings = {}
    for proto in protocols:
        a = proto.transport.getHost()
        siblings[(a.host, a.port)] = proto
    for proto in siblings.values():
        proto.siblings = siblings
    return siblings


def _family(host):
    return 6 if ":" in host else 4


def _concrete(host):
    """False for a wildcard address: what it sends from is the kernel's choice."""
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_error(answer):
    """True if the encoded STUN message C{answer} is an error response."""
    _, msg_class = stun.split_message_type(int.from_bytes(answer[:2], "big"))
    return msg_class == stun.MessageClass.ERROR


class ControlProtocol(DatagramProtocol):
    """
    One UDP control socket.

    @param handler: object with ``key_for(key_id, type) -> bytes | None``
        and ``handle(frame, message, addr, proto) -> Message | None`` (a reply
        to seal under the same key and key ID), and optionally
        ``replayed(frame, message, addr, proto)``, told of each genuine
        frame refused as a replay (it may answer it, at most once and no
        larger), and ``quic_datagram(data, addr, proto) -> bool``, offered
        the QUIC datagrams (see L{stun.demux}) that reach the socket before
        a QUIC layer taps it (a punch keeps the peer's first ones: see
        L{p2pnat.peer.punch.Punch.quic_datagram}); those it does not take
        (False), and all of them without it, are dropped as of an unknown
        protocol (or as oversized).
    @param replay: the L{wire.ReplayGuard}, shared by all sockets of a daemon.
    @param stun_rate: STUN answers per second per source IP (0 turns STUN off).
    @param stun_limit: the L{TokenBucket} of STUN answers per source IP,
        shared by every socket of a daemon (see L{share_stun_limit}); by
        default one of C{stun_rate} for this socket alone.
    @param stamper: the daemon's L{wire.Stamper} for replies.
    """

    noisy = False  # the port itself logs what it listens on

    def __init__(self, handler, clock, metrics, replay, *, name="udp", stun_rate=20.0,
                 stun_limit=None, log=None, stamper=None):
        self.handler = handler
        self.clock = clock
        self.metrics = metrics
        self.replay = replay
        self.name = name
        self.log = log or Logger(namespace=f"p2pnat.{name}")
        self.drop_log = DropLog(self.log, clock)
        if stun_limit is None and stun_rate:
            stun_limit = stun_bucket(clock, stun_rate)
        self.stun_limit = stun_limit if stun_rate else None
        # Shared by all sockets of a daemon: timestamps under one key must
        # keep increasing whichever socket sends them.
        self.stamper = stamper or wire.Stamper(clock)
        #: Sibling sockets by local (host, port), this one included; see
        #: L{link_siblings}.
        self.siblings = {}
        self._sendto = SendTo()

    def startProtocol(self):
        # QUIC runs on these sockets (a punched path's): see no_fragmentation.
        no_fragmentation(self.transport)

    def drop(self, reason, addr, detail=""):
        self.metrics.drop(reason)
        self.drop_log(reason, addr, detail)

    def datagramReceived(self, data, addr):
        # An IPv6 sender comes as (host, port, flowinfo, scope id): the
        # handlers and the wire format know addresses as (host, port).
        addr = addr[:2]
        try:
            self._received(data, addr)
        except Exception:
            self.metrics.drop("internal-error")
            self.log.failure("error handling datagram from {addr}", addr=wire.format_addr(addr))

    def _received(self, data, addr):
        if data and data[0] & 0x40:  # QUIC's fixed bit: no frame or STUN message has it
            early = getattr(self.handler, "quic_datagram", None)
            if early is not None and stun.demux(data) is stun.Kind.QUIC and early(
                    data, addr, self):
                return
        if len(data) > wire.MAX_DATAGRAM:
            self.metrics.received("invalid")
            return self.drop("oversized", addr, f"{len(data)} bytes")
        if not data:
            self.metrics.received("invalid")
            return self.drop("empty", addr)
        first = data[0]
        if first < 4:
            return self._stun(data, addr)
        if first != wire.MARKER:
            self.metrics.received("invalid")
            return self.drop("unknown-protocol", addr, f"first byte 0x{first:02x}")
        try:
            frame = wire.parse(data)
        except wire.WireError as e:
            self.metrics.received("invalid")
            return self.drop(e.reason, addr, str(e))
        kind = wire.MESSAGES[frame.type].__name__
        self.metrics.received(kind)
        key = self.handler.key_for(frame.key_id, frame.type)
        if key is None:
            return self.drop("unknown-key", addr, f"{kind} for {frame.key_id}")
        try:
            message = frame.open(key)
        except wire.WireError as e:
            return self.drop(e.reason, addr, f"{kind} for {frame.key_id}")
        why = self.replay.admit(wire.MESSAGES[frame.type], frame.key_id, frame.timestamp)
        if why:
            self.drop(why, addr, f"{kind} for {frame.key_id}")
            replayed = getattr(self.handler, "replayed", None)
            if why == "replay" and replayed is not None:
                replayed(frame, message, addr, self)
            return
        reply = self.handler.handle(frame, message, addr, self)
        if reply is not None:
            self.reply(reply, frame, key, addr, len(data))

    def reply(self, message, frame, key, addr, limit):
        """Seal and send C{message} unless it would be larger than C{limit}."""
        out = wire.seal(message, frame.key_id, key, self.stamper())
        if len(out) > limit:
            return self.drop("would-amplify", addr,
                             f"{type(message).__name__} {len(out)} > {limit} bytes")
        self.send(out, addr, type(message).__name__)

    def send(self, data, addr, kind):
        """Send C{data} (already encoded) and count it."""
        self.metrics.sent(kind)
        self._sendto(self.transport, data, addr)

    def _stun(self, data, addr):
        self.metrics.received("stun")
        if self.stun_limit is None:
            return self.drop("stun-disabled", addr)
        try:
            change = stun.parse_message(data).get(stun.Attr.CHANGE_REQUEST)
            flags = None if change is None else stun.decode_change_request(change)
            sender, origin, other = self._rfc5780(flags)
            # Without a sibling to answer from, answer_binding refuses the
            # change with 420 (from this socket).
            answer = stun.answer_binding(data, addr, response_origin=origin, other_address=other,
                                         honour_change=sender is not None)
        except stun.StunError as e:
            return self.drop(f"stun-{e.reason}", addr)
        if answer is None:
            return
        if not self.stun_limit.allow(source_of_host(addr[0])):
            return self.drop("stun-rate-limited", addr)
        if _is_error(answer):
            # A refusal (420 for another attribute) leaves from the address
            # asked: from a sibling, a NAT would drop it and the client would
            # read the silence as filtering.
            sender = self
        (sender or self).send(answer, addr, "stun")

    def _rfc5780(self, flags):
        """
        What RFC 5780 asks of the answer to a Binding request whose
        CHANGE-REQUEST has C{flags} (C{(change_ip, change_port)}; None for
        a request without one): C{(sender, response_origin,
        other_address)}.

        C{sender} is the sibling with the other IP and/or port asked for
        (this socket when no flag is set), or None when there is no such
        sibling.  C{other_address} is the sibling with both another IP and
        another port (RFC 5780's alternate address), and C{response_origin}
        the sender's address, each None when unknown: a wildcard socket
        cannot say which address its answer leaves from, and cannot change
        IP.  A request without CHANGE-REQUEST gets both addresses only when
        the alternate address is known: that is how a standard client
        learns that this server can run its tests (RFC 5780 section 6.1),
        and a server that cannot keeps its answer minimal.
        """
        change_ip, change_port = flags or (False, False)
        me = next((a for a, p in self.siblings.items() if p is self), None)
        if me is None:
            return (None if change_ip or change_port else self), None, None
        host, port = me
        live = {a for a, p in self.siblings.items()
                if p.transport is not None and _family(a[0]) == _family(host)}
        concrete = _concrete(host)
        other = min(((h, q) for h, q in live if h != host and q != port and concrete
                     and _concrete(h)), default=None)
        if flags is None:
            return self, (me if other is not None else None), other

        def pick():
            if not change_ip and not change_port:
                return me
            if change_ip and change_port:
                return other
            found = sorted(a for a in live
                           if (a[0] != host) == change_ip and (a[1] != port) == change_port
                           and (not change_ip or (concrete and _concrete(a[0]))))
            # Prefer the alternate address's IP (or port), as RFC 5780 pairs them.
            i = 0 if change_ip else 1
            preferred = [a for a in found if other is not None and a[i] == other[i]]
            return (preferred or found or [None])[0]

        target = pick()
        if target is None:
            return None, None, None
        origin = target if _concrete(target[0]) else None
        return self.siblings[target], origin, other
