# -*- test-case-name: tests.unit.test_taps,tests.unit.test_agent_failover,tests.unit.test_agent_relays -*-
"""
``twistd device-agent``: keeps a device reachable through its relay.
"""

import os
import socket
import stat

from prometheus_client import Counter
from twisted.application import service
from twisted.internet import defer

from p2pnat.agent import portmap, relays
from p2pnat.agent.direct import AgentSocket, DirectServer
from p2pnat.agent.notifier import Notifier
from p2pnat.agent.tunnel import AgentTunnel
from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.daemon.metrics import Metrics
from p2pnat.daemon.services import UDPService, common_services, make_options, startup_errors
from p2pnat.net import fastio
from p2pnat.net.resolve import resolve_all
from p2pnat.net.streams import OneShotFactory, client_endpoint
from p2pnat.protocol import wire
from p2pnat.protocol.tunnel import alpn_for as tunnel_alpn

#: Bounds of agent.dead_after: room for a check and its retransmissions;
#: a day at most.
MIN_DEAD_AFTER, MAX_DEAD_AFTER = 5.0, 86400.0


def _dead_after(value):
    if not MIN_DEAD_AFTER <= value <= MAX_DEAD_AFTER:
        raise ValueError(f"must be {MIN_DEAD_AFTER:.0f} to {MAX_DEAD_AFTER:.0f} seconds,"
                         f" got {value!r}")


SCHEMA = [
    C.Setting("agent.device_id", str, "", "this device's ID, as registered with the relay"),
    # A string or a list (the config's types have no "either"): the check says
    # what is allowed.
    C.Setting("agent.relay", object, "relay.localhost:7478",
              'the relay\'s UDP notify address, "host:port" ("[ipv6]:port"), or a list of'
              " relays to move along when one stops answering (a name may resolve to"
              " several)", relays.check_relays),
    C.Setting("agent.dead_after", float, 30.0,
              "seconds without an answer (checks retransmitted) after which the relay counts"
              " as dead and the agent moves to the next one", _dead_after),
    C.Setting("agent.direct", bool, True,
              "take direct sessions: a terminal the relay authorized (p2pnat forward) reaches"
              " the device's services over QUIC from the notify socket, end to end encrypted,"
              " when the NATs allow (false: always through the relay's TLS tunnel)"),
    C.Setting("agent.relay_hostname", str, "",
              "name checked in the relay's TLS certificate (default: the host of agent.relay)"),
    C.Setting("agent.mac_key_file", str, "mac.key", "file holding the device's MAC key (hex)"),
    C.Setting("agent.cert_file", str, "device.crt", "the device's client certificate"),
    C.Setting("agent.key_file", str, "device.key", "the device certificate's private key"),
    C.Setting("agent.ca_file", str, "ca.crt", "the relay's CA certificate"),
    C.Setting("agent.service", str, "127.0.0.1:80",
              "the local web server (or any TCP service) to forward to", C.hostport),
    C.Setting("agent.extra_services", list, [],
              "more local TCP services reachable by name through `p2pnat forward`,"
              ' as "name=host:port" (e.g. "ssh=127.0.0.1:22")', item=str),
    C.Setting("agent.max_tunnels", int, 64, "most tunnels open to the relay at once",
              C.positive),
    C.Setting("agent.idle_timeout", float, 120.0,
              "seconds an idle tunnel is kept open for the relay's later requests", C.positive),
    C.Setting("agent.notify_b_interval", float, 20.0,
              "seconds between notify B (keep it below the NAT's UDP timeout)", C.positive),
    C.Setting("udp.listen", object, "0.0.0.0:0",
              "local UDP address for notifies, or a list with one per family (IPv4, IPv6);"
              " a family not given is bound to its wildcard address when a relay needs it",
              relays.check_listen),
    C.Setting("tls.fast_path", bool, True, fastio.SETTING_HELP),
] + portmap.SCHEMA + C.COMMON


class Options(make_options("device-agent", SCHEMA, "device-agent.toml")):
    def check(self, config):
        if not config["agent.device_id"]:
            raise C.ConfigError(f"{config.path or 'command line'}: agent.device_id: missing"
                                " (the ID given to `p2pnat device add`)")
        if not wire.valid_key_id(config["agent.device_id"]):
            raise C.ConfigError(f"{config.path}: agent.device_id: not a valid device ID")
        self.mac_key = C.read_mac_key(config, "agent.mac_key_file")
        self.services = services_of(config)
        self.tls = client_tls_options(config)


def services_of(config):
    """The local services by name ("" is the default one)."""
    where = f"{config.path or 'command line'}: agent.extra_services"
    services = {"": C.parse_hostport(config["agent.service"])}
    for item in config["agent.extra_services"]:
        name, sep, addr = item.partition("=")
        if not sep or not name or name != name.strip() or not name.isascii():
            raise C.ConfigError(f"{where}: expected name=host:port, got {item!r}")
        try:
            services[name] = C.parse_hostport(addr)
        except ValueError as e:
            raise C.ConfigError(f"{where}: {e}")
    return services


def client_tls_options(config):
    """
    TLS options for tunnels: our client certificate, and the relay's
    certificate checked against the CA and the relay's host name
    (service-identity does the name check).
    """
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

    where = config.path or "command line"
    texts = {}
    for name in ("agent.ca_file", "agent.cert_file", "agent.key_file"):
        path = config.path_of(name)
        try:
            with open(path) as f:
                texts[name] = f.read()
        except OSError as e:
            raise C.ConfigError(f"{where}: {name}: cannot read {path}: {e.strerror}")
    key_path = config.path_of("agent.key_file")
    if os.stat(key_path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise C.ConfigError(f"{where}: agent.key_file: {key_path} is readable by others;"
                            " chmod 600 it")
    try:
        ca = Certificate.loadPEM(texts["agent.ca_file"])
    except Exception:
        raise C.ConfigError(f"{where}: agent.ca_file: not a PEM certificate")
    try:
        mine = PrivateCertificate.loadPEM(texts["agent.cert_file"] + texts["agent.key_file"])
    except Exception:
        raise C.ConfigError(f"{where}: agent.cert_file/agent.key_file: not a matching PEM"
                            " certificate and key")
    hostname = config["agent.relay_hostname"] or relays.parse_relays(config["agent.relay"])[0][0]
    return optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=mine)


def has_route(addr):
    """
    Whether this host has a route to C{addr} (an ``(ip, port)``): a UDP
    socket's connect() asks the kernel and sends nothing.  A host with no
    IPv6 route says no at once for an IPv6 relay.
    """
    family = socket.AF_INET6 if relays.family_of(addr[0]) == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
    except OSError:
        return False
    return True


class AgentService(service.MultiService):
    """
    The device agent: its notify sockets (one per address family in use),
    its timers, and the relay it reports to.

    The relays of C{agent.relay} are tried in the order of
    L{relays.RelayRing}; the agent reports to one at a time and moves to
    the next when the L{Notifier} finds it dead, never back by itself.
    Tunnels already open stay as they are.

    Addresses this host has no route to (an IPv6 relay on a host without
    IPv6) are passed over at once rather than after C{agent.dead_after}.

    @param resolve: C{resolve(name)} returns a Deferred list of the IP
        addresses of host C{name} (by default L{resolve_all}).
    @param routable: C{routable((ip, port))}, whether there is a route to
        that address (by default L{has_route}).
    @param direct: take direct sessions (L{p2pnat.agent.direct}): terminals
        that ask the relay for one reach the services over QUIC from the
        notify socket (see L{stop_direct}); None: as C{agent.direct} says.
    """

    log = Logger(namespace="p2pnat.agent")

    #: Seconds before trying again when no relay address could be used.
    RETRY = 5.0

    def __init__(self, config, mac_key, reactor, services=None, tls=None, resolve=None,
                 routable=has_route, direct=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.local_services = services if services is not None else services_of(config)
        self.tls = tls if tls is not None else client_tls_options(config)
        fastio.configure(config["tls.fast_path"])
        # Each tunnel host's last TLS session, resumed by the next tunnel
        # there (a cluster's nodes each have their own).
        self.tls_sessions = fastio.SessionCaches()
        self.idle_timeout = config["agent.idle_timeout"]
        self.max_tunnels = config["agent.max_tunnels"]
        self.tunnels = set()
        self.metrics = Metrics("device-agent")
        self.relay_moves = Counter(
            "p2pnat_agent_relay_moves", "moves to the next relay after one stopped answering",
            registry=self.metrics.registry)
        self.device_id = config["agent.device_id"]
        self.ring = relays.RelayRing(relays.parse_relays(config["agent.relay"]))
        self.resolve = resolve or (lambda name: resolve_all(reactor, name))
        self.routable = routable
        self._unroutable = set()  # addresses logged as having no route, until we report
        self._waiting = False  # no address to report to was logged
        if direct is None:
            direct = config["agent.direct"]
        self.direct = self._direct_server(config) if direct else None
        self.notifier = Notifier(self.device_id, mac_key, None, reactor,
                                 config["agent.notify_b_interval"], self.connect_requested,
                                 config["agent.dead_after"], self.relay_dead,
                                 self.direct.requested if self.direct is not None else None)
        #: Notify sockets (their protocols) and their UDPServices by address
        #: family; the other family's are made when a relay of that family
        #: comes first (L{_socket_for}).
        self.sockets = {}
        self.listeners = {}
        self._listen = relays.parse_listen(config["udp.listen"])
        for family, (host, port) in self._listen.items():
            self._add_socket(family, host, port)
        #: The socket of udp.listen's first address.
        self.proto = self.sockets[next(iter(self._listen))]
        common_services(config, self.metrics, reactor, self)
        self.port_mapping = portmap.add_port_mapping(
            config, reactor, self.listeners[next(iter(self._listen))], self.notifier, self)
        self._resolving = None
        self._reporting = False
        self._dead = None  # the relay found dead, until we report elsewhere

    def stop_direct(self):
        """
        Take no more direct sessions: from the next notify on, the relay
        sends no direct requests (the running ones end); a Deferred that
        fires once their QUIC connections have drained.
        """
        direct, self.direct = self.direct, None
        self.notifier.take_direct(None)
        return direct.stop() if direct is not None else defer.succeed(None)

    def _direct_server(self, config):
        """The L{DirectServer}, unless our certificate cannot serve."""
        from p2pnat.deployment.pki import PKIError
        from p2pnat.quic import Credentials

        try:
            credentials = Credentials.from_files(config.path_of("agent.cert_file"),
                                                 config.path_of("agent.key_file"),
                                                 config.path_of("agent.ca_file"))
        except (PKIError, OSError) as e:
            self.log.warn("no direct sessions: cannot read the device certificate: {error}",
                          error=e)
            return None
        if credentials.identity is None or credentials.identity.id != self.device_id:
            self.log.warn("no direct sessions: agent.cert_file does not name device {device_id}",
                          device_id=self.device_id)
            return None
        return DirectServer(self, credentials)

    def _add_socket(self, family, host, port):
        proto = AgentSocket(self.notifier, self.reactor, self.metrics,
                                self.notifier.replay, name=f"agent.udp{'6' if family == 6 else ''}",
                                stun_rate=0, stamper=self.notifier.stamper)
        listener = UDPService(self.reactor, host, port, proto)
        try:
            listener.setServiceParent(self)  # started at once when we run already
        except Exception:
            listener.disownServiceParent()
            raise
        self.sockets[family] = proto
        self.listeners[family] = listener
        return proto

    def _socket_for(self, family):
        """Our notify socket of C{family}, bound now if need be; None if it cannot be."""
        proto = self.sockets.get(family)
        if proto is not None:
            return proto
        host = relays.WILDCARD[family]
        try:
            return self._add_socket(family, host, 0)
        except Exception as e:
            self.log.warn("cannot open an IPv{family} notify socket on {host}: {error}",
                          family=family, host=host, error=e)
            return None

    def startService(self):
        super().startService()
        self._resolve()

    def _resolve(self):
        """Resolve the relays' names (if any), then report to the current relay."""
        self._resolving = None
        names = self.ring.names
        d = defer.gatherResults([
            defer.maybeDeferred(self.resolve, name).addErrback(lambda failure: [])
            for name in names])
        d.addCallback(lambda found: self._resolved(dict(zip(names, found))))
        d.addErrback(lambda failure: self.log.failure("resolving relays failed", failure))

    def _resolved(self, resolved=None):
        """
        Report to the current relay, or the first after it that we can
        use; with C{resolved} (name -> addresses), with those addresses.
        """
        if not self.running:
            return
        if resolved is not None:
            for name in self.ring.names:
                if not resolved.get(name):
                    self.log.warn("cannot resolve relay {host}", host=name)
            self.ring.reload(resolved)
        # Past the addresses we have no route or socket for; once round at most.
        for _ in range(len(self.ring.addresses)):
            addr = self.ring.current
            if not self.routable(addr):
                if addr not in self._unroutable:
                    self._unroutable.add(addr)
                    self.log.info("no route to relay {relay}; trying the next",
                                  relay=wire.format_addr(addr))
            else:
                proto = self._socket_for(relays.family_of(addr[0]))
                if proto is not None:
                    self._unroutable.clear()
                    self._waiting = False
                    return self._report_to(addr, proto)
            self.ring.advance()
        if not self._waiting:
            # Once until it reports again: the network may be down for hours.
            self._waiting = True
            self.log.warn("no relay address to report to; trying again every {secs:.0f}s",
                          secs=self.RETRY)
        self._resolving = self.reactor.callLater(self.RETRY, self._resolve)

    def _report_to(self, addr, proto):
        dead, self._dead = self._dead, None
        if not self._reporting:
            self._reporting = True
            self.log.info("device {device_id} reporting to relay {relay}",
                          device_id=self.device_id, relay=wire.format_addr(addr))
            # As a fresh start also after a restart of the service.
            self.notifier.switch(addr, proto)
            return
        self.relay_moves.inc()
        self.log.warn("relay {old_relay} did not answer for {secs:.0f}s; device {device_id}"
                      " now reporting to relay {new_relay}", old_relay=wire.format_addr(dead),
                      new_relay=wire.format_addr(addr), secs=self.notifier.liveness.dead_after,
                      device_id=self.device_id)
        self.notifier.switch(addr, proto)

    def relay_dead(self, addr):
        """
        The L{Notifier} found the relay at C{addr} dead: report to the next
        one (after resolving the names again when the list starts over).
        """
        self.notifier.stop()
        self._dead = addr
        if self.ring.advance() and self.ring.names:
            self._resolve()
        else:
            self._resolved()

    def connect_requested(self, request, addr):
        """Open the TLS tunnel a verified connect request asks for."""
        if len(self.tunnels) >= self.max_tunnels:
            self.log.warn("{n} tunnels open already; ignoring a connect request",
                          n=len(self.tunnels))
            return
        # The relay that sent it waits for the tunnel: normally the current
        # one, or one we left that still had the device's mapping.
        relay = self.notifier.relay_addr
        host = request.tunnel_host or (relay[0] if addr == relay else addr[0])
        endpoint = fastio.wrap_client(
            self.tls, client_endpoint(self.reactor, host, request.tunnel_port),
            self.tls_sessions.for_server(host, request.tunnel_port),
            alpn=[tunnel_alpn(request.session_id)])
        tun = AgentTunnel(self, request.session_id, request.nonce)
        self.tunnels.add(tun)
        d = endpoint.connect(OneShotFactory(tun))

        def failed(failure):
            self.tunnels.discard(tun)
            self.log.warn("cannot open tunnel to {host}:{port}: {error}", host=host,
                          port=request.tunnel_port, error=failure.getErrorMessage())

        d.addErrback(failed)

    def local_endpoint(self, address):
        return client_endpoint(self.reactor, address[0], address[1])

    def tunnel_opened(self, tun):
        self.metrics.sessions.labels("tunnel").inc()

    def tunnel_closed(self, tun):
        self.tunnels.discard(tun)

    def stopService(self):
        self.notifier.stop()
        draining = self.direct.stop() if self.direct is not None else None
        self._reporting, self._dead = False, None
        for tun in list(self.tunnels):
            if tun.transport is not None:
                tun.transport.abortConnection()
        if self._resolving is not None and self._resolving.active():
            self._resolving.cancel()
        stopped = super().stopService()
        if draining is None:
            return stopped
        # The direct QUIC connections' draining periods end before their socket closes.
        return defer.gatherResults([draining, defer.maybeDeferred(lambda: stopped)])


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    with startup_errors("device-agent"):
        return AgentService(config.config, config.mac_key, reactor, config.services, config.tls)
