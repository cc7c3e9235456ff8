# -*- test-case-name: tests.unit.test_taps,tests.process.test_daemons -*-
"""
What the three twistd plugins share: command-line options generated from a
config schema, and the services every daemon has (metrics, JSON log file).
"""

import contextlib
import os
import socket
import sys

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorSocket
from twisted.python import usage

from p2pnat.daemon import config as _config
from p2pnat.daemon import logs


def find_default_config(filename):
    """
    Where a daemon looks for its config when ``--config`` is not given:
    ``/etc/p2pnat/FILENAME`` if it exists, else none (built-in defaults).
    """
    path = os.path.join("/etc/p2pnat", filename)
    return path if os.path.exists(path) else None


def make_options(daemon, schema, config_filename, synopsis_extra=""):
    """
    Build a L{usage.Options} class for a daemon: ``--config FILE`` plus one
    ``--section-key`` option per setting.  After parsing, ``options.config``
    is the checked L{p2pnat.daemon.config.Config}.

    A configuration error is printed as one line naming the file and the
    key, and twistd exits with status 1: never a traceback, never the whole
    usage text in front of it.
    """
    params = [["config", "c", None,
               f"TOML config file (default: /etc/p2pnat/{config_filename} if it exists)"]]
    for s in schema:
        if s.kind is bool:
            params.append([s.option, None, None, f"{s.help} (true/false; default: {s.default})"])
        else:
            default = ",".join(map(str, s.default)) if isinstance(s.default, list) else s.default
            params.append([s.option, None, None, f"{s.help} (default: {default!r})"])

    class Options(usage.Options):
        optParameters = params
        synopsis = f"[options]{synopsis_extra}"
        longdesc = (f"Run the p2pnat {daemon}. Settings come from the TOML config file and can"
                    f" be overridden by the options below (see etc/{config_filename}).")

        def postOptions(self):
            path = self["config"] or find_default_config(config_filename)
            overrides = {s.name: self[s.option] for s in schema}
            try:
                self.config = _config.load(path, schema, overrides)
                self.check(self.config)
            except _config.ConfigError as e:
                sys.stderr.write(f"twistd {daemon}: {e}\n")
                raise SystemExit(1)

        def check(self, config):
            """Cross-setting checks; raise ConfigError."""

    return Options


@contextlib.contextmanager
def startup_errors(daemon):
    """
    Turn the errors a user can fix (config, key files, state directory)
    raised while building a daemon into one line and exit status 1.
    """
    from p2pnat.deployment.pki import PKIError
    from p2pnat.deployment.registry import RegistryError

    try:
        yield
    except (_config.ConfigError, PKIError, RegistryError) as e:
        sys.stderr.write(f"twistd {daemon}: {e}\n")
        raise SystemExit(1)


def common_services(config, metrics, reactor, parent):
    """
    Set up what every daemon has: the log level, the optional JSON log
    file and the optional metrics endpoint (added to C{parent}).
    """
    logs.set_level(config["log.level"])
    if config["log.json"]:
        json_path = config.path_of("log.json")
        observer = logs.add_json_file(json_path)

        class _JSONLog(service.Service):
            def stopService(self):
                from twisted.logger import globalLogPublisher
                globalLogPublisher.removeObserver(observer)
                return service.Service.stopService(self)

        _JSONLog().setServiceParent(parent)
    if config["metrics.listen"]:
        metrics.service(config["metrics.listen"], reactor).setServiceParent(parent)


def open_state_registry(config, key, prepare=None):
    """
    The registry in the state directory that setting C{key} names (made,
    with the directory, if missing).  C{prepare(state_dir)} runs first, if
    given (the relay makes its CA there on a first start).

    @raise p2pnat.daemon.config.ConfigError: naming C{key}, if the
        directory cannot be used.
    """
    from p2pnat.deployment.registry import Registry

    state_dir = config.path_of(key)
    try:
        if prepare is not None:
            prepare(state_dir)
        return Registry.open_state_dir(state_dir)
    except Exception as e:
        raise config.error(key, f"cannot use {state_dir}: {e}")


def control_sockets(parent, config, reactor, handler, metrics, replay, stamper, name):
    """
    One L{UDPService} per address of setting ``udp.listen``, added to
    C{parent}, each a L{ControlProtocol} for C{handler}.  They share the
    daemon's replay guard and stamper, and answer STUN at ``udp.stun_rate``
    per source across all of them (with one limit per socket, a source got
    that rate from each).

    @return: the services, in the order of the setting.
    """
    from p2pnat.net.udp import ControlProtocol, share_stun_limit

    sockets = []
    for item in config["udp.listen"]:
        host, port = _config.listen_address(item)
        proto = ControlProtocol(handler, reactor, metrics, replay, name=name,
                                stun_rate=config["udp.stun_rate"], stamper=stamper)
        udp = UDPService(reactor, host, port, proto)
        udp.setServiceParent(parent)
        sockets.append(udp)
    share_stun_limit(udp.protocol for udp in sockets)
    return sockets


def every(parent, interval, f, reactor):
    """Call C{f} every C{interval} seconds of C{reactor}'s clock while C{parent} runs."""
    timer = TimerService(interval, f)
    timer.clock = reactor
    timer.setServiceParent(parent)
    return timer


def bound_socket(host, port, kind=socket.SOCK_DGRAM, backlog=50):
    """
    A non-blocking socket of C{kind} bound to C{(host, port)}, listening if
    it is a stream socket.  On an IPv6 address it takes IPv6 only
    (C{IPV6_V6ONLY}): ``[::]:P`` then stands beside ``0.0.0.0:P`` instead
    of taking IPv4 too, as IPv4-mapped addresses (which STUN would answer
    as IPv6, and the logs would show as ``::ffff:…``).

    @raise CannotListenError: if the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP does
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(host, port, e)
    return sock


class _Listener(service.Service):
    """
    Listens on one port while running: from C{privilegedStartService} (so
    that it binds before twistd drops privileges, and a port in use is a
    clean startup failure) or else from C{startService}, until
    C{stopService}.  C{port} is the listening port once it listens.

    Subclasses say how: C{_listen()} starts listening and returns a handle,
    which C{_unlisten(handle)} stops (returning a Deferred or None).
    """

    port = None
    _handle = None

    @property
    def address(self):
        """(host, port) actually bound (useful with port 0)."""
        a = self.port.getHost()
        return a.host, a.port

    def privilegedStartService(self):
        self._handle = self._listen()
        service.Service.privilegedStartService(self)

    def startService(self):
        if self._handle is None:
            self._handle = self._listen()
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        if self._handle is not None:
            handle, self._handle = self._handle, None
            return self._unlisten(handle)


class UDPService(_Listener):
    """
    Listens with C{protocol} on one UDP address while running.

    Twisted has no datagram endpoints, so this does for UDP what
    StreamServerEndpointService does for TCP.
    """

    def __init__(self, reactor, host, portnum, protocol):
        self.reactor = reactor
        self.host = host
        self.portnum = portnum
        self.protocol = protocol

    #: Receive buffer asked for: bursts of notifies must wait in the kernel,
    #: not be dropped there, while the reactor is busy (the default ~200 KB
    #: is 50-100 ms at 4 000 packets/s).  The kernel caps it at rmem_max.
    receive_buffer = 4 * 1024 * 1024

    def _listen(self):
        if ":" in self.host and IReactorSocket.providedBy(self.reactor):
            # IPv6 only (see bound_socket): listenUDP cannot say so.  A
            # reactor that cannot adopt sockets (a simulated network) has no
            # IPv4-mapped addresses to keep apart anyway.
            sock = bound_socket(self.host, self.portnum)
            try:
                self.port = self.reactor.adoptDatagramPort(sock.fileno(), sock.family,
                                                           self.protocol)
            finally:
                sock.close()  # the reactor has its own copy
        else:
            self.port = self.reactor.listenUDP(self.portnum, self.protocol, interface=self.host)
        try:
            self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        except (AttributeError, OSError):
            pass  # a fake reactor in tests, or a platform that refuses
        return self.port

    def _unlisten(self, port):
        self.port = None
        return port.stopListening()


class _IPv6OnlyTCPEndpoint:
    """
    A TCP server endpoint on an IPv6 address that takes IPv6 only (see
    L{bound_socket}), which Twisted's ``tcp6:`` endpoints cannot say.
    """

    def __init__(self, reactor, host, port):
        self.reactor = reactor
        self.host = host
        self.port = port

    def listen(self, factory):
        try:
            sock = bound_socket(self.host, self.port, socket.SOCK_STREAM)
        except CannotListenError:
            return defer.fail()
        try:
            return defer.succeed(self.reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                              factory))
        finally:
            sock.close()  # the reactor has its own copy


def _endpoints(reactor, description):
    """
    The server endpoints of a TCP listen setting's value (see
    L{p2pnat.daemon.config.listen_endpoints}).

    @raise p2pnat.daemon.config.ConfigError: naming the bad item.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        items = _config.listen_endpoints(description)
    except ValueError as e:
        raise _config.ConfigError(str(e))
    found = []
    for kind, item in items:
        if kind == "address":
            host, port = item
            if ":" in host:
                found.append(_IPv6OnlyTCPEndpoint(reactor, host, port))
            else:
                found.append(serverFromString(reactor, f"tcp:{port}:interface={host}"))
            continue
        try:
            found.append(serverFromString(reactor, item))
        except (ValueError, KeyError, TypeError) as e:
            raise _config.ConfigError(f"bad endpoint {item!r}: {e}")
    return found


class EndpointListener(_Listener):
    """
    Listens with C{factory} while running, on each listener that
    C{description} names (space-separated listen addresses and endpoint
    strings, see L{p2pnat.daemon.config.listen_endpoints}; for example
    ``"0.0.0.0:8443 [::]:8443"`` for both families).  Unlike
    StreamServerEndpointService, it exposes the ports (C{port} and
    C{address} are the first one's) and fails startup loudly if one cannot
    listen, leaving none listening.

    @raise p2pnat.daemon.config.ConfigError: for a description that names
        no listener it can make.
    """

    def __init__(self, reactor, description, factory):
        self.endpoints = _endpoints(reactor, description)
        if not self.endpoints:
            raise _config.ConfigError(f"no listen address or endpoint in {description!r}")
        self.endpoint = self.endpoints[0]
        self.description = description
        self.factory = factory
        #: Every listening port, in the order of the description.
        self.ports = []

    def _listen(self):
        handles = []
        for endpoint in self.endpoints:
            listening = endpoint.listen(self.factory)
            failed = []
            listening.addCallbacks(self._listening, failed.append)
            if failed:
                # TCP endpoints listen at once: say so now, not in a stray Deferred.
                for started in handles:
                    self._unlisten([started])
                failed[0].raiseException()
            handles.append(listening)
        return handles

    def _listening(self, port):
        if self.port is None:
            self.port = port
        self.ports.append(port)
        return port

    def _unlisten(self, handles):
        self.port, self.ports = None, []
        return defer.gatherResults(
            [listening.addCallback(lambda port: port.stopListening()) for listening in handles])


def endpoint_port(description):
    """
    The port number of a TCP listen setting's first listener (a listen
    address, or a ``tcp:PORT:…``/``tcp:port=PORT`` endpoint), else 0.
    """
    try:
        items = _config.listen_endpoints(description)
    except ValueError:
        return 0
    if not items:
        return 0
    kind, item = items[0]
    if kind == "address":
        return item[1]
    for part in item.split(":")[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port=") and part[5:].isdigit():
            return int(part[5:])
    return 0
