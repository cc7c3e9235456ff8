# -*- test-case-name: tests.unit.test_taps -*-
"""
``twistd device-agent``: keeps a device reachable through its relay.
"""

import ipaddress
import os
import stat

from twisted.application import service

from p2pnat.agent import portmap
from p2pnat.agent.notifier import Notifier
from p2pnat.agent.tunnel import AgentTunnel
from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.daemon.metrics import Metrics
from p2pnat.daemon.services import UDPService, common_services, make_options, startup_errors
from p2pnat.net import fastio
from p2pnat.net.streams import OneShotFactory, client_endpoint
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import wire
from p2pnat.protocol.tunnel import alpn_for as tunnel_alpn

SCHEMA = [
    C.Setting("agent.device_id", str, "", "this device's ID, as registered with the relay"),
    C.Setting("agent.relay", str, "relay.localhost:7478", "the relay's UDP notify address",
              C.hostport),
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
    C.Setting("udp.listen", str, "0.0.0.0:0", "local UDP address for notifies", C.hostport),
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
    hostname = config["agent.relay_hostname"] or C.parse_hostport(config["agent.relay"])[0]
    return optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=mine)


#: Kept here too: tests and tools import it from the agent's tap.



class AgentService(service.MultiService):
    """
    The device agent: its notify socket and timers.
    """

    log = Logger(namespace="p2pnat.agent")

    def __init__(self, config, mac_key, reactor, services=None, tls=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.local_services = services if services is not None else services_of(config)
        self.tls = tls if tls is not None else client_tls_options(config)
        fastio.configure(config["tls.fast_path"])
        # The relay's last TLS session, resumed by the next tunnel.
        self.tls_sessions = fastio.SessionCache()
        self.idle_timeout = config["agent.idle_timeout"]
        self.max_tunnels = config["agent.max_tunnels"]
        self.tunnels = set()
        self.metrics = Metrics("device-agent")
        self.relay_host, self.relay_port = C.parse_hostport(config["agent.relay"])
        self.notifier = Notifier(config["agent.device_id"], mac_key, None, reactor,
                                 config["agent.notify_b_interval"], self.connect_requested)
        self.proto = ControlProtocol(self.notifier, reactor, self.metrics,
                                     self.notifier.replay, name="agent.udp", stun_rate=0,
                                     stamper=self.notifier.stamper)
        host, port = C.parse_hostport(config["udp.listen"])
        udp = UDPService(reactor, host, port, self.proto)
        udp.setServiceParent(self)
        common_services(config, self.metrics, reactor, self)
        self.port_mapping = portmap.add_port_mapping(config, reactor, udp, self.notifier, self)
        self._resolving = None

    def startService(self):
        super().startService()
        self._resolve()

    def _resolve(self):
        self._resolving = None
        try:
            ipaddress.ip_address(self.relay_host)
        except ValueError:
            d = self.reactor.resolve(self.relay_host)
            d.addCallbacks(self._resolved, self._resolve_failed)
        else:
            self._resolved(self.relay_host)

    def _resolved(self, ip):
        if not self.running:
            return
        self.notifier.relay_addr = (ip, self.relay_port)
        self.log.info("device {device_id} reporting to relay {host}:{port}",
                      device_id=self.config["agent.device_id"], host=ip, port=self.relay_port)
        self.notifier.start(self.proto)

    def _resolve_failed(self, failure):
        self.log.warn("cannot resolve relay {host}: {error}; retrying in 5s",
                      host=self.relay_host, error=failure.getErrorMessage())
        if self.running:
            self._resolving = self.reactor.callLater(5, self._resolve)

    def connect_requested(self, request, addr):
        """Open the TLS tunnel a verified connect request asks for."""
        if len(self.tunnels) >= self.max_tunnels:
            self.log.warn("{n} tunnels open already; ignoring a connect request",
                          n=len(self.tunnels))
            return
        host = request.tunnel_host or self.notifier.relay_addr[0]
        endpoint = fastio.wrap_client(
            self.tls, client_endpoint(self.reactor, host, request.tunnel_port),
            self.tls_sessions, alpn=[tunnel_alpn(request.session_id)])
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
        for tun in list(self.tunnels):
            if tun.transport is not None:
                tun.transport.abortConnection()
        if self._resolving is not None and self._resolving.active():
            self._resolving.cancel()
        return super().stopService()


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    with startup_errors("device-agent"):
        return AgentService(config.config, config.mac_key, reactor, config.services, config.tls)
