# -*- test-case-name: tests.unit.test_direct,tests.process.test_forward_direct -*-
"""
Direct-first connections to a device's service: the terminal's side
(``p2pnat forward``, the ``p2pnat:`` endpoint's device form).

Each connect (L{DirectFirstEndpoint.connect}):

1. learns the terminal's UDP mapping from a STUN Binding to the relay's
   UDP port, from the process's L{DirectSocket} (one UDP socket per
   address family: a Binding per family of the relay's UDP addresses),
   while the TLS connection to the relay's terminal port comes up (in
   parallel, so it costs no round trip); the Binding's round trip is the
   RTT to the relay;
2. sends ``CONNECT DEVICE[:SERVICE]`` as ever, with ``P2P-Direct:
   IP:PORT`` (the mapping of the family the TLS connection took) when it
   has one;
3. on the relay's 103 or 200, whose ``P2P-Direct: IP:PORT; secret=HEX``
   gives the device's mapping and a single-use secret, opens a QUIC
   connection to the device from the same socket (its Initial also opens
   our NAT; its first flight is sent again a few times within about one
   RTT, L{first_flight_schedule}, in case it came before the device's
   punch),
   checks the device's certificate (the deployment's CA, ``device:ID``),
   and opens one stream that starts with the secret, followed in the same
   flight by what the caller's application wrote so far (an
   L{EarlyBytes}, optional).  The device answers one byte once the stream
   reaches its service, then the service's bytes;
4. if that byte comes within the budget, L{budget} (max(0.5 s, 4 × the
   RTT), counted from the 200), the application's protocol is connected
   to the QUIC stream and the relayed connection is closed; otherwise the
   relayed connection, held meanwhile (read paused: the device's bytes
   wait in the kernel), serves as it always did, the application's early
   bytes sent on it first, and the QUIC attempt is dropped;
5. the QUIC connection outlives a stream that ended well by
   L{REUSE_IDLE} seconds (L{DirectSocket.park}): the next connection to
   the device opens its stream on it without a handshake.

The application sees no difference but speed: its protocol is connected
once, to one transport or the other, and its early bytes reach the
service once (the device hands them on only after accepting, and the
terminal then takes the direct path).  C{on_path} tells which path each
connection took.  Without a direct answer (a relay that predates
it, a device that does not take direct sessions, no STUN answer) the
relayed connection serves at once, as before.
"""


import os

from twisted.internet import defer, error, interfaces
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from p2pnat.daemon.logs import Logger
from p2pnat.net.resolve import resolve_all
from p2pnat.net.streams import OneShotFactory
from p2pnat.peer import endpoint as E
from p2pnat.protocol import stun, wire
from p2pnat.quic import Credentials, QuicSocket, is_quic
from p2pnat.quic import connection as _connection

#: The relay's UDP (notify and STUN) port when none is given.
DEFAULT_UDP_PORT = 7478
#: The budget's floor, seconds (L{budget}).
MIN_BUDGET = 0.5
#: The budget in RTTs to the relay (L{budget}).
BUDGET_RTTS = 4
#: Seconds after which the STUN Binding is given up (CONNECT goes without P2P-Direct).
STUN_TIMEOUT = 1.0
#: Seconds after the first Binding at which it is sent again.
STUN_RESENDS = (0.25, 0.5)
#: QUIC connections the terminal's socket holds at once.
MAX_CONNECTIONS = 64
#: Seconds a QUIC connection to a device stays open after its stream ended,
#: for the next connection to the same device (L{DirectSocket.park}).
REUSE_IDLE = 10.0
#: Bytes of the application's a connect holds before the path is chosen (L{EarlyBytes}).
EARLY_LIMIT = 65536
#: When the first flight of a new QUIC connection to a device is sent again,
#: in RTTs to the relay after it (L{first_flight_schedule}).
FLIGHT_COPIES = (0.25, 0.5, 1.0)
#: The shortest gap between two copies of the first flight, seconds.
FLIGHT_GAP = 0.002
#: Datagrams of a first flight that are copied at most (a ClientHello takes one).
FLIGHT_DATAGRAMS = 2
#: The bounds of a new QUIC connection's initial RTT, seconds (L{initial_rtt}):
#: aioquic's default is the upper one.
INITIAL_RTT = (0.025, 0.1)
SERVICE = wire.DIRECT_SERVICE
ACCEPTED = wire.DIRECT_ACCEPTED


def budget(rtt):
    """How long to wait for the direct stream after the 200: max(0.5 s, 4 × C{rtt})."""
    return max(MIN_BUDGET, BUDGET_RTTS * rtt) if rtt is not None else MIN_BUDGET


def first_flight_schedule(rtt):
    """
    Seconds after a new QUIC connection's first flight at which it is sent
    again (L{FLIGHT_COPIES} RTTs to the relay, at least L{FLIGHT_GAP}
    apart; aioquic's initial RTT when none was measured).

    Why: the terminal's first packet may reach the device's NAT just before
    the device's punch (which left at about the same time, on the relay's
    word) opened it, and QUIC would send it again only after its probe
    timeout, twice the initial RTT.  The punch is late by at most about the
    relay's one-way delay to the device, which the terminal's RTT to the
    relay stands for.
    """
    rtt = INITIAL_RTT[1] if rtt is None else rtt
    delays, last = [], 0.0
    for factor in FLIGHT_COPIES:
        last = max(factor * rtt, last + FLIGHT_GAP)
        delays.append(last)
    return tuple(delays)


def initial_rtt(rtt):
    """
    A new QUIC connection's initial RTT (its first probe timeout is twice
    that) from C{rtt}, the RTT measured to the relay: within L{INITIAL_RTT}.
    """
    low, high = INITIAL_RTT
    return high if rtt is None else min(high, max(low, rtt))


def request_header(addr):
    """The CONNECT's header line asking for a direct session from UDP mapping C{addr}."""
    return f"P2P-Direct: {wire.format_addr(addr)}"


def parse_offer(head):
    """
    The relay's direct offer in the head of its 200 answer (bytes up to the
    blank line): ``((host, port), secret)``, or None when there is none or
    it is malformed (the relayed path serves).
    """
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name.strip().lower() != b"p2p-direct":
            continue
        try:
            text = value.decode("ascii")
            where, _, rest = text.strip().partition(";")
            key, _, hexed = rest.strip().partition("=")
            if key.strip() != "secret":
                return None
            secret = bytes.fromhex(hexed.strip())
            host, port = _hostport(where.strip())
        except (ValueError, UnicodeDecodeError):
            return None
        if len(secret) != wire.SECRET_LEN:
            return None
        return (host, port), secret
    return None


def _hostport(text):
    import ipaddress

    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("no port")
    host = str(ipaddress.ip_address(host))
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError("port")
    return host, port


class EarlyBytes:
    """
    What the application wrote before the path was chosen, so that the
    direct stream can carry it in its first flight (after the secret) and
    the relayed connection can replay it if the direct path is not taken.
    At most about L{EARLY_LIMIT} bytes: L{write} says when the writer must
    pause (its kernel then holds the rest, as before).
    """

    def __init__(self, limit=EARLY_LIMIT):
        self.limit = limit
        self.data = b""
        self.listener = None  # also sends each write on (the direct stream, optimistically)

    def write(self, data):
        """Hold C{data}; False once the writer should stop reading until the choice."""
        self.data += data
        if self.listener is not None:
            self.listener(data)
        return len(self.data) < self.limit


def gather(deferreds):
    """A Deferred firing (with None) once every one of C{deferreds} has fired."""
    return defer.DeferredList([d.addErrback(lambda f: None) for d in deferreds]).addCallback(
        lambda _: None)


class History:
    """
    Which devices the direct path failed to lately (pure: the clock is
    given): a connection to such a device skips it, so it does not wait
    out the budget again.  The skip lasts C{first} seconds after a
    failure, twice as long after each further one, at most C{longest};
    a direct success forgets the device.
    """

    def __init__(self, clock, first=60.0, longest=900.0, limit=4096):
        self.clock = clock
        self.first = first
        self.longest = longest
        self.limit = limit
        self._failed = {}  # device -> (skip until, last skip length)

    def skip(self, device):
        entry = self._failed.get(device)
        return entry is not None and self.clock.seconds() < entry[0]

    def failed(self, device):
        last = self._failed.pop(device, (0, 0))[1]
        length = min(self.longest, 2 * last) if last else self.first
        if len(self._failed) >= self.limit:
            del self._failed[next(iter(self._failed))]
        self._failed[device] = (self.clock.seconds() + length, length)

    def worked(self, device):
        self._failed.pop(device, None)


class _TerminalConnection(_connection.PeerConnection):
    """
    The terminal's side of a direct QUIC connection: it checks the
    device's certificate and presents none (the secret is its proof, and
    the device's acceptance byte its answer), so it is up as soon as its
    handshake is complete, not one round trip later at the device's
    HANDSHAKE_DONE (which a client waits for where the server checks its
    certificate).
    """

    @property
    def handshake_confirmed(self):
        complete = getattr(self, "_handshake_complete", None)
        if complete is None:  # an aioquic without it: wait for HANDSHAKE_DONE, as peers do
            return super().handshake_confirmed
        return complete and self.peer_identity is not None


class _FirstFlight:
    """
    The first datagrams a new QUIC connection sends to C{addr}, sent again
    as they are at C{schedule} (seconds after the connect) until the peer
    answers (L{_TerminalQuicSocket.datagramReceived}): at most
    L{FLIGHT_DATAGRAMS} datagrams, each copy no bigger than the flight.
    """

    def __init__(self, sock, addr, schedule):
        self.sock = sock
        self.addr = addr
        self.datagrams = []
        self.collecting = True
        self.calls = [sock.clock.callLater(t, self._again) for t in schedule]

    def sent(self, data):
        if self.collecting and len(self.datagrams) < FLIGHT_DATAGRAMS:
            self.datagrams.append(data)

    def _again(self):
        self.collecting = False  # what QUIC sends later is its own to repeat
        for data in self.datagrams:
            QuicSocket.write(self.sock, data, self.addr)
        if not any(call.active() for call in self.calls):
            self.stop()

    def stop(self):
        for call in self.calls:
            if call.active():
                call.cancel()
        if self.sock._flights.get(self.addr) is self:
            del self.sock._flights[self.addr]


class _TerminalQuicSocket(QuicSocket):
    """
    A L{QuicSocket} whose client connections are L{_TerminalConnection}s,
    with an initial RTT and copies of their first flight from the RTT
    measured to the relay (L{connect}'s C{rtt}).
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._flights = {}  # peer address -> its connection's _FirstFlight
        self._rtt = None

    def connect(self, addr, peer, *, rtt=None, **options):
        """
        L{QuicSocket.connect}; C{rtt}, the RTT to the relay (seconds, or
        None), sets the connection's initial RTT (L{initial_rtt}) and when
        its first flight is sent again (L{first_flight_schedule}).
        """
        addr = tuple(addr)
        self._rtt = rtt
        try:
            d = super().connect(addr, peer, **options)
        finally:
            self._rtt = None
        old = self._flights.pop(addr, None)
        if old is not None:
            old.stop()
        self._flights[addr] = _FirstFlight(self, addr, first_flight_schedule(rtt))
        return d

    def _connection(self, *, is_client, expected, **kw):
        config = _connection.make_configuration(
            self.credentials, is_client=is_client, idle_timeout=self.idle_timeout,
            stream_window=self.stream_window)
        config.connection_id_length = 8
        config.initial_rtt = initial_rtt(self._rtt)
        return _TerminalConnection(
            configuration=config, credentials=self.credentials, expected=expected,
            clock=self.clock, stream_window=self.stream_window, **kw)

    def write(self, data, addr):
        flight = self._flights.get(tuple(addr))
        if flight is not None:
            flight.sent(data)
        super().write(data, addr)

    def datagramReceived(self, data, addr):
        flight = self._flights.get(tuple(addr[:2]))
        if flight is not None and is_quic(data):
            flight.stop()  # the device answered: QUIC's own recovery from here
        super().datagramReceived(data, addr)

    def stop_flights(self):
        """Send no more copies (the socket is closing)."""
        for flight in list(self._flights.values()):
            flight.stop()


class _Family:
    """One address family's UDP socket of a L{DirectSocket}: its QUIC socket and port."""

    def __init__(self, quic, interface):
        self.quic = quic
        self.interface = interface
        self.port = None


def family(host):
    """6 for an IPv6 address (not an IPv4-mapped one), else 4."""
    return 6 if ":" in host and not host.lower().startswith("::ffff:") else 4


class DirectSocket:
    """
    The terminal's UDP sockets for direct sessions, one per address family
    and process: STUN Bindings to the relay (our mapping, the RTT) and the
    QUIC connections to devices, all from the one port of the family (so
    the mapping the relay saw is the one the device punches to).  Each is
    opened on first use and closed once unused; L{stop} closes them.

    @param ca_certs: the deployment's CA certificates: a device's QUIC
        certificate must chain to one of them.
    @param interface: the IPv4 socket's address; C{interface6} the IPv6 one's.
    """

    log = Logger(namespace="p2pnat.direct")

    def __init__(self, reactor, ca_certs, interface="0.0.0.0", interface6="::"):
        self.reactor = reactor
        credentials = Credentials(None, None, tuple(ca_certs))
        self.families = {
            fam: _Family(_TerminalQuicSocket(reactor, credentials, other=self._other,
                                             max_connections=MAX_CONNECTIONS), where)
            for fam, where in ((4, interface), (6, interface6))}
        self._bindings = {}  # transaction ID -> (Deferred, sent at)
        #: The devices the direct path failed to lately, and the relays'
        #: UDP addresses that did not answer STUN (L{History}).
        self.history = History(reactor)
        self.users = 0
        self._parked = {}  # (device ID, address) -> (QuicEndpoint, its closing call)

    def start(self, fam=4):
        """
        The port of address family C{fam} (4 or 6), opened if need be.

        @raise twisted.internet.error.CannotListenError: the host has no
            such family (an IPv4-only host asked for IPv6, say).
        """
        found = self.families[fam]
        if found.port is None:
            found.port = self.reactor.listenUDP(0, found.quic, interface=found.interface)
        return found.port

    def acquire(self):
        """A connect attempt uses the sockets until L{release}."""
        self.users += 1

    def release(self):
        """
        An attempt is done with the sockets: each is closed once no attempt
        and no QUIC connection uses it (a process that forwards nothing
        holds no UDP port; the next attempt opens a new one and asks STUN
        again).
        """
        self.users = max(0, self.users - 1)
        self._maybe_close()

    def _maybe_close(self):
        if self.users:
            return
        for found in self.families.values():
            if found.port is not None and not found.quic.endpoints:
                found.quic.stop_flights()
                port, found.port = found.port, None
                port.stopListening()

    def stop(self):
        """
        Close every QUIC connection, then the sockets: a Deferred that fires
        once their draining periods are over and the sockets are closed.
        """
        closing = [e.closed for f in self.families.values() for e in f.quic.endpoints]
        for _, call in self._parked.values():
            if call.active():
                call.cancel()
        self._parked.clear()
        for found in self.families.values():
            found.quic.stop_flights()
            found.quic.close_all("terminal stopping")
        for d, _ in list(self._bindings.values()):
            if not d.called:
                d.cancel()

        def close(_):
            for found in self.families.values():
                port, found.port = found.port, None
                if port is not None:
                    port.stopListening()

        return gather(closing).addCallback(close)

    def mapping(self, relay_udp):
        """
        A Deferred firing with C{(mapped (host, port), rtt seconds)} from a
        STUN Binding to C{relay_udp} (an IP address and port), sent again
        at L{STUN_RESENDS}; it fails with L{defer.TimeoutError} after
        L{STUN_TIMEOUT}.
        """
        fam = family(relay_udp[0])
        try:
            self.start(fam)
        except error.CannotListenError as e:
            return defer.fail(e)
        found = self.families[fam]
        tid, request = stun.binding_request()
        sent = [self.reactor.seconds()]
        calls = []

        def send():
            if found.port is None:
                return
            sent[0] = self.reactor.seconds()  # the RTT of the copy answered, roughly
            try:
                found.port.write(request, relay_udp)
            except (OSError, error.MessageLengthError) as e:
                self.log.debug("STUN to {addr} not sent: {error}",
                               addr=wire.format_addr(relay_udp), error=e)

        def done(result):
            self._bindings.pop(tid, None)
            for call in calls:
                if call.active():
                    call.cancel()
            return result

        d = defer.Deferred()
        self._bindings[tid] = (d, sent)
        send()
        calls.extend(self.reactor.callLater(t, send) for t in STUN_RESENDS)
        d.addTimeout(STUN_TIMEOUT, self.reactor)
        return d.addBoth(done)

    def _other(self, data, addr):
        if not data or not stun.is_stun(data[0]) or len(data) < 20:
            return  # a device's punch, or noise
        tid = bytes(data[8:20])
        entry = self._bindings.get(tid)
        if entry is None:
            return
        try:
            result = stun.parse_binding_response(data, tid)
        except stun.StunError:
            return
        d, sent = entry
        if not d.called:
            d.callback((result.mapped, self.reactor.seconds() - sent[0]))

    def connect(self, addr, device_id, timeout, rtt=None):
        """
        QUIC to the device C{device_id} at C{addr}: a Deferred of the
        L{QuicEndpoint}, the one L{park}ed for them if there is one (no
        handshake then: the stream's secret goes at once).  C{rtt}, the RTT
        measured to the relay, paces a new connection's first attempts
        (L{_TerminalQuicSocket.connect}).
        """
        fam = family(addr[0])
        try:
            self.start(fam)
        except error.CannotListenError as e:
            return defer.fail(e)
        parked = self._parked.pop((device_id, tuple(addr)), None)
        if parked is not None:
            endpoint, call = parked
            if call.active():
                call.cancel()
            if not endpoint.closed.called and not endpoint.silent:
                return defer.succeed(endpoint)
            endpoint.close("not reused")
        quic = self.families[fam].quic
        before = quic.endpoints
        d = quic.connect(addr, f"device:{device_id}", rtt=rtt, handshake_timeout=timeout)
        for endpoint in quic.endpoints - before:
            endpoint.closed.addBoth(lambda _: self._maybe_close())
        return d


    def park(self, endpoint, device_id, addr):
        """
        The direct stream on C{endpoint} (to C{device_id} at C{addr}) ended
        well: keep the connection L{REUSE_IDLE} seconds for the next
        connection to that device (its device certificate was checked;
        each stream still presents its own single-use secret), then close
        it.  At most one is kept per device and address.
        """
        key = (device_id, tuple(addr))
        if (key in self._parked or endpoint.closed.called
                or self.families[family(addr[0])].port is None):
            endpoint.close("stream done")
            return
        call = self.reactor.callLater(REUSE_IDLE, self._unpark, key, endpoint)
        self._parked[key] = (endpoint, call)
        endpoint.closed.addBoth(lambda _: self._unpark(key, endpoint, close=False))

    def _unpark(self, key, endpoint, close=True):
        entry = self._parked.get(key)
        if entry is not None and entry[0] is endpoint:
            del self._parked[key]
            if entry[1].active():
                entry[1].cancel()
        if close:
            endpoint.close("idle")


class Direct:
    """
    How an endpoint goes direct: the process's L{DirectSocket} and the
    relay's UDP address (an IP literal and a port, or a host name the
    reactor resolves).
    """

    def __init__(self, socket, relay_udp):
        self.socket = socket
        self.relay_udp = relay_udp

    def relay_addresses(self, reactor):
        """
        A Deferred of the relay's UDP addresses to ask STUN: C{(ip, port)}
        pairs, at most one per address family, IPv6 first (a host name's
        addresses as C{reactor}'s name resolver gives them; none when it
        cannot be resolved).
        """
        host, port = self.relay_udp
        if _is_ip(host):
            return defer.succeed([(host, port)])
        resolver = getattr(reactor, "nameResolver", None)
        if resolver is None:  # a reactor without IReactorPluggableNameResolver: IPv4 only
            d = defer.maybeDeferred(reactor.resolve, host).addCallback(lambda ip: [ip])
        else:
            d = resolve_all(reactor, host, port)
        return d.addCallbacks(lambda ips: _one_per_family(ips, port), lambda f: [])


def _one_per_family(ips, port):
    """The first of C{ips} of each family, IPv6 first, as C{(ip, port)}."""
    first = {}
    for ip in ips:
        first.setdefault(family(ip), ip)
    return [(first[fam], port) for fam in (6, 4) if fam in first]


def _peer_family(transport):
    """The address family (4 or 6) of the relay connection C{transport}'s peer."""
    try:
        host = transport.getPeer().host
    except AttributeError:
        return 4
    return family(host) if isinstance(host, str) else 4


def _is_ip(host):
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(interfaces.IHalfCloseableProtocol)
class _Probe(E.PassesHalfClose, Protocol):
    """
    The direct stream: sends the secret and, in the same flight, what the
    application wrote so far (C{sent}, an L{EarlyBytes}: optimistic, the
    device hands it to the service only once it accepted the stream),
    waits for the device's acceptance byte, then passes everything to the
    application's protocol (L{bind}) as its transport's protocol would.
    """

    def __init__(self, attempt, secret, sent=None):
        self.attempt = attempt
        self.secret = secret
        self.sent = sent
        self.optimistic = False  # application bytes went on this stream
        self.accepted = False
        self.app = None
        self.early = b""

    def connectionMade(self):
        first = self.secret
        if self.sent is not None:
            first += self.sent.data
            self.sent.listener = self._more
        self.optimistic = len(first) > len(self.secret)
        self.transport.write(first)

    def _more(self, data):
        if self.transport is not None and not self.accepted:
            self.optimistic = True
            self.transport.write(data)

    def detach(self):
        """The path is chosen: the application's later bytes go to its transport."""
        if self.sent is not None and self.sent.listener == self._more:
            self.sent.listener = None

    def dataReceived(self, data):
        if self.app is not None:
            return self.app.dataReceived(data)
        if not self.accepted:
            if data[:1] != ACCEPTED:
                self.transport.abortConnection()
                return
            self.accepted = True
            data = data[1:]
            self.attempt.direct_ready(self)
            if self.app is not None:
                if data:
                    self.app.dataReceived(data)
                return
        self.early += data

    def bind(self, app):
        self.app = app
        app.makeConnection(self.transport)
        early, self.early = self.early, b""
        if early:
            app.dataReceived(early)

    def connectionLost(self, reason):
        self.detach()
        endpoint = self.transport.endpoint if self.transport is not None else None
        if self.app is not None:
            self.app.connectionLost(reason)
            if endpoint is not None:
                # Kept a while for the next connection to the device: it
                # then needs no handshake.
                self.attempt.direct.socket.park(endpoint, self.attempt.ep.device,
                                                self.attempt.offer[0])
            return
        self.attempt.direct_failed(reason.getErrorMessage())
        if endpoint is not None:
            endpoint.close("stream done")


@implementer(interfaces.IHalfCloseableProtocol)
class _Handshake(E._RelayHandshake):
    """
    The relayed connection of one direct-first attempt: L{E._RelayHandshake}
    that waits for our mapping before its CONNECT, and hands the 200 to
    the attempt, which picks the path.
    """

    def __init__(self, attempt):
        super().__init__(attempt.factory, b"", attempt.result, attempt.target)
        self.attempt = attempt
        self.held = b""
        self.choosing = False

    def connectionMade(self):
        from p2pnat.net.streams import nodelay

        nodelay(self.transport)
        self.attempt.relay_connected(self)

    def send_request(self, request):
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.write(request)

    def dataReceived(self, data):
        if self.app is not None:
            return self.app.dataReceived(data)
        if self.choosing:
            self.held += data
            return
        if self.result.called and not self.attempt.chosen == "direct":
            return
        self.buf += data
        while True:
            try:
                answer = E.connect_answer(self.buf)
            except E.AnswerTooLong as e:
                return self._fail(str(e))
            if answer is None:
                return
            line, ok, rest = answer
            head = self.buf[:len(self.buf) - len(rest)]
            self.buf = rest
            code = line.split(" ", 2)[1:2]
            if code and len(code[0]) == 3 and code[0].startswith("1"):
                # Interim (103 Early Hints with the direct offer): the final one follows.
                self.attempt.early(parse_offer(head))
                continue
            break
        self.buf = b""
        if self.attempt.chosen == "direct":
            # The direct path serves already; this stream is not needed.
            self.app = _Discard()
            self.transport.loseConnection()
            return
        if not ok:
            self.attempt.relay_refused()
            return self._fail(f"the relay refused: {line}")
        self.held = rest
        self.choosing = True
        self.attempt.answered(self, parse_offer(head))

    def use(self):
        """The relayed path is chosen: connect the application here."""
        self.choosing = False
        if self.transport is None or self.result.called:
            return
        self.app = self.factory.buildProtocol(self.transport.getPeer())
        if self.app is None:
            self.transport.loseConnection()
            return self.result.errback(error.ConnectingCancelledError(self.transport.getPeer()))
        sent = self.attempt.sent
        if sent is not None and sent.data:
            # What the application wrote while we chose; the direct stream
            # that may have carried it too was refused or reset unaccepted.
            self.transport.write(sent.data)
            sent.data = b""
        self.app.makeConnection(self.transport)
        self.transport.resumeProducing()
        self.result.callback(self.app)
        held, self.held = self.held, b""
        if held and self.app is not None:
            self.app.dataReceived(held)

    def connectionLost(self, reason):
        if self.choosing:
            self.choosing = False
            self.attempt.relay_lost()
            return
        super().connectionLost(reason)


class _Attempt:
    """One direct-first connect (see the module)."""

    log = Logger(namespace="p2pnat.direct")

    def __init__(self, endpoint, factory, result, sent=None):
        self.ep = endpoint
        #: The application's bytes written before the choice (L{EarlyBytes}), or None.
        self.sent = sent
        self.clock = endpoint.clock
        self.factory = factory
        self.result = result
        self.target = f"device {endpoint.target}"
        self.relay = None
        self.direct = endpoint.direct
        if self.direct is not None and self.direct.socket.history.skip(endpoint.device):
            self.direct = None  # it failed lately: the relayed path at once
        #: Address family -> the STUN Binding's answer: None while it is
        #: asked, False when none came (one Binding per family of the relay's
        #: UDP addresses; the one of the relay connection's family is used).
        self.bindings = {}
        self.binding_addrs = {}  # address family -> the relay's UDP address asked
        self.resolving = self.direct is not None
        self.requested = False  # the CONNECT went
        self.family = None  # of the relay connection, once it is up
        self.started = self.clock.seconds()
        self.stun_wait = None
        self.stun = []  # Deferreds: the name resolution, the Bindings
        self.offer = None
        self.probe = None
        self.quic = None
        self.timer = None
        self.chosen = None
        self.final = False  # the relay's final answer (200) came
        self.failed = None  # why the direct attempt failed before it
        self.marks = []  # (phase, seconds since the start): where the time went

    def mark(self, phase):
        self.marks.append((phase, self.clock.seconds() - self.started))

    def start(self):
        if self.direct is not None:
            socket = self.direct.socket
            socket.acquire()
            self.result.addBoth(self._done, socket)
            d = self.direct.relay_addresses(self.clock)
            self.stun.append(d)
            d.addCallback(self._bind)
        return self.ep.relay.connect(OneShotFactory(_Handshake(self)))

    def _bind(self, addrs):
        """Ask STUN at each of the relay's UDP addresses C{addrs} that answered lately."""
        if not self.resolving:
            return  # given up waiting (relay_connected), or over
        self.resolving = False
        history = self.direct.socket.history
        for addr in addrs:
            if history.skip(("stun", addr)):
                continue  # no answer lately: each wait costs a round trip
            fam = family(addr[0])
            self.bindings[fam] = None
            self.binding_addrs[fam] = addr
            d = self.direct.socket.mapping(addr)
            self.stun.append(d)
            d.addCallbacks(self._mapped, self._unmapped, callbackArgs=(fam, addr),
                           errbackArgs=(fam, addr))
        self._maybe_request()

    @property
    def mapping_done(self):
        """Whether the CONNECT may go: no direct path, or the relay family's Binding is over."""
        if self.direct is None:
            return True
        if self.resolving or self.family is None:
            return False
        return self.bindings.get(self.family, False) is not None

    @property
    def mapped(self):
        """Our UDP mapping of the relay connection's family, or None."""
        found = self.bindings.get(self.family) if self.direct is not None else None
        return found[0] if found else None

    @property
    def rtt(self):
        """The RTT to the relay its Binding measured, or None."""
        found = self.bindings.get(self.family) if self.direct is not None else None
        return found[1] if found else None

    def _done(self, result, socket):
        """The connect fired (or failed): no timer of ours outlives it."""
        self._stop_stun()
        if self.chosen is None:
            self.chosen = "failed"
            self._cancel_timer()
            self._drop_direct()
        socket.release()
        return result

    def _stop_stun(self):
        if self.stun_wait is not None and self.stun_wait.active():
            self.stun_wait.cancel()
        for d in self.stun:
            d.cancel()  # a fired one ignores it

    def _mapped(self, found, fam, addr):
        if self.bindings.get(fam) is not None:
            return  # given up waiting (relay_connected)
        self.direct.socket.history.worked(("stun", addr))
        self.bindings[fam] = found
        self._maybe_request()

    def _unmapped(self, failure, fam, addr):
        if self.bindings.get(fam) is not None:
            return
        if failure is not None and failure.check(defer.CancelledError):
            self.bindings[fam] = False  # the attempt is over
            return
        why = "no STUN answer" if failure is None else failure.getErrorMessage()
        self.log.info("{target}: no UDP mapping from the relay's {udp} ({why})",
                      target=self.target, udp=wire.format_addr(addr),
                      why=why or "no STUN answer")
        # Asked again only after a while (History): each wait costs a round trip.
        self.direct.socket.history.failed(("stun", addr))
        self.bindings[fam] = False
        self._maybe_request()

    def _give_up_stun(self):
        """The relay connection's Binding is late: the CONNECT goes without it."""
        self.stun_wait = None
        if self.resolving:
            self.resolving = False
            self.log.info("{target}: the relay's UDP address is not resolved yet; relayed",
                          target=self.target)
        elif self.family in self.bindings and self.bindings[self.family] is None:
            return self._unmapped(None, self.family, self.binding_addrs[self.family])
        self._maybe_request()

    def relay_connected(self, handshake):
        self.mark("relay")
        self.relay = handshake
        self.family = _peer_family(handshake.transport)
        if not self.mapping_done:
            # The STUN answer normally comes well before the TLS handshake is
            # over (one round trip against two): wait about one more.
            grace = min(STUN_TIMEOUT, max(0.05, (self.clock.seconds() - self.started) / 2))
            self.stun_wait = self.clock.callLater(grace, self._give_up_stun)
        self._maybe_request()

    def _maybe_request(self):
        if (self.relay is None or not self.mapping_done or self.result.called
                or self.requested):
            return
        self.requested = True
        self.resolving = False
        self._stop_stun()
        self.mark("connect")
        extra = [request_header(self.mapped)] if self.mapped is not None else []
        self.relay.send_request(E.connect_request(self.ep.device, self.ep.service,
                                                  self.ep.credential, extra))

    def early(self, offer):
        """The relay's interim answer (103) offers a direct session: start QUIC now."""
        if offer is not None and self.offer is None and self.mapped is not None:
            self._start_direct(offer)

    def _start_direct(self, offer):
        self.mark("offer")
        self.offer = offer
        wait = budget(self.rtt)
        d = self.direct.socket.connect(offer[0], self.ep.device, max(wait, 1.0) * 4, self.rtt)
        d.addCallbacks(self._quic_up, lambda f: self.direct_failed(
            f"QUIC: {f.getErrorMessage()}"))

    def answered(self, handshake, offer):
        """The relay said 200, with C{offer} (the device's mapping and the secret) or None."""
        self.final = True
        self.mark("200")
        if self.offer is None and offer is not None and self.mapped is not None:
            self._start_direct(offer)
        if self.offer is None:
            lately = self.direct is None and self.ep.direct is not None
            return self._choose("relayed", "the direct path failed lately" if lately
                                else "no direct offer")
        if self.failed is not None:
            return self._choose("relayed", self.failed)
        handshake.transport.pauseProducing()  # the device's bytes wait until we choose
        wait = budget(self.rtt)
        self.timer = self.clock.callLater(wait, self._expired, wait, 1)

    def _expired(self, wait, extra):
        """
        The budget is over.  If the application's bytes went on the direct
        stream and its QUIC connection is up, the device may be handing
        them to the service right now: wait once more for its verdict
        (accepted, refused or reset), so that they never reach the service
        on both paths; otherwise the relayed path serves.
        """
        self.timer = None
        pending = (self.probe is not None and self.probe.optimistic
                   and self.probe.transport is not None and self.chosen is None)
        if pending and extra:
            self.timer = self.clock.callLater(wait, self._expired, wait, 0)
            return
        self._choose("relayed", f"no direct stream within {wait * (2 - extra):.2f}s")

    def relay_refused(self):
        """The relay's final answer is a refusal: the direct attempt goes with it."""
        self.chosen = "failed"
        self._drop_direct()

    def _quic_up(self, endpoint):
        if self.chosen is not None:
            endpoint.close("not needed")
            return
        self.mark("quic")
        self.quic = endpoint
        self.probe = _Probe(self, self.offer[1], self.sent)
        try:
            endpoint.open_stream(SERVICE, self.probe)
        except ConnectionError as e:
            self.direct_failed(str(e))

    def direct_ready(self, probe):
        if self.chosen is not None:
            probe.transport.abortConnection()
            return
        self._choose("direct", "")

    def direct_failed(self, why):
        if self.chosen is not None:
            return
        if self.final:
            self._choose("relayed", why)
        else:
            self.failed = why  # the relayed path serves once the relay said 200

    def relay_lost(self):
        """The relay closed while we chose: only the direct path may still serve."""
        if self.chosen is None and self.probe is not None and self.probe.accepted:
            return self._choose("direct", "")
        self.chosen = "failed"
        self._cancel_timer()
        self._drop_direct()
        if not self.result.called:
            self.result.errback(E.EndpointConnectError(
                f"{self.target}: the relay closed the connection"))

    def _cancel_timer(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _drop_direct(self):
        if self.probe is not None and self.probe.transport is not None:
            self.probe.transport.abortConnection()
        elif self.quic is not None:
            self.quic.close("relayed instead")

    def _choose(self, path, why):
        if self.chosen is not None:
            return
        self.chosen = path
        self.mark(path)
        self.log.debug("{target}: {path} after {marks}", target=self.target, path=path,
                       marks=", ".join(f"{k} {t * 1000:.0f} ms" for k, t in self.marks))
        self._cancel_timer()
        if self.probe is not None:
            self.probe.detach()
        if self.result.called:  # given up meanwhile (timeout, cancel)
            self._drop_direct()
            return
        if path == "direct":
            transport = self.probe.transport
            app = self.factory.buildProtocol(transport.getPeer())
            if app is None:
                transport.loseConnection()
                self.result.errback(error.ConnectingCancelledError(transport.getPeer()))
                return
            # The relayed stream is not needed: closing it ends it at the device
            # too.  Before the relay's 200, it is closed when that comes (so the
            # device's tunnel, on its way, ends as a stream, not as a refusal).
            if self.final:
                self.relay.choosing = False
                self.relay.app = _Discard()
                self.relay.transport.loseConnection()
            self.probe.bind(app)
            self.result.callback(app)
        else:
            self._drop_direct()
            self.relay.use()
        if self.offer is not None:
            history = self.direct.socket.history
            history.worked(self.ep.device) if path == "direct" else history.failed(self.ep.device)
        self.ep.on_path(path, self.ep.target, why)


class _Discard(Protocol):
    """Takes what the relayed connection still brings after the direct path won."""

    def dataReceived(self, data):
        pass


@implementer(interfaces.IStreamClientEndpoint)
class DirectFirstEndpoint(E.DeviceEndpoint):
    """
    A device's TCP service, direct when the device can be reached over
    QUIC, else through the relay (see the module); the same contract as
    L{p2pnat.peer.endpoint.DeviceEndpoint}, whose relayed path it keeps.

    @param direct: a L{Direct}, or None for the relayed path only.
    @param on_path: called as C{on_path(path, target, why)} for each
        connection, C{path} ``"direct"`` or ``"relayed"`` (C{why} says why
        not direct).
    """

    def __init__(self, reactor, relay, device, service="", credential=None,
                 timeout=E.DEFAULT_TIMEOUT, direct=None, on_path=None):
        super().__init__(reactor, relay, device, service, credential, timeout)
        self.credential = credential
        self.direct = direct
        self.target = f"{device}:{service}" if service else device
        self.on_path = on_path or (lambda path, target, why: None)

    def __repr__(self):
        return f"<DirectFirstEndpoint {self.target}>"

    def connect(self, factory, sent=None):
        """
        L{IStreamClientEndpoint.connect}; C{sent}, an L{EarlyBytes} the
        caller fills with what its application writes before the connect
        fires, goes on the direct stream's first flight and is replayed on
        the relayed connection if that serves (the caller keeps reading
        meanwhile, pausing when L{EarlyBytes.write} says so).
        """
        attempt = None

        def cancel(result):
            if attempt.relay is not None and attempt.relay.transport is not None:
                attempt.relay.transport.abortConnection()
            else:
                connecting.cancel()
            attempt._drop_direct()

        result = defer.Deferred(cancel)
        attempt = _Attempt(self, factory, result, sent)
        connecting = attempt.start()

        def cannot(failure):
            if not result.called and not failure.check(defer.CancelledError):
                result.errback(E.EndpointConnectError(
                    f"device {self.target}: cannot reach the relay: {failure.getErrorMessage()}"))

        connecting.addErrback(cannot)

        def expired(failure):
            failure.trap(defer.TimeoutError)
            raise E.EndpointConnectError(f"device {self.target}: no answer within"
                                         f" {self.timeout:g}s")

        return result.addTimeout(self.timeout, self.clock).addErrback(expired)


#: (reactor, CA file) -> its L{DirectSocket}.
_SOCKETS = {}


def shared_socket(reactor, ca_file):
    """
    The process's L{DirectSocket} for devices of the CA in PEM file
    C{ca_file}, made on first use and closed at reactor shutdown.

    @raise p2pnat.deployment.pki.PKIError: the file is no certificate.
    """
    from p2pnat.deployment import pki

    key = (id(reactor), os.path.abspath(ca_file))
    found = _SOCKETS.get(key)
    if found is None or found.reactor is not reactor:
        found = _SOCKETS[key] = DirectSocket(reactor, (pki.load_cert(ca_file),))

        def stop():
            if _SOCKETS.get(key) is found:
                del _SOCKETS[key]
            return found.stop()

        reactor.addSystemEventTrigger("before", "shutdown", stop)
    return found


__all__ = ["DEFAULT_UDP_PORT", "Direct", "DirectFirstEndpoint", "DirectSocket", "EarlyBytes",
           "budget",
           "parse_offer", "request_header", "shared_socket"]
