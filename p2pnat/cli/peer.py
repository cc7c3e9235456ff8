# -*- test-case-name: tests.unit.test_peer_cli,tests.lab.test_p2p_lab -*-
"""
``p2pnat peer``: the P2P path from the command line.

- ``p2pnat peer wait --config client.toml`` logs in and accepts peers: a
  chat (lines typed are sent, datagrams received are printed), an echo
  (``--echo``) or a UDP port forward (``--forward-udp HOST:PORT``: each
  peer's datagrams go to that local service, its answers back).
- ``p2pnat peer connect PEER --config client.toml`` connects to a peer:
  a chat, or with ``--forward-udp-listen HOST:PORT`` a local UDP port whose
  datagrams go to the peer's service (WireGuard, a game server …).

TCP goes over end-to-end encrypted QUIC streams (L{p2pnat.peer.streams};
the certificate ``p2pnat client add`` puts in the bundle):
``peer connect bob --forward-tcp 127.0.0.1:2222=ssh`` listens on a local
TCP port and makes each connection a stream to bob's service ``ssh``;
``peer wait --service ssh=127.0.0.1:22`` (any number of them) connects
each incoming stream for a named service to its TCP address, and refuses
streams for any other name.

Datagrams (chat, ``--echo``, ``--forward-udp``, ``--forward-udp-listen``)
ride the same end-to-end encrypted QUIC connection when both peers' bundles
have a certificate; when one has none, they go in the path's own frames,
which the lobby could read, and the command says so once, on stderr.

Both ask the gateway for a port mapping (PCP, NAT-PMP, UPnP; off with
``--no-portmap``) and open an IPv6 socket on the host's global IPv6
address if it has one (off with ``--no-ipv6``); each is a candidate the
peer may punch to, and a direct IPv6 path is preferred.

``--json`` prints one JSON object per event (for scripts and tests); the
``path`` events say which candidate the direct path runs on and whether its
datagrams are end-to-end encrypted (``encrypted``: true or false, with
``clear_reason``; null if the command ended before the QUIC handshake
did: the event waits for it); an ``encrypted`` event follows if a path that fell back
to the clear gets its QUIC connection after all; ``path``,
``mode``, ``path-silent`` (the peer was not heard within the detection
bound: the path recovers over the relay and punches again) and
``path-back`` events carry ``keepalive``, the path's keepalive interval
in seconds as learnt from the NAT; a ``keepalive`` event tells that
the lobby saw this client at a new address between two presence
keepalives (the NAT dropped the mapping within the interval), with the
presence keepalive now (``interval``), the paths' (``path``), the
interval before (``was``) and ``why``; ``quic``,
``forward-tcp`` and ``stream-opened`` / ``stream-closed`` /
``stream-failed`` events tell of the QUIC connection and its streams.
"""

import ipaddress
import json
import os
import sys
import time

from p2pnat.cli import CommandError
from p2pnat.daemon import config as C


def _ipv6_setting(value):
    if value in ("auto", "off"):
        return
    try:
        ip = ipaddress.IPv6Address(value)
    except ValueError:
        raise ValueError("auto, off or an IPv6 address")
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        raise ValueError("a global IPv6 address (not ::, ::1, multicast or link-local)")


def candidate_options(config, args):
    """
    The C{ipv6} and C{portmap} arguments of L{LobbyClient} from the
    config and the switches that turn them off.
    """
    ipv6 = config["client.ipv6"]
    if args.no_ipv6 or ipv6 == "off":
        ipv6 = None
    return {"ipv6": ipv6, "portmap": bool(config["client.portmap"] and not args.no_portmap)}


CLIENT_SCHEMA = [
    C.Setting("client.id", str, "", "this client's ID, as given to `p2pnat client add`"),
    C.Setting("client.lobby", str, "", "the lobby's UDP address host:port", C.hostport),
    C.Setting("client.mac_key_file", str, "mac.key", "the client's MAC key (hex, mode 0600)"),
    C.Setting("client.interface", str, "",
              "local address for our UDP sockets (default: the one that routes to the lobby)"),
    C.Setting("client.discovery", list, [],
              "lobby addresses for NAT discovery, host:port (default: the lobby's address and"
              " the next port)", item=str),
    C.Setting("client.low_ttl", int, 0,
              "TTL of first probes where the plan wants low-TTL ones: the hop count to our"
              " outermost NAT, plus one (0: off)"),
    C.Setting("client.portmap", bool, True,
              "ask the gateway for a port mapping (PCP, NAT-PMP, UPnP) and offer it to peers"),
    C.Setting("client.ipv6", str, "auto",
              "the IPv6 address for direct IPv6 paths: auto (this host's global address, if"
              " any), off, or an address", _ipv6_setting),
    C.Setting("client.cert_file", str, "",
              "the client's certificate for QUIC streams between peers (from `p2pnat client"
              " add`)"),
    C.Setting("client.key_file", str, "", "its private key (mode 0600)"),
    C.Setting("client.ca_file", str, "", "the deployment's CA, that peers' certificates"
                                         " must chain to"),
]


def load_credentials(config):
    """
    The client's QUIC credentials, for ``--forward-tcp`` and ``--service``.

    @raise CommandError: the bundle has none (made before ``client add``
        issued certificates) or they cannot be read.
    """
    from p2pnat.deployment.pki import PKIError
    from p2pnat.quic import Credentials

    missing = [name for name in ("client.cert_file", "client.key_file", "client.ca_file")
               if not config[name]]
    if missing:
        raise CommandError(
            f"{config.path}: no {', '.join(missing)}: this bundle has no certificate for QUIC"
            " streams (--forward-tcp, --service); issue one with `p2pnat client add ID"
            " --replace` on the lobby's host (the datagram path, chat and --forward-udp work"
            " without)")
    try:
        creds = Credentials.from_files(config.path_of("client.cert_file"),
                                       config.path_of("client.key_file"),
                                       config.path_of("client.ca_file"))
    except PKIError as e:
        raise CommandError(f"{config.path}: {e}")
    if creds.identity is None or creds.identity.id != config["client.id"]:
        raise CommandError(f"{config.path_of('client.cert_file')}: not a certificate for"
                           f" client {config['client.id']}")
    return creds


def optional_credentials(config):
    """
    The client's QUIC credentials if its bundle has them (L{load_credentials}),
    None if it names none at all (made before ``client add`` issued
    certificates): its datagrams then go in the clear.
    """
    if not any(config[name] for name in ("client.cert_file", "client.key_file",
                                         "client.ca_file")):
        return None
    return load_credentials(config)


#: Where ``peer`` keeps the NAT it measured, next to the client's
#: configuration: the next run's hint (L{p2pnat.peer.discovery.NatStore}).
NAT_HINT_FILE = "nat-hint.json"

#: What a path without an encrypted channel is told, once.
CLEAR_WARNING = ("warning: datagrams with {peer} are NOT end-to-end encrypted ({reason}): the"
                 " lobby could read and alter them")


def _service_name(name, option):
    from p2pnat.quic import header

    if not header.valid_service(name):
        raise CommandError(f"{option}: not a valid service name: {name!r} (1-"
                           f"{header.MAX_SERVICE} of a-z 0-9 - _ ., starting with a letter or"
                           " digit)")
    return name


def parse_forwards(specs):
    """
    ``--forward-tcp HOST:PORT=SERVICE`` options: ``[((host, port), service)]``.

    @raise CommandError: a malformed one, or one local address twice.
    """
    forwards = []
    for spec in specs or []:
        listen, sep, service = spec.rpartition("=")
        if not sep:
            raise CommandError(f"--forward-tcp: expected HOST:PORT=SERVICE, got {spec!r}")
        try:
            addr = C.parse_hostport(listen)
        except ValueError as e:
            raise CommandError(f"--forward-tcp: {e}")
        if addr in [a for a, _ in forwards]:
            raise CommandError(f"--forward-tcp: {listen} given twice")
        forwards.append((addr, _service_name(service, "--forward-tcp")))
    return forwards


def parse_services(specs):
    """
    ``--service NAME=HOST:PORT`` options: ``{name: (host, port)}``.

    @raise CommandError: a malformed one, or one name twice.
    """
    services = {}
    for spec in specs or []:
        name, sep, target = spec.partition("=")
        if not sep:
            raise CommandError(f"--service: expected NAME=HOST:PORT, got {spec!r}")
        _service_name(name, "--service")
        if name in services:
            raise CommandError(f"--service: {name} given twice")
        try:
            host, port = C.parse_hostport(target)
        except ValueError as e:
            raise CommandError(f"--service {name}: {e}")
        if port == 0:
            raise CommandError(f"--service {name}: port 0")
        services[name] = (host, port)
    return services


def _streams_options(args, config):
    """
    What ``--forward-tcp`` and ``--service`` ask for, checked before anything
    starts: C{(forwards, services, credentials or None)}.
    """
    forwards = parse_forwards(getattr(args, "forward_tcp", None))
    services = parse_services(getattr(args, "service", None))
    if forwards and (args.send or args.forward_udp_listen):
        raise CommandError("--forward-tcp goes with neither --send nor --forward-udp-listen")
    if services and (args.echo or args.forward_udp):
        raise CommandError("--service goes with neither --echo nor --forward-udp")
    creds = load_credentials(config) if forwards or services else optional_credentials(config)
    return forwards, services, creds


def load_client(path):
    try:
        config = C.load(path, CLIENT_SCHEMA)
    except C.ConfigError as e:
        raise CommandError(str(e))
    if not config["client.id"] or not config["client.lobby"]:
        raise CommandError(f"{path}: client.id and client.lobby are required")
    try:
        key = C.read_mac_key(config, "client.mac_key_file")
    except C.ConfigError as e:
        raise CommandError(str(e))
    return config, key


class Output:
    def __init__(self, as_json):
        self.as_json = as_json
        self.t0 = time.monotonic()

    def event(self, _name, _text, **fields):
        if self.as_json:
            fields.update(event=_name, t=round(time.monotonic() - self.t0, 4))
            print(json.dumps(fields), flush=True)
        else:
            print(_text, flush=True)


def _run(args, connect):
    from twisted.internet import defer, reactor, stdio
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineReceiver

    from p2pnat.peer import streams as S
    from p2pnat.peer.client import LobbyClient, needs_mapping
    from p2pnat.peer.discovery import NatStore, discover_nat, nat_cache
    from p2pnat.protocol import wire

    config, key = load_client(args.config)
    forwards, services, creds = _streams_options(args, config)
    host, port = C.parse_hostport(config["client.lobby"])
    lobby = (host, port)
    out = Output(args.json)
    level = LogLevel.info if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(level)])],
        redirectStandardIO=False)
    status = {"code": 0}

    def stop():
        if reactor.running and not status.get("stopping"):
            status["stopping"] = True
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # shutting down already (SIGTERM, Ctrl-C): closing the path got us here

    def fail(failure):
        out.event("error", f"error: {failure.getErrorMessage()}", error=failure.getErrorMessage())
        status["code"] = 1
        stop()

    def stream_event(name, **fields):
        text = {"stream-opened": "[stream {stream} {direction} for {service}: opened]",
                "stream-closed": "[stream {stream} {direction} for {service}: closed, {sent}"
                                 " bytes sent, {received} received]",
                "stream-failed": "[stream {direction} for {service} failed]"}[name]
        text = text.format(**fields)
        if fields.get("error"):
            text = text[:-1] + f": {fields['error']}]"
        out.event(name, text, **fields)

    #: Paths whose event waits for their channel: told at shutdown if still waiting.
    unsettled = []
    reactor.addSystemEventTrigger("before", "shutdown", lambda: [f() for f in unsettled])

    def quic_up(endpoint):
        out.event("quic", f"[QUIC with {endpoint.peer} up: end-to-end encrypted streams]",
                  peer=str(endpoint.peer))

    def secure(path, opened, factories=None):
        """
        Put the path's datagrams on its QUIC connection, if we have a
        certificate; the C{path} event (C{opened}: its text and fields)
        goes out once that is settled, saying whether they are encrypted.

        @return: a Deferred firing with the L{S.PathStreams} (None without
            a certificate) once settled; on the connecting side, it fails as
            L{S.connect_streams} does if the handshake fails.
        """
        text, fields = opened
        told = []

        def left():
            # Leaving with the handshake still going: the path was made all
            # the same (what waited was never sent, in the clear or not).
            if not told:
                told.append(None)
                out.event("path", text + ", channel not settled]", encrypted=None, **fields)

        unsettled.append(left)

        def settled(encrypted, reason):
            if told:
                if encrypted:
                    out.event("encrypted", f"[{path.peer}: datagrams now end-to-end encrypted]",
                              peer=path.peer, encrypted=True)
                return
            told.append(encrypted)
            unsettled.remove(left)
            out.event("path", text + ("" if encrypted else ", NOT encrypted") + "]",
                      encrypted=encrypted, **fields, **({} if encrypted else
                                                      {"clear_reason": reason}))
            if not encrypted:
                print(CLEAR_WARNING.format(peer=path.peer, reason=reason), file=sys.stderr,
                      flush=True)

        if creds is None:
            S.ClearDatagrams(path)
            settled(False, "this client's bundle has no certificate")
            return defer.succeed(None)
        if connect:
            return S.connect_streams(path, creds, on_settled=settled)
        try:
            return defer.succeed(S.accept_streams(path, creds, factories or {},
                                                  on_connection=quic_up, on_settled=settled))
        except S.StreamsUnavailable as e:
            out.event("error", f"error: {e}", error=str(e), peer=path.peer)
            return defer.succeed(None)

    def attach(path, forward_to=None):
        path.opened_at = time.monotonic()

        def on_mode(mode):
            out.event("mode", f"[{path.peer}: {mode}{_via(path)}]", peer=path.peer, mode=mode,
                      candidate=path.candidate, keepalive=path.keepalive_interval)
            if mode == "closed" and connect:
                stop()

        def on_event(name, fields):
            text = {"path-silent": "[{peer}: silent for {silence:g}s; recovering over the"
                                   " relay, keepalive now {keepalive:g}s]",
                    "path-back": "[{peer}: heard again after {silence:g}s]"}[name]
            out.event(name, text.format(peer=path.peer, **fields), peer=path.peer, **fields)

        path.on_mode = on_mode
        path.on_event = on_event
        if forwards and connect or services and not connect:
            return  # the path carries QUIC streams; nothing reads its datagrams
        if forward_to is not None:
            _udp_forward_to(reactor, path, forward_to)
        elif args.echo:
            def echo(data):
                out.event("data", f"{path.peer}> (echoed {len(data)} bytes)", peer=path.peer,
                          echoed=len(data))
                path.send(data)

            path.on_datagram = echo
        else:
            path.on_datagram = lambda data: out.event(
                "data", f"{path.peer}> {data.decode('utf-8', 'replace')}", peer=path.peer,
                text=data.decode("utf-8", "replace"))
        chat_paths.append(path)

    chat_paths = []

    class Chat(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            for p in chat_paths:
                if p.mode != "closed":
                    p.send(line.rstrip(b"\r")[:1000])

        def connectionLost(self, reason):
            if connect and not args.stay:
                for p in chat_paths:
                    p.close()
                reactor.callLater(0.2, stop)

    @defer.inlineCallbacks
    def main():
        t0 = time.monotonic()
        servers = [C.parse_hostport(a) for a in config["client.discovery"]] or [
            lobby, (lobby[0], lobby[1] + 1)]
        interface = config["client.interface"] or None
        hint, store = (None, False), None
        if args.nat:
            nat = yield discover_nat(reactor, servers, interface=interface, given=args.nat)
            cache = None
        else:
            # Measured alongside the login (LobbyClient.start), once per
            # process, and refreshed in the background; what it finds is
            # kept next to the client's configuration as the next
            # process's hint (a connect request right behind the login).
            nat, cache = None, nat_cache(reactor, servers, interface)
            store = NatStore(os.path.join(os.path.dirname(os.path.abspath(args.config)),
                                          NAT_HINT_FILE), reactor)
            hint = store.load(servers, cache.interface) or hint
        accept = (lambda peer: peer in args.accept) if getattr(args, "accept", None) else None

        def on_path(path):
            forward = C.parse_hostport(args.forward_udp) if getattr(args, "forward_udp",
                                                                      None) else None
            factories = {name: S.TcpServiceFactory(reactor, name, h, p, stream_event)
                         for name, (h, p) in services.items()}
            # The channel first: the peer's first datagrams may be waiting
            # (QUIC's), and they are the channel's to read, not the
            # application's.
            secure(path, (f"[{path.peer} connected: {path.mode}{_via(path)}",
                          dict(peer=path.peer, mode=path.mode, incoming=True,
                               candidate=path.candidate, keepalive=path.keepalive_interval)),
                   factories)
            attach(path, forward)

        client = LobbyClient(config["client.id"], key, lobby, reactor,
                             interface=interface, nat=nat,
                             accept=accept, on_path=on_path, connect_timeout=args.timeout,
                             upgrade_interval=args.upgrade_interval,
                             low_ttl=config["client.low_ttl"], discovery=cache,
                             nat_hint=hint[0], lobby_candidates=hint[1],
                             credentials=creds if connect else None,
                             **candidate_options(config, args))
        client.on_event = lambda name, fields: out.event(
            name, f"[keepalive now {fields['interval']:g}s, paths' {fields['path']:g}s:"
                  f" {fields['why']}]", **fields)
        reactor.addSystemEventTrigger("before", "shutdown", client.stop)
        if store is not None:
            cache.subscribe(lambda found: store.save(servers, cache.interface, found,
                                                     client.lobby_candidates))
        login = client.start()
        connecting = None
        if connect and hint[0] is not None and not needs_mapping(hint[0]):
            # The NAT an earlier run measured: the connect request goes
            # right behind the login (LobbyClient.connect).  Not behind a
            # NAT whose port mapping the request should offer.
            t1 = time.monotonic()
            connecting = client.connect(args.peer)
        timer = reactor.callLater(args.timeout, lambda: login.called or login.errback(
            CommandError(f"the lobby at {lobby[0]}:{lobby[1]} did not answer in"
                         f" {args.timeout:g}s")))
        yield login
        if timer.active():
            timer.cancel()
        if store is not None:
            store.save(servers, cache.interface, client.nat, client.lobby_candidates)
        nat = client.nat
        out.event("nat", f"NAT: {nat.mapping} mapping, {nat.allocation} ports"
                         f" (step {nat.step}, {nat.rate:g}/s)", mapping=nat.mapping,
                  filtering=nat.filtering, allocation=nat.allocation, step=nat.step,
                  rate=nat.rate)
        out.event("login", f"logged in as {client.id}, public address"
                           f" {client.public[0]}:{client.public[1]}", id=client.id,
                  public=list(client.public))
        offered = client.candidates()
        out.event("candidates", "candidates: " + (", ".join(
            wire.format_addr(c) for c in offered) or "none"),
            candidates=[list(c) for c in offered], ipv6="ipv6" in client.shared,
            mapped=client.mapper is not None and client.mapper.current is not None,
            lobby=client.lobby_candidates)
        if client.nat.mapping == "unknown" and not args.nat and connecting is None:
            # Discovery got no answer (the lobby was not up yet, say): it is
            # up now, and planning for an unknown NAT means planning for the
            # worst, so measure again.
            again = yield discover_nat(reactor, servers, interface=interface)
            client.nat = again
            out.event("nat", f"NAT (measured again): {again.mapping} mapping, {again.allocation}"
                             f" ports", mapping=again.mapping, filtering=again.filtering,
                      allocation=again.allocation, step=again.step, rate=again.rate)
        if not connect:
            return
        if connecting is None:
            t1 = time.monotonic()
            connecting = client.connect(args.peer)
        path = yield connecting
        strategy = path.strategy
        # The punch's figures; the event goes once the datagrams' channel
        # is settled (L{secure}), saying whether they are encrypted.
        opened = (f"[connected to {args.peer}: {path.mode}{_via(path)},"
                  f" {time.monotonic() - t1:.3f}s",
                  dict(peer=args.peer, mode=path.mode, seconds=round(time.monotonic() - t1, 4),
                       total=round(time.monotonic() - t0, 4), strategy=strategy,
                       probes=path.probes, rounds=path.rounds, candidate=path.candidate,
                       keepalive=path.keepalive_interval))
        listen = getattr(args, "forward_udp_listen", None)
        if forwards:
            settled = secure(path, opened)
            attach(path)  # mode events; the path's own datagrams are not read
            streams = yield settled
            quic_up(streams.endpoint)
            for (h, p), service in forwards:
                tcp = reactor.listenTCP(p, S.TcpForwardFactory(streams, service, stream_event),
                                        interface=h)
                a = tcp.getHost()
                out.event("forward-tcp", f"forwarding TCP {wire.format_addr((a.host, a.port))}"
                                         f" to {args.peer}'s {service}", host=a.host,
                          port=a.port, service=service, peer=args.peer)
        elif listen:
            settled = _settled(secure(path, opened), quic_up)
            _udp_listen_to(reactor, path, C.parse_hostport(listen), out)
            yield settled
        else:
            # The channel before the application (see on_path); lines sent
            # from here on wait (bounded) until it is settled.
            _settled(secure(path, opened), quic_up)
            attach(path)
            answered = defer.Deferred()
            if args.send and not args.stay:
                # Leave once each message had an answer, or after --wait.
                wanted = len(args.send)
                show = path.on_datagram

                def count(data):
                    show(data)
                    count.n += 1
                    if count.n >= wanted and not answered.called:
                        answered.callback(None)

                count.n = 0
                path.on_datagram = count
            for text in args.send or []:
                path.send(text.encode())
            if args.send and not args.stay:
                timer = reactor.callLater(args.wait, lambda: answered.called or
                                          answered.callback(None))
                yield answered
                if timer.active():
                    timer.cancel()
                path.close()
                stop()
                return
            if not args.no_stdin:
                stdio.StandardIO(Chat())

    def start():
        main().addErrback(fail)

    reactor.callWhenRunning(start)
    if args.exit_after:
        reactor.callLater(args.exit_after, stop)
    reactor.run()
    return status["code"]


def _settled(d, quic_up):
    """
    What L{secure} gave on the connecting side without streams asked for:
    a failed handshake only means the datagrams went clear (and it said
    so); a connection that came up is told as C{quic}.
    """
    from p2pnat.peer.streams import StreamsUnavailable
    from p2pnat.quic import HandshakeFailed

    def up(streams):
        if streams is not None and streams.endpoint is not None:
            quic_up(streams.endpoint)

    return d.addCallbacks(up, lambda f: f.trap(HandshakeFailed, StreamsUnavailable) and None)


def _via(path):
    """How a direct path runs, for the text output: `` via ipv6`` …"""
    return f" via {path.candidate}" if path.mode == "direct" and path.candidate else ""


def _sleep(reactor, seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


def _forward(path, data, addr, drops):
    """
    One datagram of a local UDP service to the peer (on the path's
    encrypted channel when it has one): one too large for it, or sent as
    the path closes, is dropped and logged (L{DropLog}), not a traceback.
    """
    if path.mode == "closed":
        return
    try:
        path.send(data)
    except ValueError as e:
        drops("too-large", addr, str(e))
    except ConnectionError as e:
        drops("path-closed", addr, str(e))


def _drop_log(reactor):
    from p2pnat.daemon.logs import Logger
    from p2pnat.net.udp import DropLog

    return DropLog(Logger(namespace="p2pnat.peer.forward"), reactor)


def _udp_forward_to(reactor, path, target):
    """Peer's datagrams go to the local service C{target}; its answers go back."""
    from twisted.internet.protocol import DatagramProtocol

    drops = _drop_log(reactor)

    class Out(DatagramProtocol):
        def datagramReceived(self, data, addr):
            if addr == target:
                _forward(path, data, addr, drops)

    proto = Out()
    port = reactor.listenUDP(0, proto, interface="127.0.0.1" if target[0].startswith("127.")
                             else "0.0.0.0")
    path.on_datagram = lambda data: port.write(data, target)


def _udp_listen_to(reactor, path, listen, out):
    """Datagrams to the local port C{listen} go to the peer; answers come back."""
    from twisted.internet.protocol import DatagramProtocol

    drops = _drop_log(reactor)

    class In(DatagramProtocol):
        last = None

        def datagramReceived(self, data, addr):
            self.last = addr
            _forward(path, data, addr, drops)

    proto = In()
    port = reactor.listenUDP(listen[1], proto, interface=listen[0])
    path.on_datagram = lambda data: proto.last and port.write(data, proto.last)
    h = port.getHost()
    out.event("forward", f"forwarding UDP {h.host}:{h.port} to {path.peer}", host=h.host,
              port=h.port)


def _common(p):
    p.add_argument("--config", required=True, help="client.toml from `p2pnat client add`")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens on stderr")
    p.add_argument("--timeout", type=float, default=12.0, help="seconds to get a path")
    p.add_argument("--nat", help="skip discovery and assume this NAT: MAPPING/ALLOCATION[/STEP]"
                                 " e.g. endpoint-independent/preserving")
    p.add_argument("--exit-after", type=float, default=0, help="stop after this many seconds")
    p.add_argument("--echo", action="store_true", help="send every datagram back")
    p.add_argument("--upgrade-interval", type=float, default=20.0,
                   help="seconds before a relayed path tries again for a direct one (doubled"
                        " after each miss)")
    p.add_argument("--no-portmap", action="store_true",
                   help="do not ask the gateway for a port mapping (client.portmap = false)")
    p.add_argument("--no-ipv6", action="store_true",
                   help="no IPv6 socket, no direct IPv6 path (client.ipv6 = \"off\")")


def add_parser(subparsers):
    p = subparsers.add_parser("peer", help="P2P paths through the lobby: wait, connect, chat,"
                                           " forward UDP")
    sub = p.add_subparsers(dest="peer_command", metavar="COMMAND")
    w = sub.add_parser("wait", help="log in and accept peers")
    _common(w)
    w.add_argument("--accept", action="append", help="accept only this peer (repeatable)")
    w.add_argument("--forward-udp", metavar="HOST:PORT",
                   help="forward each peer's datagrams to this local UDP service")
    w.add_argument("--service", action="append", metavar="NAME=HOST:PORT",
                   help="connect each QUIC stream a peer opens for service NAME to this TCP"
                        " address (repeatable; streams for other names are refused)")
    w.set_defaults(func=lambda args: _run(args, connect=False))
    c = sub.add_parser("connect", help="connect to a peer and chat")
    _common(c)
    c.add_argument("peer", help="the peer's client ID")
    c.add_argument("--send", action="append", help="send this text (repeatable), then leave")
    c.add_argument("--wait", type=float, default=3.0,
                   help="with --send: leave once each message had an answer, or after this many"
                        " seconds")
    c.add_argument("--stay", action="store_true", help="do not leave after --send or EOF")
    c.add_argument("--no-stdin", action="store_true", help="do not read lines to send")
    c.add_argument("--forward-udp-listen", metavar="HOST:PORT",
                   help="forward datagrams sent to this local UDP port to the peer")
    c.add_argument("--forward-tcp", action="append", metavar="HOST:PORT=SERVICE",
                   help="listen on this local TCP address; each connection becomes a QUIC"
                        " stream to the peer's SERVICE (repeatable)")
    c.set_defaults(func=lambda args: _run(args, connect=True))
    p.set_defaults(func=lambda args: p.print_help() or 2)
