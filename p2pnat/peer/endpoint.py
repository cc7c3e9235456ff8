# -*- test-case-name: tests.unit.test_endpoint,tests.process.test_endpoint -*-
"""
``p2pnat:`` client endpoints: any Twisted client reaches a peer's service
or a device's service by name, through C{clientFromString}
(``twisted/plugins/p2pnat_endpoints.py`` declares the parser)::

    ep = clientFromString(reactor, "p2pnat:peer=bob:service=ssh:config=/etc/p2pnat/client.toml")
    ep = clientFromString(reactor, "p2pnat:device=cam1:service=http"
                                   ":relay=relay.example.org\\\\:8443:ca=/etc/p2pnat/ca.crt")

The peer form (L{PeerEndpoint}) opens an end-to-end encrypted QUIC stream
to the peer's named service over the P2P path the lobby sets up, as
``p2pnat peer connect --forward-tcp`` does; the peer serves it with
``p2pnat peer wait --service NAME=HOST:PORT``.  One L{LobbyClient} per
config file serves every endpoint of a process: it logs in once, and one
path and QUIC connection per peer carries all streams to that peer.

The device form (L{DeviceEndpoint}) goes through the relay, as ``p2pnat
forward`` does: a TLS connection to the relay's terminal port, ``CONNECT
DEVICE[:SERVICE]``, then the bytes as they are.

C{connect} fires with the protocol once the stream is open (the relay
said 200; the QUIC stream to the peer is opened) and fails with
L{EndpointConnectError}, whose message says why (peer offline, refused,
no path or answer within the C{timeout}).  A peer that serves no such
service resets the stream: the protocol's C{connectionLost} gets a
L{p2pnat.quic.stream.StreamRefused}.
"""

import base64
import os
import types

from twisted.internet import defer, endpoints, error, interfaces
from twisted.internet.protocol import Protocol
from twisted.python import failure
from zope.interface import implementer, providedBy

from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.net.streams import OneShotFactory

#: Seconds a connect may take by default (login, NAT discovery, path, QUIC).
DEFAULT_TIMEOUT = 30.0
#: The longest C{timeout=} accepted.
MAX_TIMEOUT = 300.0
#: The relay's answer to CONNECT is at most this long.
MAX_ANSWER = 16 * 1024

_PEER_KEYS = {"peer", "service", "config", "timeout", "nat", "portmap", "ipv6"}
_DEVICE_KEYS = {"device", "service", "relay", "relay_hostname", "ca", "credential_file",
                "plain_http", "timeout", "direct", "relay_udp"}
_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


class EndpointConnectError(error.ConnectError):
    """A ``p2pnat:`` endpoint could not connect; the message says why."""

    def __str__(self):
        return self.osError or "p2pnat endpoint: cannot connect"


# -- the string ------------------------------------------------------------------------


def parse(reactor, *args, **kwargs):
    """
    The endpoint a ``p2pnat:`` string describes (its arguments as
    C{clientFromString} passes them).

    @raise ValueError: the string is malformed, with the reason; config,
        certificate and key files are read here, so a missing or bad one
        is reported now rather than at the first connect.
    """
    if args:
        raise ValueError(f"p2pnat: takes KEY=VALUE arguments only (peer=, device=), got"
                         f" {':'.join(args)!r}")
    if ("peer" in kwargs) == ("device" in kwargs):
        raise ValueError("p2pnat: give either peer=CLIENT_ID or device=DEVICE_ID")
    form, allowed = ("peer", _PEER_KEYS) if "peer" in kwargs else ("device", _DEVICE_KEYS)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"p2pnat: unknown argument{'s' if len(unknown) > 1 else ''}"
                         f" {', '.join(unknown)} for {form}= (known: {', '.join(sorted(allowed))})")
    for key, value in kwargs.items():
        if not value and key not in ("service", "nat"):
            raise ValueError(f"p2pnat: {key}= is empty")
    timeout = _timeout(kwargs.get("timeout"))
    if form == "peer":
        return _peer_endpoint(reactor, kwargs, timeout)
    return _device_endpoint(reactor, kwargs, timeout)


def _timeout(text):
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"p2pnat: timeout={text}: not a number of seconds")
    if not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"p2pnat: timeout={text}: between 0 and {MAX_TIMEOUT:g} seconds")
    return value


def _yes(key, text, default):
    if text is None:
        return default
    try:
        return _YES[text.lower()]
    except KeyError:
        raise ValueError(f"p2pnat: {key}={text}: yes or no")


def _service(text, required):
    from p2pnat.quic import header

    if not text:
        if required:
            raise ValueError("p2pnat: service=NAME is required with peer=")
        return ""
    if not header.valid_service(text):
        raise ValueError(f"p2pnat: service={text}: not a valid service name (1-"
                         f"{header.MAX_SERVICE} of a-z 0-9 - _ ., starting with a letter or"
                         " digit)")
    return text


def _peer_endpoint(reactor, kw, timeout):
    from p2pnat.cli import CommandError
    from p2pnat.cli import peer as P
    from p2pnat.peer.discovery import parse_nat

    if "config" not in kw:
        raise ValueError("p2pnat: config=PATH (the client.toml from `p2pnat client add`)"
                         " is required with peer=")
    service = _service(kw.get("service"), required=True)
    nat = kw.get("nat") or None
    if nat is not None:
        try:
            parse_nat(nat)
        except ValueError as e:
            raise ValueError(f"p2pnat: nat={nat}: {e}")
    ipv6 = kw.get("ipv6", "auto")
    if ipv6 not in ("auto", "off"):
        raise ValueError(f"p2pnat: ipv6={ipv6}: auto or off")
    switches = types.SimpleNamespace(no_ipv6=ipv6 == "off",
                                     no_portmap=not _yes("portmap", kw.get("portmap"), True))
    try:
        config, key = P.load_client(kw["config"])
        credentials = P.load_credentials(config)
    except CommandError as e:
        raise ValueError(f"p2pnat: {e}")
    settings = ClientSettings(os.path.abspath(kw["config"]), config, key, credentials, nat,
                              P.candidate_options(config, switches))
    return PeerEndpoint(reactor, settings, kw["peer"], service, timeout)


def _device_endpoint(reactor, kw, timeout):
    if "relay" not in kw:
        raise ValueError("p2pnat: relay=HOST\\:PORT (the relay's terminal address) is required"
                         " with device=")
    try:
        host, port = C.parse_hostport(kw["relay"])
    except ValueError as e:
        raise ValueError(f"p2pnat: relay={kw['relay']}: {e}")
    service = _service(kw.get("service"), required=False)
    credential = None
    if "credential_file" in kw:
        try:
            with open(kw["credential_file"]) as f:
                credential = f.read().strip()
        except OSError as e:
            raise ValueError(f"p2pnat: credential_file={kw['credential_file']}: {e.strerror}")
    tls = None
    if not _yes("plain_http", kw.get("plain_http"), False):
        try:
            tls = relay_tls(kw.get("relay_hostname") or host, kw.get("ca"))
        except ValueError as e:
            raise ValueError(f"p2pnat: ca={kw['ca']}: {e}")
    direct = _direct(reactor, kw, host)
    relay = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls is not None:
        relay = endpoints.wrapClientTLS(tls, relay)
    from p2pnat.peer.direct import DirectFirstEndpoint

    return DirectFirstEndpoint(reactor, relay, kw["device"], service, credential, timeout,
                               direct=direct, on_path=_log_path)


def _direct(reactor, kw, relay_host):
    """
    The device form's direct path (L{p2pnat.peer.direct}): on unless
    C{direct=no}; it needs the deployment's CA (C{ca=}) to check the
    device's certificate.  C{relay_udp=HOST\\:PORT} is the relay's UDP
    port (default: the relay's host, port 7478).
    """
    from p2pnat.peer import direct as D

    if not _yes("direct", kw.get("direct"), True) or not kw.get("ca"):
        if "relay_udp" in kw and _yes("direct", kw.get("direct"), True):
            raise ValueError("p2pnat: relay_udp= needs ca= (the deployment's CA checks the"
                             " device's certificate on the direct path)")
        return None
    udp = kw.get("relay_udp")
    try:
        # Not "host:7478" parsed: an IPv6 relay's would be ambiguous.
        relay_udp = C.parse_hostport(udp) if udp else (relay_host, D.DEFAULT_UDP_PORT)
    except ValueError as e:
        raise ValueError(f"p2pnat: relay_udp={udp}: {e}")
    try:
        socket = D.shared_socket(reactor, kw["ca"])
    except Exception as e:
        raise ValueError(f"p2pnat: ca={kw['ca']}: {e}")
    return D.Direct(socket, relay_udp)


def _log_path(path, target, why):
    Logger(namespace="p2pnat.endpoint").info(
        "device {target}: {path}{why}", target=target, path=path, why=f" ({why})" if why else "")


# -- the relay path to a device --------------------------------------------------------


def relay_tls(hostname, ca_file=None):
    """
    Client TLS options that check the relay's certificate and host name
    against C{ca_file} (a PEM CA certificate), or the system's CAs.

    @raise ValueError: the CA file cannot be read or is no certificate.
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

    if ca_file:
        try:
            with open(ca_file) as f:
                trust = Certificate.loadPEM(f.read())
        except OSError as e:
            raise ValueError(f"cannot read {ca_file}: {e.strerror}")
        except (ValueError, crypto.Error):
            raise ValueError(f"{ca_file} is not a PEM certificate")
    else:
        trust = platformTrust()
    return optionsForClientTLS(hostname, trustRoot=trust)


def connect_request(device, service="", credential=None, extra=()):
    """
    The request that asks the relay's terminal port for a TCP stream to
    C{device}'s C{service} (its main service if empty), with the device's
    access credential if it has one, and the header lines C{extra}
    (L{p2pnat.peer.direct.request_header}).
    """
    target = f"{device}:{service}" if service else device
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if credential:
        token = base64.b64encode(b":" + credential.encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AnswerTooLong(ValueError):
    """The relay's answer to CONNECT has no end within L{MAX_ANSWER} bytes."""


def connect_answer(buffer):
    """
    Read the relay's answer to L{connect_request} from the bytes received
    so far: None while its head is incomplete, else C{(status_line, ok,
    rest)}, where C{rest} already belongs to the stream.

    @raise AnswerTooLong: no end of the head within L{MAX_ANSWER} bytes.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_ANSWER:
            raise AnswerTooLong(f"the relay's answer is longer than {MAX_ANSWER} bytes")
        return None
    line = buffer[:end].split(b"\r\n", 1)[0]
    status = line.split(b" ", 2)
    return line.decode("latin-1"), len(status) >= 2 and status[1] == b"200", buffer[end + 4:]


class PassesHalfClose:
    """
    For a protocol that hands its transport on to the application's
    protocol C{app}: the half-closes go on to C{app} if it takes them
    (IHalfCloseableProtocol); to one that does not, the end of the
    peer's bytes closes the connection, as Twisted does.
    """

    app = None

    def readConnectionLost(self):
        if self.app is not None and interfaces.IHalfCloseableProtocol in providedBy(self.app):
            self.app.readConnectionLost()
        elif self.app is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self.app is not None and interfaces.IHalfCloseableProtocol in providedBy(self.app):
            self.app.writeConnectionLost()


@implementer(interfaces.IHalfCloseableProtocol)
class _RelayHandshake(PassesHalfClose, Protocol):
    """
    The connection to the relay for one L{DeviceEndpoint.connect}: sends
    the CONNECT request, then, once the relay says 200, connects the
    application's protocol to this transport and passes everything on.
    """

    def __init__(self, factory, request, result, target):
        self.factory = factory
        self.request = request
        self.result = result
        self.target = target
        self.buf = b""
        self.app = None

    def connectionMade(self):
        from p2pnat.net.streams import nodelay

        nodelay(self.transport)
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.app is not None:
            return self.app.dataReceived(data)
        if self.result.called:
            return  # given up (timeout): the connection is closing
        self.buf += data
        try:
            answer = connect_answer(self.buf)
        except AnswerTooLong as e:
            return self._fail(str(e))
        if answer is None:
            return
        line, ok, rest = answer
        self.buf = b""
        if not ok:
            return self._fail(f"the relay refused: {line}")
        self.app = self.factory.buildProtocol(self.transport.getPeer())
        if self.app is None:
            self.transport.loseConnection()
            return self.result.errback(error.ConnectingCancelledError(self.transport.getPeer()))
        self.app.makeConnection(self.transport)
        self.result.callback(self.app)
        if rest and self.app is not None:
            self.app.dataReceived(rest)

    def _fail(self, why):
        self.transport.abortConnection()
        if not self.result.called:
            self.result.errback(EndpointConnectError(f"{self.target}: {why}"))

    def connectionLost(self, reason):
        if self.app is not None:
            return self.app.connectionLost(reason)
        if not self.result.called:
            self.result.errback(EndpointConnectError(
                f"{self.target}: the relay closed the connection before answering:"
                f" {reason.getErrorMessage()}"))


@implementer(interfaces.IStreamClientEndpoint)
class DeviceEndpoint:
    """
    A device's TCP service through the relay (``p2pnat forward``'s path):
    each connect is a connection to the relay's terminal port that asks
    for C{device}'s C{service}; it fires with the protocol once the relay
    answered 200, within C{timeout} seconds.

    @param relay: the client endpoint of the relay's terminal port (TLS
        wrapped, for an HTTPS one).
    """

    def __init__(self, reactor, relay, device, service="", credential=None,
                 timeout=DEFAULT_TIMEOUT):
        self.clock = reactor
        self.relay = relay
        self.device = device
        self.service = service
        self.request = connect_request(device, service, credential)
        self.timeout = timeout

    def __repr__(self):
        target = f"{self.device}:{self.service}" if self.service else self.device
        return f"<DeviceEndpoint {target}>"

    def connect(self, factory):
        target = f"{self.device}:{self.service}" if self.service else self.device

        def cancel(result):
            # A timeout or the caller gave up: no connection is left behind.
            if handshake.transport is not None:
                handshake.transport.abortConnection()
            else:
                attempt.cancel()

        result = defer.Deferred(cancel)
        handshake = _RelayHandshake(factory, self.request, result, f"device {target}")
        attempt = self.relay.connect(OneShotFactory(handshake))

        def cannot(failure):
            # A cancelled attempt is our own canceller's: result says why.
            if not result.called and not failure.check(defer.CancelledError):
                result.errback(EndpointConnectError(
                    f"device {target}: cannot reach the relay: {failure.getErrorMessage()}"))

        attempt.addErrback(cannot)

        def expired(failure):
            failure.trap(defer.TimeoutError)
            raise EndpointConnectError(f"device {target}: no answer within {self.timeout:g}s")

        return result.addTimeout(self.timeout, self.clock).addErrback(expired)


# -- the P2P path to a peer --------------------------------------------------------------


class ClientSettings:
    """
    What a lobby client is made of, read from its config file by L{parse}:
    the config, MAC key, QUIC credentials, a given NAT (or None: measure
    it) and the candidate options (``ipv6``, ``portmap``).
    """

    def __init__(self, path, config, key, credentials, nat, candidates):
        self.path = path
        self.config = config
        self.key = key
        self.credentials = credentials
        self.nat = nat
        self.candidates = candidates


class _Outcome:
    """
    The one result of an attempt (a Deferred), for every caller that waits
    for it: each gets its own Deferred (L{wait}), which it may cancel or
    time out without touching the attempt or the other callers.
    """

    def __init__(self, attempt):
        self.done = False
        self.result = None
        self._waiters = []
        attempt.addBoth(self._finished)

    def _finished(self, result):
        self.done, self.result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)
        # Every waiter had the failure; nothing is left unhandled.

    def _fire(self, waiter):
        if waiter.called:
            return  # it was cancelled or timed out
        if isinstance(self.result, failure.Failure):
            waiter.errback(self.result)
        else:
            waiter.callback(self.result)

    @property
    def failed(self):
        return self.done and isinstance(self.result, failure.Failure)

    def wait(self):
        waiter = defer.Deferred()
        if self.done:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class _SharedClient:
    """
    One logged-in L{LobbyClient} per config file in a process, and one
    QUIC connection per peer over its path, shared by every endpoint that
    names them.  A login or a connection that failed is forgotten, so the
    next connect tries again; the client logs out at reactor shutdown.
    """

    log = Logger(namespace="p2pnat.endpoint")

    def __init__(self, reactor, settings):
        self.reactor = reactor
        self.settings = settings
        self.client = None
        self._login = None  # the login's _Outcome
        self._streams = {}  # peer -> the _Outcome of its PathStreams
        self._trigger = None

    def logged_in(self):
        """A Deferred firing with the logged-in L{LobbyClient}."""
        if self._login is None or self._login.failed:
            self._login = _Outcome(defer.ensureDeferred(self._start()))
        return self._login.wait()

    async def _start(self):
        from p2pnat.peer.client import LobbyClient
        from p2pnat.peer.discovery import discover_nat

        s, config = self.settings, self.settings.config
        lobby = C.parse_hostport(config["client.lobby"])
        servers = [C.parse_hostport(a) for a in config["client.discovery"]] or [
            lobby, (lobby[0], lobby[1] + 1)]
        interface = config["client.interface"] or None
        nat = await discover_nat(self.reactor, servers, interface=interface, given=s.nat)
        client = LobbyClient(config["client.id"], s.key, lobby, self.reactor,
                             interface=interface, nat=nat, accept=lambda peer: False,
                             low_ttl=config["client.low_ttl"], credentials=s.credentials,
                             **s.candidates)
        if self._trigger is None:
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self.client = client
        await client.start()
        self.log.info("endpoint client {id} logged in to {lobby}", id=client.id,
                      lobby=config["client.lobby"])
        return client

    def streams(self, peer):
        """A Deferred firing with the L{PathStreams} to C{peer}, its QUIC connection up."""
        outcome = self._streams.get(peer)
        if outcome is not None and outcome.done and not outcome.failed:
            streams = outcome.result
            if streams.endpoint is None or streams.path.mode == "closed":
                streams.close("gone")
                outcome = None
        if outcome is None or outcome.failed:
            outcome = self._streams[peer] = _Outcome(defer.ensureDeferred(self._connect(peer)))
        return outcome.wait()

    async def _connect(self, peer):
        from p2pnat.peer import streams as S

        client = await self.logged_in()
        path = await client.connect(peer)
        return await S.connect_streams(path, self.settings.credentials)

    def stop(self):
        """
        Close every QUIC connection and log out; a Deferred that fires once
        the connections' draining periods are over (QUIC bounds them) and
        the client logged out.
        """
        closing = []
        for outcome in self._streams.values():
            if outcome.done and not outcome.failed:
                streams = outcome.result
                if streams.endpoint is not None:
                    closing.append(streams.endpoint.closed)
                streams.close("endpoint client stopping")
        self._streams = {}
        self._login = None
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # it is the trigger running now
            self._trigger = None
        client, self.client = self.client, None
        if client is not None:
            closing.append(client.stop())
        return defer.gatherResults([_branch(d) for d in closing], consumeErrors=True)


def _branch(d):
    """A Deferred firing (with None) when C{d} does, leaving C{d}'s own result alone."""
    branch = defer.Deferred()

    def fire(result):
        branch.callback(None)
        return result

    d.addBoth(fire)
    return branch


#: (reactor, config path) -> its L{_SharedClient}.
_CLIENTS = {}


def shared_client(reactor, settings):
    """The L{_SharedClient} of C{settings.path} in C{reactor}, made on first use."""
    key = (id(reactor), settings.path)
    shared = _CLIENTS.get(key)
    if shared is None or shared.reactor is not reactor:
        shared = _CLIENTS[key] = _SharedClient(reactor, settings)
    return shared


@implementer(interfaces.IStreamClientEndpoint)
class PeerEndpoint:
    """
    A peer's named service over an end-to-end encrypted QUIC stream (see
    the module): each connect opens one stream to C{service} of C{peer},
    logging the config's client in and connecting to the peer first if
    that is not done yet, all within C{timeout} seconds.
    """

    def __init__(self, reactor, settings, peer, service, timeout=DEFAULT_TIMEOUT):
        self.clock = reactor
        self.settings = settings
        self.peer = peer
        self.service = service
        self.timeout = timeout
        self.shared = shared_client(reactor, settings)

    def __repr__(self):
        return f"<PeerEndpoint {self.peer}:{self.service} via {self.settings.path}>"

    def connect(self, factory):
        what = f"{self.peer}'s {self.service}"

        def open_stream(streams):
            from p2pnat.quic.stream import QuicStreamAddress

            addr = QuicStreamAddress(streams.peer, streams.address, None, self.service)
            proto = factory.buildProtocol(addr)
            if proto is None:
                raise error.ConnectingCancelledError(addr)
            try:
                streams.open_stream(self.service, proto)
            except ConnectionError as e:
                raise EndpointConnectError(f"{what}: {e}")
            return proto

        def failed(failure):
            from p2pnat.peer.client import Refused
            from p2pnat.quic import HandshakeFailed

            if failure.check(defer.TimeoutError):
                raise EndpointConnectError(f"{what}: no stream within {self.timeout:g}s")
            if failure.check(EndpointConnectError, error.ConnectingCancelledError):
                return failure
            if failure.check(Refused):
                raise EndpointConnectError(f"{what}: {failure.getErrorMessage()}")
            if failure.check(HandshakeFailed):
                raise EndpointConnectError(f"{what}: QUIC handshake failed:"
                                           f" {failure.getErrorMessage()}")
            raise EndpointConnectError(f"{what}: {failure.getErrorMessage()}")

        d = self.shared.streams(self.peer)
        d.addTimeout(self.timeout, self.clock)
        return d.addCallback(open_stream).addErrback(failed)


__all__ = ["DEFAULT_TIMEOUT", "DeviceEndpoint", "EndpointConnectError", "PeerEndpoint",
           "connect_answer", "connect_request", "parse", "relay_tls"]
