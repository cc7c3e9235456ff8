# -*- test-case-name: tests.unit.test_relay_core,tests.unit.test_relay_terminal -*-
"""
The relay's core: what the terminal side and the tunnel side share.

It owns the device table, the pending sessions and the live and idle
tunnels, and sends connect requests from the socket each device's notifies
arrive at.  The protocols reach it only through L{IRelay}.
"""

import ipaddress
import os
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from p2pnat.cluster.embedded import EmbeddedState
from p2pnat.cluster.state import ClusterUnavailable, IClusterDirect
from p2pnat.daemon.logs import Logger, Throttle, redact
from p2pnat.deployment.registry import device_id_problem, verify_stored
from p2pnat.protocol import wire
from p2pnat.relay import access
from p2pnat.relay.credentials import CredentialChecker, CredentialLimits, source_of
from p2pnat.relay.devices import NEVER_SEEN, STALE, Refusal
from p2pnat.net.udp import TokenBucket
from p2pnat.relay.limits import StreamShares, TooManyStreams
from p2pnat.relay.sessions import SessionTable, TooBusy

__all__ = ["DirectOffer", "DirectLimits", "IRelay", "Relay", "Timeouts", "TooBusy", "TunnelRequest", "Unreachable",
           "CLUSTER_DOWN", "synchronous"]

#: A device live on another node while this node cannot reach the cluster's shared state.
CLUSTER_DOWN = Refusal("cluster-unavailable", 503,
                       "This relay cannot reach the cluster's shared state right now, so it"
                       " cannot reach devices connected to other relay nodes. Try again in a"
                       " few seconds.")


#: The node a device's notifies reach is not listening on the cluster (it died):
#: the device moves to another node by itself within its agent's detection bound.
OWNER_GONE = Refusal("owner-gone", 503,
                     "The relay node this device reports to is not answering. The device"
                     " will report to another node shortly: try again in a few seconds.")


class Unreachable(Exception):
    """
    A tunnel request found the device unreachable after all (in a cluster,
    once its live entry was looked up): answer the terminal with C{refusal}.
    """

    def __init__(self, refusal):
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True)
class Timeouts:
    """The relay's timeouts, in seconds (settings of ``twistd relay``)."""

    #: a terminal has this long to send its first request head (or login form)
    head: float = 30.0
    #: ... and this long to send its first byte (an idle connection costs a descriptor)
    first_byte: float = 5.0
    #: a stream that carried no byte either way this long is closed (HTTP) ...
    stream: float = 300.0
    #: ... and a CONNECT stream (SSH and other TCP services)
    tcp_stream: float = 3600.0
    #: a device's tunnel has this long to send its hello
    hello: float = 10.0
    #: a reused idle tunnel has this long to confirm an OPEN
    open: float = 2.0
    #: a terminal waits this long for the device's tunnel after its connect request
    session: float = 10.0
    #: an idle tunnel is kept this long for the device's later requests
    idle: float = 60.0


@dataclass(frozen=True)
class DirectOffer:
    """
    What the relay tells a terminal that asked for a direct session
    (L{Relay.direct_offer}): the device's address as the relay sees its
    notifies (the NAT's mapping) and the single-use secret the device
    expects as the first bytes of the terminal's QUIC stream.
    """

    device_addr: tuple
    secret: bytes


@dataclass(frozen=True)
class DirectLimits:
    """How often terminals may make the relay send a device direct requests."""

    #: offers per second from one terminal source (bursts of twice that)
    per_source: float = 2.0
    #: offers per second to one device (bursts of twice that)
    per_device: float = 5.0
    #: seconds after the first copy of a direct request that a second goes out
    resend_after: float = 0.25


#: Seconds at most that an idle tunnel waits for the owner node's answer to a
#: direct ask (a Redis round trip, a millisecond or so) before it serves.
DIRECT_HOLD = 0.5


def _plain(addr):
    """C{addr} with an IPv4-mapped IPv6 host written as IPv4 (what the device's NAT shows)."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return (host[len("::ffff:"):], addr[1])
    return (host, addr[1])


def _family(host):
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def synchronous(f, *args):
    """A C{run_blocking} that runs C{f} at once, on the calling thread (tests)."""
    return maybeDeferred(f, *args)


class IRelay(Interface):
    """What the terminal and tunnel protocols may ask of the relay and tell it."""

    clock = Attribute("the IReactorTime the protocols' timers run on")
    timeouts = Attribute("the L{Timeouts}")
    hostname = Attribute("the relay's public host name")
    tokens = Attribute("the L{p2pnat.relay.http.Tokens} signing login cookies")
    trusted_proxies = Attribute("the L{p2pnat.relay.access.TrustedProxies} that may tell"
                                " the scheme a terminal used")

    def count(outcome):
        """Count one session outcome (the p2pnat_sessions_total metric)."""

    def reachable(device_id):
        """The device's state if a terminal may reach it now, else its Refusal."""

    def device(device_id):
        """The device's state, or None."""

    def registry_record(device_id):
        """The device's registry record, or None."""

    def check_credential(device_id, given, peer):
        """
        Deferred firing with whether C{given} is the device's access
        credential, or failing with L{p2pnat.relay.credentials.NotChecked}
        when the terminal at C{peer} (``"host:port"``) must wait first.
        """

    def device_url(device_id, secure):
        """The https:// (or http://) address of the device on this relay."""

    def terminal_opened(terminal):
        """A terminal connection began."""

    def terminal_opening(terminal, device_id):
        """
        A terminal connection (whose C{source} is the address it is counted
        under, L{p2pnat.relay.limits.source_of}) asks for one of
        C{device_id}'s tunnels: None if it may hold one until it closes,
        else a L{p2pnat.relay.limits.TooManyStreams} saying why not.
        """

    def terminal_streaming(terminal, device_id):
        """A terminal connection carries C{device_id}'s data (revocation cuts it)."""

    def terminal_closed(terminal):
        """A terminal connection is gone."""

    def request_tunnel(device_id, reuse=True):
        """A L{TunnelRequest} for a tunnel to the device."""

    def direct_offer(device_id, service, terminal_addr, source, on_later=None):
        """
        A terminal at C{terminal_addr} (its UDP mapping) asks for a direct
        session to C{device_id}'s C{service}: a L{DirectOffer} once the
        device was sent a direct request, else None (the relayed path
        serves alone).  For a device live on another cluster node,
        C{on_later(offer)} may be called afterwards, once that node sent it.
        """

    def claim(session_id, device_id, nonce):
        """Bind a hello to its session: ``(session, None)`` or ``(None, error code)``."""

    def claim_early(session_id, device_id):
        """Bind a resumed handshake to its session before its hello: the session or None."""

    def tunnel_opened(tunnel, session):
        """A tunnel is bound to C{session}: hand it to the terminal waiting for it."""

    def tunnel_idle(tunnel):
        """A tunnel has no stream: keep it for the device's next request."""

    def tunnel_closed(tunnel):
        """A bound tunnel is gone."""


class TunnelRequest:
    """
    A terminal's request for a tunnel.

    @ivar ready: Deferred firing with ``(tunnel, reused)``, or failing with
        L{TooBusy}, L{p2pnat.relay.sessions.SessionTimeout} or
        L{p2pnat.relay.sessions.DeviceRevoked}.
    """

    def __init__(self, ready, cancel=None):
        self.ready = ready
        self._cancel = cancel

    def cancel(self):
        """The terminal went away: stop waiting (the session is forgotten)."""
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()


@implementer(IRelay)
class Relay:
    """
    @param devices: the L{p2pnat.relay.devices.DeviceTable}.
    @param registry: the L{p2pnat.deployment.registry.Registry}.
    @param tokens: the L{p2pnat.relay.http.Tokens} for login cookies.
    @param run_blocking: C{run_blocking(f, *args)} runs blocking work (the
        credential hash) and returns a Deferred of its result: on a small
        thread pool of its own in the daemon, L{synchronous} in tests.
    @param credential_limits: the L{CredentialLimits} (guesses, and how
        many checks may be under way; C{run_blocking} should run at most
        C{running} of them at once).
    @param tunnel_host: host name told to devices in connect requests
        (empty: the one they already use for the relay).
    @param max_streams_per_source: how many of one device's tunnels the
        terminals of one source may hold at once (0: no such limit; the
        daemon sets ``limits.streams_per_device_source``).
    @param cluster: the L{p2pnat.cluster.state.IClusterState} (default: a
        single node, L{EmbeddedState}).  In a shared cluster a device that
        is not live here may be live on another node: it is looked up when
        a terminal asks for a tunnel, and its owner sends the connect
        request (L{send_connect} on that node).
    """

    log = Logger(namespace="p2pnat.relay")

    def __init__(self, clock, metrics, devices, registry, tokens, *, hostname, tunnel_port,
                 run_blocking, timeouts=Timeouts(), tunnel_host="", https_port=443,
                 http_port=0, max_idle_per_device=8, max_sessions=10000,
                 max_sessions_per_device=64, credential_limits=CredentialLimits(),
                 trusted_proxies=access.NO_PROXIES, max_streams_per_source=0, cluster=None,
                 direct_limits=DirectLimits()):
        self.clock = clock
        self.metrics = metrics
        self.devices = devices
        self.registry = registry
        self.tokens = tokens
        # Host names are case-insensitive, and terminals' Host headers are
        # compared in lower case.
        self.hostname = hostname.lower()
        self.tunnel_port = tunnel_port
        self.tunnel_host = tunnel_host
        self.https_port = https_port
        self.http_port = http_port
        self.timeouts = timeouts
        self.trusted_proxies = trusted_proxies
        self.credentials = CredentialChecker(clock, run_blocking, verify_stored,
                                             credential_limits)
        self.sessions = SessionTable(clock, timeouts.session, limit=max_sessions,
                                     per_device=max_sessions_per_device)
        self.max_idle = max_idle_per_device
        # Terminals (by source) holding devices' tunnels: one anonymous
        # client cannot hold all of a device's agent.max_tunnels.
        self.shares = StreamShares(max_streams_per_source)
        self._throttle = Throttle(clock)
        self.terminals = set()  # open terminal connections
        self.streamed = {}  # device ID -> terminals that carried its data
        self._streamed_device = {}  # terminal -> the device ID it is in streamed under
        self.tunnels = {}  # device ID -> set of live tunnels
        self.idle = {}  # device ID -> list of idle tunnels, most recent last
        self.cluster = cluster if cluster is not None else EmbeddedState()
        # Direct sessions: which devices take direct requests (their latest
        # notify said so, wire.DIRECT_CAPABLE), and how often terminals may
        # have them sent.
        self.direct_capable = set()
        self.direct_limits = direct_limits
        self._direct_sources = TokenBucket(clock, direct_limits.per_source,
                                           max(1.0, 2 * direct_limits.per_source))
        self._direct_devices = TokenBucket(clock, direct_limits.per_device,
                                           max(1.0, 2 * direct_limits.per_device))
        self._direct_calls = set()  # second copies not sent yet
        self._direct_waits = {}  # device ID -> Deferreds of asks its owner has not answered
        if IClusterDirect.providedBy(self.cluster):
            # The owner's half of direct sessions for other nodes' terminals.
            self.cluster.serve_direct(self.serve_direct)

    # -- what the terminal side asks -------------------------------------------

    def count(self, outcome):
        self.metrics.sessions.labels(outcome).inc()

    def reachable(self, device_id):
        """
        Unknown and revoked devices are refused at once on every node (the
        registry is in every node's table).  In a shared cluster a device
        not live here may be live elsewhere: it counts as reachable until
        L{request_tunnel} looks it up.
        """
        found = self.devices.reachable(device_id, self.clock.seconds())
        if self.cluster.shared and found in (NEVER_SEEN, STALE):
            return self.devices.get(device_id)
        return found

    def device(self, device_id):
        return self.devices.get(device_id)

    def registry_record(self, device_id):
        d = self.devices.get(device_id)
        return d.record if d is not None else None

    def check_credential(self, device_id, given, peer):
        """
        Whether C{given} is the device's access credential, under the guess
        limits and the bound on checks under way of
        L{p2pnat.relay.credentials}.  The hash check (scrypt, slow on
        purpose) runs through C{run_blocking}.  A device that is unknown or
        has no credential costs the same hash, so that the time taken does
        not tell which IDs exist.

        @return: Deferred firing with a bool, or failing with
            L{p2pnat.relay.credentials.NotChecked}.
        """
        record = self.registry_record(device_id)
        stored = record.access_credential_hash if record is not None else None
        return self.credentials.check(device_id, stored, given, source_of(peer))

    def device_url(self, device_id, secure):
        port = self.https_port if secure else self.http_port
        scheme = "https" if secure else "http"
        default = 443 if secure else 80
        suffix = "" if port in (default, 0) else f":{port}"
        return f"{scheme}://{device_id}.{self.hostname}{suffix}/"

    def terminal_opened(self, terminal):
        self.terminals.add(terminal)

    def terminal_opening(self, terminal, device_id):
        source = terminal.source
        if self.shares.take(terminal, device_id, source):
            return None
        self.count("refused-stream-per-source")
        held = self._throttle(("stream-per-source", device_id))
        if held is not None:
            self.log.warn("terminal from {source} refused a tunnel to {device_id}: it holds"
                          " {n} of them, the most for one source ({held} more refused since"
                          " the last such line)", source=source, device_id=device_id,
                          n=self.shares.per_source, held=held)
        return TooManyStreams(f"{self.shares.per_source} streams to {device_id} from {source}")

    def terminal_streaming(self, terminal, device_id):
        self.streamed.setdefault(device_id, set()).add(terminal)
        self._streamed_device[terminal] = device_id

    def terminal_closed(self, terminal):
        self.terminals.discard(terminal)
        self.shares.release(terminal)
        device_id = self._streamed_device.pop(terminal, None)
        terminals = self.streamed.get(device_id)
        if terminals is not None:
            terminals.discard(terminal)
            if not terminals:
                del self.streamed[device_id]

    def request_tunnel(self, device_id, reuse=True):
        """
        A tunnel to C{device_id}: an idle one at once (``reused``), else a
        new session whose connect request is sent (and retransmitted) now.

        An idle tunnel of a device whose direct offer is being asked of its
        owner node (L{direct_offer}'s cluster half) is handed over once that
        answer came (a Redis round trip), at most L{DIRECT_HOLD} seconds
        later: the terminal's 200 goes out with the tunnel, and the offer
        belongs in it.
        """
        return self._request_tunnel(device_id, reuse, hold=True)

    def _request_tunnel(self, device_id, reuse, hold):
        idle = self.idle.get(device_id) if reuse else None
        if idle and hold and self._direct_waits.get(device_id):
            return self._after_direct_answers(device_id, reuse)
        if idle:
            t = idle.pop()
            if not idle:
                del self.idle[device_id]
            self.count("reused")
            return TunnelRequest(succeed((t, True)))
        local = self.devices.reachable(device_id, self.clock.seconds())
        if self.cluster.shared and (isinstance(local, Refusal) or local.socket is None):
            # No notify reached this node since it started: the address and
            # last access it has came from its own store, and the device may
            # report to another node now (it moved while this one was down).
            # The live entry says who owns it.
            return self._request_remote(device_id, heard_before=local is not None
                                        and not isinstance(local, Refusal))
        return self._start_session(device_id, self._send_connect)

    def _after_direct_answers(self, device_id, reuse):
        """
        L{request_tunnel}, without holding again, once the device's direct
        asks under way now are answered, or L{DIRECT_HOLD} seconds on.
        """
        ready = Deferred()
        inner = []

        def go(_=None):
            if inner:
                return
            if call.active():
                call.cancel()
            inner.append(self._request_tunnel(device_id, reuse, hold=False))
            inner[0].ready.chainDeferred(ready)

        def cancel():
            if call.active():
                call.cancel()
            if inner:
                inner[0].cancel()
            else:
                inner.append(TunnelRequest(Deferred()))  # go does nothing now

        call = self.clock.callLater(DIRECT_HOLD, go)
        waits = list(self._direct_waits[device_id])
        left = [len(waits)]

        def one(_):
            left[0] -= 1
            if left[0] == 0:
                go()

        for w in waits:
            w.addBoth(one)
        return TunnelRequest(ready, cancel)

    def _start_session(self, device_id, send):
        """A new session whose connect request C{send(session)} sends (and resends)."""
        try:
            session = self.sessions.create(device_id, send)
        except TooBusy as e:
            return TunnelRequest(fail(e))
        self.count("connect-request")
        self.metrics.active_sessions.set(len(self.sessions))

        def cancel():
            self.sessions.cancel(session.id)
            self.metrics.active_sessions.set(len(self.sessions))

        return TunnelRequest(session.ready.addCallback(lambda t: (t, False)), cancel)

    def _request_remote(self, device_id, heard_before=False):
        """
        A tunnel to a device not live on this node: its live entry names
        the node its notifies reach, which sends the connect request for a
        session of this node (the tunnel lands here, where the terminal
        waits).  Fails with L{Unreachable} when no node has it live, or the
        shared state cannot be reached.

        With C{heard_before} (this node's store has a recent notify A of the
        device, but no notify reached this process yet: it restarted) an
        entry naming this node means the device still reports here: the
        session waits for its next notify, as a single relay does after a
        restart.
        """
        ready = Deferred()
        inner = []  # the session's TunnelRequest, once located
        cancelled = []

        def cancel():
            # As for a local session: once cancelled, C{ready} never fires.
            cancelled.append(True)
            if inner:
                inner[0].cancel()

        def located(entry):
            if cancelled:  # the terminal went away meanwhile
                return
            if entry is None:
                return ready.errback(Unreachable(NEVER_SEEN))
            if entry.stale(self.clock.seconds(), self.devices.period) \
                    or (entry.node == self.cluster.node and not heard_before):
                return ready.errback(Unreachable(STALE))
            d = self.devices.get(device_id)
            if d is None or d.revoked:  # revoked while it was looked up
                return ready.errback(Unreachable(self.devices.reachable(device_id, 0)))
            if entry.node == self.cluster.node:
                request = self._start_session(device_id, self._send_connect)
            else:
                self.count("connect-forwarded")
                request = self._start_session(device_id, lambda s: forward(entry, s))
            inner.append(request)
            request.ready.chainDeferred(ready)

        def forward(entry, session):
            heard = self.cluster.forward_connect(entry, device_id, session.id, session.nonce)
            if session.sent == 0 and heard is not None:
                heard.addCallback(lambda n: n is not None and int(n) == 0
                                  and owner_gone(session))

        def owner_gone(session):
            # Nobody listens on the owner's channel: fail now, not at the
            # session's deadline.
            if cancelled or ready.called:
                return
            self.sessions.cancel(session.id)
            self.metrics.active_sessions.set(len(self.sessions))
            self.count("refused-owner-gone")
            ready.errback(Unreachable(OWNER_GONE))

        def failed(failure):
            if cancelled:
                return
            if failure.check(ClusterUnavailable):
                self.count("refused-cluster-unavailable")
                return ready.errback(Unreachable(CLUSTER_DOWN))
            ready.errback(failure)

        self.cluster.locate(device_id).addCallbacks(located, failed)
        return TunnelRequest(ready, cancel)

    def _send_connect(self, session):
        d = self.devices.get(session.device_id)
        if d is None or d.revoked or d.socket is None or d.addr is None:
            return
        self._connect_request(d, session.id, session.nonce, self.tunnel_host, self.tunnel_port,
                              session.sent == 0)

    def _connect_request(self, d, session_id, nonce, host, port, first):
        proto = d.socket
        message = wire.ConnectRequest(session_id, nonce, port, host)
        data = wire.seal(message, d.id, d.mac_key, proto.stamper())
        # The same datagram to the port-mapped address too, if any: the
        # device acts on the first copy that arrives (SeenSessions).
        for addr in d.targets():
            if first:
                self.log.debug("connect request for {device_id} to {addr}, session {sid}",
                               device_id=d.id, addr=addr, sid=redact(session_id))
            try:
                proto.send(data, addr, "ConnectRequest")
            except OSError as e:
                self.log.warn("cannot send connect request to {device_id} at {addr}: {error}",
                              device_id=d.id, addr=wire.format_addr(addr), error=e)

    # -- direct sessions -------------------------------------------------------------

    def notified(self, device_id, flags):
        """
        An authenticated notify A or B of C{device_id} came with frame
        C{flags}: remember whether the device takes direct requests
        (L{wire.DIRECT_CAPABLE}); an agent downgraded to an older release
        stops getting them with its next notify.
        """
        if flags & wire.DIRECT_CAPABLE:
            self.direct_capable.add(device_id)
        else:
            self.direct_capable.discard(device_id)

    def direct_offer(self, device_id, service, terminal_addr, source, on_later=None):
        """
        Send C{device_id} a L{wire.DirectConnectRequest} for a terminal at
        C{terminal_addr} (checked by the caller: an IP literal, a port) and
        C{service}, with a fresh secret, and return the L{DirectOffer} for
        the terminal; None (nothing sent) when the device does not take
        direct requests, has no address of the terminal's family, or the
        terminal's C{source} or the device is over its rate.

        A device live on another node of a cluster: with C{on_later}, that
        node (its owner, which holds the device's mapping) is asked to send
        the request, and C{on_later(offer)} is called with the L{DirectOffer}
        once it answers that it did (never before this call returned); this
        call returns None.  Without
        C{on_later}, or when the shared state is away, such a device gets
        no offer (its connections are relayed).
        """
        d = self.devices.reachable(device_id, self.clock.seconds())
        if isinstance(d, Refusal) or d.socket is None or d.addr is None:
            if on_later is not None and IClusterDirect.providedBy(self.cluster):
                self._direct_remote(device_id, service, terminal_addr, source, on_later)
            return None
        if device_id not in self.direct_capable:
            return None
        device_addr = _plain(d.addr)
        if _family(device_addr[0]) != _family(terminal_addr[0]):
            return None
        if not self._direct_allowed(device_id, source):
            return None
        direct_id, secret = os.urandom(16), os.urandom(wire.SECRET_LEN)
        self.count("direct-offer")
        self._direct_request(d, service, terminal_addr, direct_id, secret)
        return DirectOffer(device_addr, secret)

    def _direct_allowed(self, device_id, source):
        """Whether the terminal C{source} and the device are within their direct rates."""
        if not self._direct_sources.allow(source):
            self._direct_refused("source", device_id, source)
            return False
        if not self._direct_devices.allow(device_id):
            self._direct_refused("device", device_id, source)
            return False
        return True

    def _direct_request(self, d, service, terminal_addr, direct_id, secret):
        """Send device C{d} (live here) the direct request, and its second copy later."""
        # The device's socket may be dual-stack: send to the terminal's
        # address as the device's family knows it (plain IPv4).
        message = wire.DirectConnectRequest(direct_id, wire.mask_secret(d.mac_key, direct_id,
                                                                        secret),
                                            service, terminal_addr)
        message.encode_body()  # a service the wire cannot carry fails here, not in a timer
        self.log.debug("direct request for {device_id} from terminal {terminal}, offer {oid}",
                       device_id=d.id, terminal=wire.format_addr(terminal_addr),
                       oid=redact(direct_id))
        self._send_direct(d.id, message)
        # One more copy a moment later: a lost request costs the direct path.
        call = self.clock.callLater(self.direct_limits.resend_after, self._resend_direct,
                                    d.id, message)
        self._direct_calls.add(call)

    def _direct_remote(self, device_id, service, terminal_addr, source, on_later):
        """
        The cluster half of L{direct_offer}: this node's rates first (the
        owner's per-device rate bounds what it sends as well), then the
        device's live entry, then its owner sends the request with a secret
        made here.  Every failure means no offer, never an error.
        """
        if not self.cluster.available():
            return
        if not self._direct_allowed(device_id, source):
            return
        direct_id, secret = os.urandom(16), os.urandom(wire.SECRET_LEN)

        def located(entry):
            if entry is None or entry.node == self.cluster.node \
                    or entry.stale(self.clock.seconds(), self.devices.period):
                return None
            if _family(entry.host) != _family(terminal_addr[0]):
                return None
            self.count("direct-forwarded")
            return self.cluster.ask_direct(entry, device_id, service, terminal_addr,
                                           direct_id, secret)

        def answered(addr):
            if addr is None:
                return
            self.count("direct-offer")
            offer = DirectOffer(_plain(addr), secret)
            if calling:
                # Answered before direct_offer returned (a state that
                # answers at once): on_later is for later, as promised.
                self.clock.callLater(0, on_later, offer)
            else:
                on_later(offer)

        calling = True
        d = self.cluster.locate(device_id).addCallback(located).addCallback(answered)
        d.addErrback(self._direct_remote_failed, device_id)
        # Until the owner answers, an idle tunnel waits for the offer
        # (request_tunnel); an answer that came already removes it at once.
        waiting = Deferred()
        waits = self._direct_waits.setdefault(device_id, set())
        waits.add(waiting)

        def answered_or_not(_):
            waits.discard(waiting)
            if not waits and self._direct_waits.get(device_id) is waits:
                del self._direct_waits[device_id]
            waiting.callback(None)

        d.addBoth(answered_or_not)
        calling = False

    def _direct_remote_failed(self, failure, device_id):
        if not failure.check(ClusterUnavailable):
            self.log.failure("direct offer for {device_id} through its owner failed", failure,
                             device_id=device_id)

    def serve_direct(self, device_id, service, terminal_addr, direct_id, secret):
        """
        Another node's terminal at C{terminal_addr} asks for a direct session
        to C{device_id}, live here (L{p2pnat.cluster.state.IClusterState.
        ask_direct}): send the device the direct request if it takes them
        (its latest notify here said so), has an address of the terminal's
        family and is within its direct rate on this node too (so other
        nodes cannot make this one send without bound).

        @return: the device's address as its notifies reach this node, or
            None if nothing was sent.
        """
        d = self.devices.reachable(device_id, self.clock.seconds())
        if isinstance(d, Refusal) or d.socket is None or d.addr is None \
                or device_id not in self.direct_capable:
            return None
        device_addr = _plain(d.addr)
        if _family(device_addr[0]) != _family(terminal_addr[0]) \
                or not 0 < terminal_addr[1] < 65536:
            return None
        if not self._direct_devices.allow(device_id):
            self._direct_refused("device", device_id, "another node")
            return None
        try:
            self._direct_request(d, service, terminal_addr, direct_id, secret)
        except (wire.WireError, UnicodeError, ValueError) as e:
            self.log.warn("direct request for {device_id} from another node not sent: {error}",
                          device_id=device_id, error=e)
            return None
        self.count("direct-served")
        return device_addr

    def _resend_direct(self, device_id, message):
        self._direct_calls = {c for c in self._direct_calls if c.active()}
        self._send_direct(device_id, message)

    def _send_direct(self, device_id, message):
        d = self.devices.get(device_id)
        if d is None or d.revoked or d.socket is None or d.addr is None:
            return
        proto = d.socket
        data = wire.seal(message, d.id, d.mac_key, proto.stamper())
        for addr in d.targets():
            try:
                proto.send(data, addr, "DirectConnectRequest")
            except OSError as e:
                self.log.warn("cannot send direct request to {device_id} at {addr}: {error}",
                              device_id=d.id, addr=wire.format_addr(addr), error=e)

    def _direct_refused(self, what, device_id, source):
        self.count(f"direct-limited-{what}")
        held = self._throttle(("direct-limited", what))
        if held is not None:
            self.log.info("direct request for {device_id} from {source} not sent: over the"
                          " {what} rate ({held} more since the last such line)",
                          device_id=device_id, source=source, what=what, held=held)

    # -- what other nodes of a cluster ask ----------------------------------------

    def send_connect(self, device_id, session_id, nonce, host, port):
        """
        Another node's terminal waits for C{device_id}: send the device a
        connect request naming that node's tunnel C{host} and C{port}, if
        the device is live here (else the request is dropped, and that
        node's session times out).

        @return: whether it was sent.
        """
        d = self.devices.reachable(device_id, self.clock.seconds())
        if isinstance(d, Refusal) or d.socket is None:
            return False
        try:
            self._connect_request(d, session_id, nonce, host, port, True)
        except (wire.WireError, UnicodeError) as e:  # a host the wire cannot carry
            self.log.warn("connect request for {device_id} not sent: {error}",
                          device_id=device_id, error=e)
            return False
        return True

    def device_left(self, device_id):
        """
        The device's notifies now reach another node: it is no longer live
        here (its tunnels already open stay up).
        """
        d = self.devices.get(device_id)
        if d is not None and d.socket is not None:
            self.log.info("device {device_id} now reports to another node", device_id=device_id)
            d.socket = d.addr = None

    # -- what the tunnel side tells ---------------------------------------------

    def claim(self, session_id, device_id, nonce):
        return self.sessions.claim(session_id, device_id, nonce)

    def claim_early(self, session_id, device_id):
        return self.sessions.claim_early(session_id, device_id)

    def tunnel_opened(self, tunnel, session):
        self.tunnels.setdefault(tunnel.device_id, set()).add(tunnel)
        self.metrics.active_sessions.set(len(self.sessions))
        session.ready.callback(tunnel)

    def tunnel_idle(self, tunnel):
        idle = self.idle.setdefault(tunnel.device_id, [])
        idle.append(tunnel)
        while len(idle) > self.max_idle:
            idle.pop(0).drop()

    def tunnel_closed(self, tunnel):
        live = self.tunnels.get(tunnel.device_id)
        if live is not None:
            live.discard(tunnel)
            if not live:
                del self.tunnels[tunnel.device_id]
        idle = self.idle.get(tunnel.device_id)
        if idle and tunnel in idle:
            idle.remove(tunnel)
            if not idle:
                del self.idle[tunnel.device_id]

    # -- what the service tells -------------------------------------------------

    def close_all(self):
        """Shutting down: drop every terminal and tunnel connection."""
        for call in self._direct_calls:
            if call.active():
                call.cancel()
        self._direct_calls = set()
        for t in list(self.terminals):
            t.abort_connection()
        for live in list(self.tunnels.values()):
            for t in list(live):
                t.drop()
        self.idle.clear()

    def device_moved(self, device_id):
        """
        The device's notifies come from a new address: its idle tunnels
        went through the old mapping, which the NAT (or a renumbered
        router) may have dropped without a word, and a stream opened on
        such a tunnel would hang.  Close them; the next request sends a
        connect request to the new address instead.
        """
        idle = self.idle.pop(device_id, ())
        if idle:
            self.log.info("device {device_id} moved; closing its {n} idle tunnels",
                          device_id=device_id, n=len(idle))
        for t in idle:
            t.drop()

    def warn_unreachable_ids(self):
        """
        Log a warning for each active device whose ID terminals cannot
        reach by name (registered before device IDs had to be lower-case
        DNS labels), with why and how to move it to a new ID.
        """
        for d in self.devices:
            problem = None if d.revoked else device_id_problem(d.id)
            if problem is not None:
                self.log.warn(
                    "device ID {device_id!r} cannot be reached by name (https://ID.{hostname}/"
                    " or /connect?ID=): {problem}.  Provision the device again under a new"
                    " ID that is a lower-case DNS label (`p2pnat device add NEWID ...`, then"
                    " run the agent with the new bundle) and remove the old one"
                    " (`p2pnat device remove {device_id}`)", device_id=d.id,
                    hostname=self.hostname, problem=problem)

    def device_revoked(self, device_id):
        """
        End everything a revoked device has open, at once: terminals still
        waiting get 403; tunnels are dropped; and so is every terminal
        connection that carried the device's data, even one whose stream
        the device already finished (its last bytes may still be queued).
        """
        self.sessions.cancel_device(device_id)
        for t in list(self.tunnels.get(device_id, ())):
            t.drop()
        self.idle.pop(device_id, None)
        for t in list(self.streamed.get(device_id, ())):
            t.abort_connection()
