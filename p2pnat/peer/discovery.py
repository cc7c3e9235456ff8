# -*- test-case-name: tests.unit.test_discovery -*-
"""
NAT behaviour discovery, the client side: STUN Binding requests (RFC 8489)
to the lobby's addresses, RFC 5780 style, then
:func:`p2pnat.protocol.nat.classify`.

One run (:func:`discover`), about ``pause`` + a few round trips long and
never more than ``deadline`` seconds:

1. the main socket asks every lobby address in turn (mapping: does the
   mapped address change with the destination?);
2. ``sockets`` fresh sockets ask the primary address one after another
   (allocation: preserving, sequential with its step, or random);
3. a fresh filtering socket asks the primary address, then asks it again
   with CHANGE-REQUEST for the other IP and port, the other port, the
   other IP (filtering: which answers get through the NAT); a lobby whose
   sockets are linked as siblings answers those from its other sockets
   (:func:`p2pnat.net.udp.link_siblings`);
4. ``pause`` seconds after the first burst, a second burst of ``sockets``
   fresh sockets (the ports other traffic took meanwhile give the rate).

Every request is retransmitted (``schedule``) until answered or given up
(``give_up``): a request without an answer then means filtered (or lost
three times).  The sockets are plain Twisted datagram protocols opened by a
``listen`` callable, so tests drive a run on a :class:`~twisted.internet.task.Clock`
with fake transports; ``python -m p2pnat.peer.discovery LOBBY_ADDR...``
runs one for real and prints the behaviour as JSON.

:func:`discover_nat` is what the P2P client needs of it: the
:class:`~p2pnat.protocol.p2p.NatInfo` to log in with, measured or given.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol

from p2pnat.daemon.logs import Logger
from p2pnat.protocol import stun
from p2pnat.protocol.nat import NatBehaviour, Observations, Probe, classify
from p2pnat.protocol.p2p import ALLOCATIONS, MAPPINGS, NatInfo

__all__ = ["StunSocket", "Discovery", "DiscoveryResult", "discover", "discover_nat",
           "parse_nat", "source_address", "to_nat_info", "main"]

#: Seconds after the first send at which a request is sent (again).
SCHEDULE = (0.0, 0.1, 0.3)
#: Seconds after the first send at which an unanswered request gives up.
GIVE_UP = 0.6

_FLAGS = {"": (False, False), "port": (False, True), "ip": (True, False), "ip+port": (True, True)}


class StunSocket(DatagramProtocol):
    """
    One local UDP socket of a discovery run: sends Binding requests,
    retransmits them, and matches answers (from any address: a changed
    answer comes from another one) by transaction id.

    @param index: the socket's number in the run (L{Probe.socket}).
    """

    noisy = False
    log = Logger(namespace="p2pnat.discovery")

    def __init__(self, clock, index=0, schedule=SCHEDULE, give_up=GIVE_UP):
        self.clock = clock
        self.index = index
        self.schedule = schedule
        self.give_up = give_up
        self.sent = 0
        self._pending = {}  # transaction id -> (deferred, probe fields, delayed calls)

    def local(self):
        """The socket's local ``(host, port)``."""
        a = self.transport.getHost()
        return a.host, a.port

    def query(self, server, change=""):
        """
        Ask ``server`` for our mapped address, with CHANGE-REQUEST
        ``change`` (one of :data:`p2pnat.protocol.nat.CHANGES`).  Return a
        Deferred firing with the :class:`Probe`: answered, refused or, after
        ``give_up`` seconds, unanswered.  It never fails.
        """
        change_ip, change_port = _FLAGS[change]
        tid, data = stun.binding_request(change_ip=change_ip, change_port=change_port)
        d = defer.Deferred()
        fields = dict(socket=self.index, local=self.local(), server=tuple(server),
                      sent=self.clock.seconds(), change=change)
        calls = [self.clock.callLater(t, self._send, data, server) for t in self.schedule[1:]]
        calls.append(self.clock.callLater(self.give_up, self._finish, tid, {}))
        self._pending[tid] = (d, fields, calls)
        self._send(data, server)
        return d

    def _send(self, data, server):
        if self.transport is None:
            return
        try:
            self.transport.write(data, tuple(server))
            self.sent += 1
        except OSError as e:  # no route, say: the same as lost
            self.log.debug("discovery: cannot send to {server}: {e}", server=server, e=e)

    def _finish(self, tid, result):
        entry = self._pending.pop(tid, None)
        if entry is None:
            return
        d, fields, calls = entry
        for call in calls:
            if call.active():
                call.cancel()
        d.callback(Probe(**fields, **result))

    def datagramReceived(self, data, addr):
        if len(data) < stun.HEADER_SIZE or not stun.is_stun(data[0]):
            return
        tid = data[8:20]
        if tid not in self._pending:
            return
        try:
            result = stun.parse_binding_response(data, tid)
        except stun.StunErrorResponse:
            return self._finish(tid, {"refused": True, "answered_from": tuple(addr[:2])})
        except stun.StunError as e:
            self.log.debug("discovery: bad answer from {addr}: {e}", addr=addr, e=e)
            return
        self._finish(tid, {"mapped": result.mapped, "answered_from": tuple(addr[:2])})

    def close(self):
        """Give up every pending request now."""
        for tid in list(self._pending):
            self._finish(tid, {})


@dataclass(frozen=True)
class DiscoveryResult:
    """What a run found: the ``behaviour``, the raw ``observations``, how
    long it took (``elapsed`` seconds) and how many requests it sent."""

    behaviour: NatBehaviour
    observations: Observations
    elapsed: float
    sent: int

    def to_json(self, observations=False) -> dict:
        d = self.behaviour.to_json()
        d["elapsed"] = round(self.elapsed, 3)
        d["sent"] = self.sent
        if observations:
            d["observations"] = self.observations.to_json()
        return d


class Discovery:
    """
    One discovery run against the lobby addresses ``servers`` (the first is
    the primary).  ``listen(protocol)`` opens a new UDP socket for
    ``protocol`` and returns its listening port (``stopListening()``).

    @param sockets: fresh sockets per allocation burst.
    @param pause: seconds between the starts of the two bursts.
    @param deadline: no request is started after this many seconds.
    """

    log = Logger(namespace="p2pnat.discovery")

    def __init__(self, servers, clock, listen, *, sockets=4, pause=0.5, schedule=SCHEDULE,
                 give_up=GIVE_UP, deadline=2.0):
        if not servers:
            raise ValueError("discovery needs at least one lobby address")
        self.servers = [tuple(s) for s in servers]
        self.clock = clock
        self.listen = listen
        self.sockets = sockets
        self.pause = pause
        self.schedule = schedule
        self.give_up = give_up
        self.deadline = deadline
        self.probes = []
        self._opened = []  # (protocol, port)
        self._start = None

    def run(self):
        """Start the run; a Deferred firing with a :class:`DiscoveryResult`."""
        return defer.Deferred.fromCoroutine(self._run())

    def _open(self):
        proto = StunSocket(self.clock, len(self._opened), self.schedule, self.give_up)
        port = self.listen(proto)
        self._opened.append((proto, port))
        return proto

    def _late(self):
        return self.clock.seconds() - self._start > self.deadline - self.give_up

    async def _ask(self, sock, server, change=""):
        probe = await sock.query(server, change)
        self.probes.append(probe)
        return probe

    async def _burst(self):
        for _ in range(self.sockets):
            if self._late():
                return
            await self._ask(self._open(), self.servers[0])

    async def _run(self):
        self._start = self.clock.seconds()
        changes = []
        try:
            main = self._open()
            first = await self._ask(main, self.servers[0])
            if first.mapped is not None or first.refused:
                for server in self.servers[1:]:
                    if not self._late():
                        await self._ask(main, server)
                burst = self.clock.seconds()
                await self._burst()
                if not self._late():
                    filt = self._open()
                    probe = await self._ask(filt, self.servers[0])
                    if probe.mapped is not None:
                        changes = [defer.Deferred.fromCoroutine(self._ask(filt, self.servers[0], c))
                                   for c in ("ip+port", "port", "ip")]
                wait = burst + self.pause - self.clock.seconds()
                if wait > 0 and not self._late():
                    await task.deferLater(self.clock, wait, lambda: None)
                await self._burst()
                for d in changes:
                    await d
            else:
                self.log.info("discovery: no answer from {server}", server=self.servers[0])
        finally:
            sent = sum(proto.sent for proto, _ in self._opened)
            await self._close()
        probes = tuple(sorted(self.probes, key=lambda p: p.sent))
        obs = Observations(tuple(self.servers), probes)
        return DiscoveryResult(classify(obs), obs, self.clock.seconds() - self._start, sent)

    async def _close(self):
        stops = []
        for proto, port in self._opened:
            proto.close()
            stopped = port.stopListening()
            if isinstance(stopped, defer.Deferred):
                stops.append(stopped)
        if stops:
            await defer.gatherResults(stops, consumeErrors=True)


def source_address(server):
    """
    The local IP address this host sends from towards ``server`` (a UDP
    socket is connected, which sends nothing).  Binding to it, rather than
    to the wildcard, lets a run tell a public host from a NATed one.
    """
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(tuple(server[:2]))
        return s.getsockname()[0]


#: Where a connected (silent) UDP socket is aimed to learn which global
#: IPv6 address this host sends from: any routed global address does.
IPV6_PROBE_TARGET = ("2001:4860:4860::8888", 9)


def _usable_ipv6(text):
    """A global unicast address a peer elsewhere could reach (not ULA, not mapped)."""
    try:
        ip = ipaddress.IPv6Address(text.split("%")[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved or ip.is_site_local or ip.ipv4_mapped is not None
                or ip in _ULA)


_ULA = ipaddress.IPv6Network("fc00::/7")
#: Flags of /proc/net/if_inet6 that make an address unusable: tentative
#: (DAD not done), deprecated, DAD failed.
_IFA_UNUSABLE = 0x40 | 0x20 | 0x08


def global_ipv6(target=IPV6_PROBE_TARGET, if_inet6="/proc/net/if_inet6"):
    """
    This host's global IPv6 address, or None: the source address towards
    C{target} when a route leads there; else (a network without a default
    route, as the NAT lab's) the first usable global address in Linux's
    C{if_inet6} table.  Nothing is sent.
    """
    try:
        found = source_address(target)
        if _usable_ipv6(found):
            return found
    except OSError:
        pass
    try:
        with open(if_inet6) as f:
            rows = [line.split() for line in f]
    except OSError:
        return None
    for row in rows:
        # address, interface index, prefix length, scope (0: global), flags, name
        if len(row) < 6 or int(row[3], 16) != 0 or int(row[4], 16) & _IFA_UNUSABLE:
            continue
        text = str(ipaddress.IPv6Address(bytes.fromhex(row[0])))
        if _usable_ipv6(text):
            return text
    return None


def discover(reactor, servers, *, interface=None, **options):
    """
    Run discovery against the lobby addresses ``servers`` (``(ip, port)``
    pairs, the primary first) with real UDP sockets bound to ``interface``
    (default: :func:`source_address` of the primary); a Deferred firing
    with a :class:`DiscoveryResult`.  ``options`` as for :class:`Discovery`.
    """
    servers = [tuple(s) for s in servers]
    if interface is None:
        interface = source_address(servers[0])

    def listen(proto):
        return reactor.listenUDP(0, proto, interface=interface)

    return Discovery(servers, reactor, listen, **options).run()


def parse_nat(text):
    """
    The NAT given as ``MAPPING/ALLOCATION[/STEP[/RATE]]`` (the ``--nat`` of
    ``p2pnat peer``), as a :class:`p2pnat.protocol.p2p.NatInfo` with
    unknown filtering.  A sequential allocation without a step has step 1.

    :raises ValueError: with a message that names the expected form.
    """
    form = (f"--nat: expected MAPPING/ALLOCATION[/STEP[/RATE]] with MAPPING in"
            f" {', '.join(MAPPINGS)} and ALLOCATION in {', '.join(ALLOCATIONS)}")
    parts = text.split("/")
    if not 2 <= len(parts) <= 4 or parts[0] not in MAPPINGS or parts[1] not in ALLOCATIONS:
        raise ValueError(form)
    try:
        step = int(parts[2]) if len(parts) > 2 else (1 if parts[1] == "sequential" else 0)
        rate = float(parts[3]) if len(parts) > 3 else 0.0
    except ValueError:
        raise ValueError(f"{form}; STEP a whole number, RATE a number, got {text!r}") from None
    # The bounds of the wire's NatInfo (a signed 16-bit step, rate in tenths).
    if not -32768 <= step <= 32767 or not 0 <= rate <= 6553.5:
        raise ValueError(f"--nat: STEP must be -32768..32767 and RATE 0..6553.5, got {text!r}")
    return NatInfo(parts[0], "unknown", parts[1], step, rate)


def discover_nat(reactor, servers, *, interface=None, given=None, **options):
    """
    This host's NAT as the lobby and the peer are told of it: C{given}
    (``MAPPING/ALLOCATION[/STEP[/RATE]]``, see :func:`parse_nat`) unless it
    is None, which sends nothing, else measured by :func:`discover` against
    the lobby addresses C{servers}.  A Deferred firing with a
    :class:`p2pnat.protocol.p2p.NatInfo`; it fails with ValueError for a
    malformed C{given}.
    """
    if given is not None:
        return defer.maybeDeferred(parse_nat, given)
    return discover(reactor, servers, interface=interface, **options).addCallback(to_nat_info)


def to_nat_info(found):
    """
    What the lobby and the peer are told of a :class:`DiscoveryResult` (or
    a :class:`NatBehaviour`): the wire's
    :class:`p2pnat.protocol.p2p.NatInfo`.
    """
    b = getattr(found, "behaviour", found)
    return NatInfo(b.mapping, b.filtering, b.allocation, b.step or 0, b.rate or 0.0)


# --- command line ---------------------------------------------------------------


def _address(text):
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        portnum = int(port)
        if not 0 < portnum < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    try:
        info = socket.getaddrinfo(host, portnum, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError(f"{host}: {e.strerror}") from None
    return info[0][4][0], portnum


def main(argv=None):
    """
    ``python -m p2pnat.peer.discovery LOBBY_ADDR...``: run discovery and
    print the NAT behaviour as one JSON line.  Exits with status 0, or 1
    when the lobby did not answer.
    """
    parser = argparse.ArgumentParser(
        prog="python -m p2pnat.peer.discovery",
        description="Discover how this host's NAT maps, filters and allocates UDP ports, "
        "using the STUN service of a p2pnat lobby (or any RFC 5780 STUN server). "
        "Give the primary address first, e.g. 198.18.1.1:3478 198.18.1.1:3479 "
        "(a lobby with two IPs: also 198.18.1.2:3478 198.18.1.2:3479).")
    parser.add_argument("servers", nargs="+", type=_address, metavar="LOBBY_ADDR")
    parser.add_argument("--bind", help="local IP to send from (default: the route's source)")
    parser.add_argument("--sockets", type=int, default=4,
                        help="fresh sockets per allocation burst (default: 4)")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds between the two bursts (default: 0.5)")
    parser.add_argument("--observations", action="store_true",
                        help="include every probe in the output")
    args = parser.parse_args(argv)
    if not 1 <= args.sockets <= 64 or not 0 <= args.pause <= 5:
        parser.error("--sockets must be 1-64 and --pause 0-5 seconds")
    try:
        interface = args.bind or source_address(args.servers[0])
    except OSError as e:
        parser.exit(1, f"discovery: no route to {args.servers[0][0]}: {e.strerror}\n")

    async def run(reactor):
        result = await discover(reactor, args.servers, interface=interface, sockets=args.sockets,
                                pause=args.pause)
        print(json.dumps(result.to_json(args.observations)), flush=True)
        if result.behaviour.public is None:
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
