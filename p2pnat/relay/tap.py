# -*- test-case-name: tests.unit.test_taps,tests.unit.test_relay_core -*-
"""
``twistd relay``: the relay of the relay method.
"""

import dataclasses
import ipaddress
import os
import resource
import socket

from prometheus_client import Gauge
from twisted.application import service
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from p2pnat.cluster.embedded import EmbeddedState
from p2pnat.cluster.state import (
    LiveEntry,
    check_node_name,
    check_node_setting,
    check_redis_setting,
    newer,
)
from p2pnat.cluster.stats import INTERVAL as STATS_INTERVAL
from p2pnat.cluster.stats import STATS_FILE, NodeStats, Traffic, write_stats
from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.daemon.metrics import Metrics
from p2pnat.daemon.services import (
    EndpointListener,
    common_services,
    control_sockets,
    endpoint_port,
    every,
    make_options,
    open_state_registry,
    startup_errors,
)
from p2pnat.deployment import pki
from p2pnat.deployment.provision import terminal_secret
from p2pnat.net import fastio
from p2pnat.net.udp import link_siblings
from p2pnat.protocol import wire
from p2pnat.relay import access, limits
from p2pnat.relay.core import Relay, Timeouts
from p2pnat.relay.credentials import CredentialLimits
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.notify import NotifyHandler
from p2pnat.relay.store import StoreSync
from p2pnat.relay.terminal import TerminalFactory, Tokens
from p2pnat.relay.tunnel import RelayTunnel, RelayTunnelFactory


def _share(value):
    if not 0 <= value < 1:
        raise ValueError(f"must be at least 0 and below 1, got {value!r}")


def _public_addresses(value):
    for item in value:
        C.parse_hostport(item)


SCHEMA = [
    C.Setting("relay.hostname", str, "relay.localhost",
              "the relay's public host name; devices are reached at DEVICE.HOSTNAME"),
    C.Setting("relay.state_dir", str, "/var/lib/p2pnat/relay",
              "directory of the CA, the relay's certificate and the device registry"),
    C.Setting("relay.access_check_period", int, 300,
              "seconds: a device whose last notify A is older is refused at once",
              C.positive),
    C.Setting("relay.notify_b_interval", int, 20,
              "seconds: the longest notify-B interval advised to devices", C.positive),
    C.Setting("udp.listen", list, ["0.0.0.0:7478"],
              "UDP addresses for notifies and STUN, ip:port or [ipv6]:port", C.udp_addresses, item=str),
    C.Setting("udp.stun_rate", float, 20.0,
              "STUN answers per second per source address, across all the relay's sockets"
              " (0: STUN off)", C.non_negative),
    C.Setting("terminal.https", str, "tcp:8443",
              "where terminals connect over HTTPS (TLS with the relay's certificate):"
              " listen addresses or endpoints, space-separated, e.g. \"0.0.0.0:8443"
              ' [::]:8443"; "" turns it off', C.endpoints_or_empty),
    C.Setting("terminal.http", str, "",
              'where terminals connect over plain HTTP, as terminal.https ("" = off); for a'
              " TLS-terminating proxy in front, or tests", C.endpoints_or_empty),
    C.Setting("terminal.public_https_port", int, 0,
              "port in https:// links the relay gives out (0: the port of terminal.https)",
              C.port_number),
    C.Setting("terminal.public_http_port", int, 0,
              "port in http:// links the relay gives out (0: the port of terminal.http)",
              C.port_number),
    C.Setting("terminal.trusted_proxies", list, [],
              "IP addresses or networks (CIDR) of TLS-terminating proxies in front of"
              " terminal.http: only connections from them may set the scheme with"
              " X-Forwarded-Proto or Forwarded: proto=", access.check_networks, item=str),
    C.Setting("terminal.head_timeout", float, 30.0,
              "seconds a terminal has to send its first request head (and a login form)",
              C.positive),
    C.Setting("terminal.first_byte_timeout", float, 5.0,
              "seconds a new terminal connection (its TLS handshake included) has to send"
              " its first byte; then terminal.head_timeout counts from its start", C.positive),
    C.Setting("terminal.stream_idle_timeout", float, 300.0,
              "seconds an HTTP stream to a device may carry no byte either way before the"
              " relay closes it (long polls and WebSockets must send within it)", C.positive),
    C.Setting("terminal.connect_idle_timeout", float, 3600.0,
              "seconds a CONNECT stream (p2pnat forward: SSH, other TCP) may carry no byte"
              " either way before the relay closes it", C.positive),
    C.Setting("limits.max_connections", int, 0,
              "most terminal connections and device tunnels open at once (0: the open-file"
              " limit, RLIMIT_NOFILE, less 64; never more than that)", C.non_negative),
    C.Setting("limits.tunnel_share", float, 0.5,
              "share of limits.max_connections only device tunnels may use", _share),
    C.Setting("limits.terminals_per_source", int, 256,
              "most terminal connections open at once from one IPv4 address or IPv6 /64",
              C.positive),
    C.Setting("limits.tunnels_per_source", int, 1024,
              "most device tunnels open at once from one IPv4 address or IPv6 /64",
              C.positive),
    C.Setting("limits.streams_per_device_source", int, 16,
              "most streams (and tunnels) to one device that terminals from one address or"
              " /64 may hold at once; keep it below the agents' agent.max_tunnels (64)",
              C.positive),
    C.Setting("tunnel.listen", str, "tcp:7443",
              "where devices open their TLS tunnels, as terminal.https", C.endpoints_or_empty),
    C.Setting("tunnel.public_host", str, "",
              "host told to devices in connect requests (\"\": the relay address they know)"),
    C.Setting("tunnel.public_port", int, 0,
              "port told to devices in connect requests (0: the port of tunnel.listen)",
              C.port_number),
    C.Setting("tunnel.idle_timeout", float, 60.0,
              "seconds an idle tunnel is kept for the device's later requests", C.positive),
    C.Setting("tunnel.hello_timeout", float, 10.0,
              "seconds a device's new tunnel has to send its hello", C.positive),
    C.Setting("tunnel.open_timeout", float, 2.0,
              "seconds a reused idle tunnel has to confirm a stream; then it is taken for"
              " dead and the request goes to a new tunnel", C.positive),
    C.Setting("session.timeout", float, 10.0,
              "seconds to wait for a device's tunnel after its connect request (then 504)",
              C.positive),
    C.Setting("relay.sync_interval", float, 0.5,
              "seconds between writes of notify A times to the store and checks for"
              " registry changes (devices added or removed)", C.positive),
    C.Setting("cluster.redis", str, "",
              "redis://HOST:PORT/DB of the Redis relay nodes share (registry, live entries,"
              ' messages); "": a single node with its own registry (the default)', check_redis_setting),
    C.Setting("cluster.node", str, "",
              "this node's name, unique in the cluster (\"\": the machine's host name)",
              check_node_setting),
    C.Setting("cluster.addresses", list, [],
              "this node's public UDP addresses (host:port) devices send notifies to; the"
              " first one's host is where other nodes' devices open tunnels to this node"
              " (unless tunnel.public_host); []: the addresses of udp.listen",
              _public_addresses, item=str),
    C.Setting("admin.listen", str, "",
              "where the admin page listens over HTTPS (the relay's certificate), e.g."
              ' "tcp:9443:interface=127.0.0.1"; "" (the default): no admin page',
              C.endpoints_or_empty),
    C.Setting("admin.credential_file", str, "admin.credential",
              "file (mode 0600) with the admin page's password hash, made by `p2pnat cluster"
              " admin-password`; relative to the config file"),
    C.Setting("admin.session_lifetime", float, 3600.0,
              "seconds an admin stays signed in to the admin page", C.positive),
    C.Setting("tls.fast_path", bool, True, fastio.SETTING_HELP),
    C.Setting("credentials.threads", int, 1,
              "threads hashing access credentials (scrypt: ~50 ms of CPU and 16 MiB each)",
              C.positive),
    C.Setting("credentials.waiting", int, 16,
              "credential checks that may wait for a hashing thread; more are answered 503",
              C.non_negative),
    C.Setting("credentials.per_source_device", int, 5,
              "wrong-credential guesses one address may make at one device at once",
              C.positive),
    C.Setting("credentials.per_source_device_interval", float, 30.0,
              "seconds: then one more guess per this interval", C.positive),
    C.Setting("credentials.per_source", int, 20,
              "guesses one address may make at all devices together at once", C.positive),
    C.Setting("credentials.per_source_interval", float, 6.0,
              "seconds: then one more guess per this interval", C.positive),
    C.Setting("credentials.per_device", int, 30,
              "guesses at one device from all addresses that did not log in to it lately",
              C.positive),
    C.Setting("credentials.per_device_interval", float, 2.0,
              "seconds: then one more guess per this interval", C.positive),
] + C.COMMON


class Options(make_options("relay", SCHEMA, "relay.toml")):
    pass


def timeouts(config):
    """The relay's L{Timeouts} from its settings."""
    return Timeouts(head=config["terminal.head_timeout"], hello=config["tunnel.hello_timeout"],
                    open=config["tunnel.open_timeout"], session=config["session.timeout"],
                    idle=config["tunnel.idle_timeout"],
                    first_byte=config["terminal.first_byte_timeout"],
                    stream=config["terminal.stream_idle_timeout"],
                    tcp_stream=config["terminal.connect_idle_timeout"])


def connection_limits(config, clock, count, nofile=None):
    """
    The relay's L{limits.ConnectionLimits}, sized below the process's
    open-file limit (C{nofile}: the soft RLIMIT_NOFILE when not given).

    @return: ``(limits, nofile, clamped)``: C{clamped} is whether
        C{limits.max_connections} was lowered to fit C{nofile}.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    sizes, clamped = limits.size(
        nofile, config["limits.max_connections"], config["limits.tunnel_share"],
        config["limits.terminals_per_source"], config["limits.tunnels_per_source"])
    return limits.ConnectionLimits(sizes, clock, count), nofile, clamped


class Admission(Factory):
    """
    A listener's factory that counts each connection against
    L{limits.ConnectionLimits}: over a limit, the connection is closed at
    once, before any TLS work.  An admitted connection's slot is handed
    to C{app} (the L{TerminalFactory} or L{RelayTunnelFactory}, wrapped
    in C{factory} or C{factory} itself) in its C{admitted}, and its
    protocol gives it back when the connection is lost.
    """

    noisy = False

    def __init__(self, limits, kind, factory, app):
        self.limits = limits
        self.kind = kind
        self.factory = factory
        self.app = app

    def doStart(self):
        self.factory.doStart()

    def doStop(self):
        self.factory.doStop()

    def buildProtocol(self, addr):
        slot = self.limits.admit(self.kind, limits.source_of(addr))
        if slot is None:
            return None
        self.app.admitted = slot
        try:
            proto = self.factory.buildProtocol(addr)
        finally:
            self.app.admitted = None
        if proto is None:
            slot.release()
        return proto


def credential_limits(config):
    """The relay's L{CredentialLimits} from its settings."""
    return CredentialLimits(
        per_source_device=config["credentials.per_source_device"],
        per_source_device_interval=config["credentials.per_source_device_interval"],
        per_source=config["credentials.per_source"],
        per_source_interval=config["credentials.per_source_interval"],
        per_device=config["credentials.per_device"],
        per_device_interval=config["credentials.per_device_interval"],
        running=config["credentials.threads"], waiting=config["credentials.waiting"])


class _CountedTunnel(RelayTunnel):
    """A device tunnel that adds the bytes it carries to its node's L{Traffic}."""

    def __init__(self, relay, slot, traffic):
        super().__init__(relay, slot)
        self._traffic = traffic

    def dataReceived(self, data):
        self._traffic.from_devices += len(data)
        super().dataReceived(data)

    def send_data(self, data):
        if self._direct:  # else it reaches write_data through the machine
            self._traffic.to_devices += len(data)
        super().send_data(data)

    def write(self, data):
        self._traffic.to_devices += len(data)
        super().write(data)

    def write_data(self, data):
        self._traffic.to_devices += len(data)
        super().write_data(data)


class _CountedTunnelFactory(RelayTunnelFactory):
    def __init__(self, relay, traffic):
        super().__init__(relay)
        self.traffic = traffic

    def buildProtocol(self, addr):
        slot, self.admitted = self.admitted, None
        return _CountedTunnel(self.relay, slot, self.traffic)


class RelayService(service.MultiService):
    """
    The relay: its device table kept in step with the registry, its UDP
    notify sockets, its terminal (HTTPS/HTTP) and tunnel (TLS) listeners.

    Blocking work leaves the reactor thread, through two runners
    (C{run(f, *args)} returning a Deferred of C{f}'s result): C{run_blocking}
    hashes credentials, C{run_store} runs the store's rounds.  By default
    each is a thread pool of the relay's own, started and stopped with the
    service: ``credentials.threads`` threads for hashes (so that a flood of
    logins never holds up the reactor's pool, which resolves names), one
    worker for the store.  Tests on an in-memory reactor pass
    L{p2pnat.relay.core.synchronous} for both.
    """

    log = Logger(namespace="p2pnat.relay")

    def __init__(self, config, reactor, run_blocking=None, run_store=None):
        super().__init__()
        from p2pnat.deployment.registry import Registry

        self.config = config
        self.reactor = reactor
        self.metrics = Metrics("relay")
        self.hostname = config["relay.hostname"]
        self.state_dir = config.path_of("relay.state_dir")
        self.registry = open_state_registry(
            config, "relay.state_dir", lambda state_dir: ensure_state(state_dir, self.hostname))
        self.table = DeviceTable(config["relay.access_check_period"])
        self.replay = wire.ReplayGuard(reactor)
        self.stamper = wire.Stamper(reactor)
        self.handler = NotifyHandler(self.table, reactor, self.metrics,
                                     config["relay.notify_b_interval"],
                                     on_moved=lambda device_id: self.relay.device_moved(device_id),
                                     on_live=self._live,
                                     on_flags=lambda i, f: self.relay.notified(i, f))
        self._local_records = {}  # this node's own registry (SQLite), as last read
        self._revoked_here = {}  # revocations of devices this node's SQLite lacks
        self.traffic = Traffic()
        self._stats_written = None  # when this node's stats record was last written
        self._stats_throttle = Throttle(reactor, interval=600.0)
        self.cluster = self._cluster(config, reactor)
        https, http = config["terminal.https"], config["terminal.http"]
        self.pools = []
        if run_blocking is None:
            run_blocking = self._pool(0, config["credentials.threads"],
                                      "p2pnat-relay-credentials")
        if run_store is None:
            run_store = self._pool(1, 1, "p2pnat-relay-store")
        self.relay = Relay(
            reactor, self.metrics, self.table, self.registry,
            Tokens(terminal_secret(self.state_dir), reactor), hostname=self.hostname,
            tunnel_port=config["tunnel.public_port"] or endpoint_port(config["tunnel.listen"]),
            tunnel_host=config["tunnel.public_host"],
            https_port=config["terminal.public_https_port"] or endpoint_port(https),
            http_port=config["terminal.public_http_port"] or endpoint_port(http),
            run_blocking=run_blocking, timeouts=timeouts(config),
            credential_limits=credential_limits(config),
            trusted_proxies=access.TrustedProxies(config["terminal.trusted_proxies"]),
            max_streams_per_source=config["limits.streams_per_device_source"],
            cluster=self.cluster)
        self.limits, self.nofile, clamped = connection_limits(config, reactor, self.relay.count)
        if clamped:
            self.log.warn("limits.max_connections = {n} is more than the open-file limit"
                          " ({nofile}) allows; using {cap}", n=config["limits.max_connections"],
                          nofile=self.nofile, cap=self.limits.sizes.max_connections)
        gauge = Gauge("p2pnat_connections", "terminal connections and device tunnels open",
                      ["kind"], registry=self.metrics.registry)
        for kind in (limits.TERMINAL, limits.TUNNEL):
            gauge.labels(kind).set_function(lambda kind=kind: self.limits.open[kind])
        Gauge("p2pnat_cluster_available", "1 while the cluster's shared state (Redis) is"
              " reachable (always 1 on a single node)",
              registry=self.metrics.registry).set_function(
                  lambda: 1 if self.cluster.available() else 0)
        self.store = StoreSync(self.table,
                               lambda: Registry.open_state_dir(self.state_dir, create=False),
                               run_store, self.applied)
        self.store.sync_now(self.registry)
        self.udp = control_sockets(self, config, reactor, self.handler, self.metrics,
                                   self.replay, self.stamper, "relay.udp")
        fastio.configure(config["tls.fast_path"])
        self.tls = server_tls(self.state_dir)
        self.tunnel_listener = self.terminal_https = self.terminal_http = None
        if config["tunnel.listen"]:
            app = _CountedTunnelFactory(self.relay, self.traffic)
            self.tunnel_listener = EndpointListener(
                reactor, config["tunnel.listen"], Admission(
                    self.limits, limits.TUNNEL,
                    fastio.TLSFactory(self.tls.tunnel, False, app, half_rtt=True), app))
            self.tunnel_listener.setServiceParent(self)
        if https:
            app = TerminalFactory(self.relay, True)
            self.terminal_https = EndpointListener(
                reactor, https, Admission(
                    self.limits, limits.TERMINAL,
                    fastio.TLSFactory(self.tls.terminal, False, app), app))
            self.terminal_https.setServiceParent(self)
        if http:
            app = TerminalFactory(self.relay, False)
            self.terminal_http = EndpointListener(
                reactor, http, Admission(self.limits, limits.TERMINAL, app, app))
            self.terminal_http.setServiceParent(self)
        self.admin = self._admin(config, reactor)
        every(self, config["relay.sync_interval"], self._sync_round, reactor)
        common_services(config, self.metrics, reactor, self)

    def _admin(self, config, reactor):
        """The admin page's listener (p2pnat.relay.admin), if ``admin.listen`` is set."""
        if not config["admin.listen"]:
            return None
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from p2pnat.deployment.registry import verify_stored
        from p2pnat.relay.admin.auth import AdminSessions
        from p2pnat.relay.admin.web import AdminResource, AdminSite, RelayView
        from p2pnat.relay.credentials import CredentialChecker

        path = config.path_of("admin.credential_file")
        stored = pki.read_secret(path).decode("utf-8", "replace").strip()
        if not stored.startswith("scrypt$"):
            raise C.ConfigError(f"{path}: not an admin password hash (make one with"
                                " `p2pnat cluster admin-password`)")
        checker = CredentialChecker(reactor, self.relay.credentials.run_blocking,
                                    verify_stored, credential_limits(config))
        page = AdminResource(RelayView(self),
                             AdminSessions(reactor, config["admin.session_lifetime"]),
                             checker, stored)
        listener = EndpointListener(reactor, config["admin.listen"], TLSMemoryBIOFactory(
            self.tls.terminal, False, AdminSite(page)))
        listener.setServiceParent(self)
        return listener

    def _pool(self, minthreads, maxthreads, name):
        """A runner on a thread pool of the relay's own (run while the service runs)."""
        pool = ThreadPool(minthreads, maxthreads, name)
        self.pools.append(pool)
        return lambda f, *args: deferToThreadPool(self.reactor, pool, f, *args)

    def _cluster(self, config, reactor):
        """The node's L{p2pnat.cluster.state.IClusterState}, from ``[cluster]``."""
        node = config["cluster.node"] or socket.gethostname().split(".")[0].lower()
        url = config["cluster.redis"]
        if not url:
            return EmbeddedState(node, config["cluster.addresses"], self.own_live)
        from p2pnat.cluster.redis import RedisState

        check_node_name(node)
        return RedisState(reactor, url, node, config["cluster.addresses"],
                          terminal_secret(self.state_dir), config["relay.access_check_period"],
                          self.tunnel_address, self)

    def tunnel_address(self):
        """
        Where devices open tunnels to this node, told to other nodes (their
        connect requests for this node's sessions name it): tunnel.public_host,
        else the host of the first cluster address, else the tunnel
        listener's own address if it is not a wildcard, else the relay's
        host name.
        """
        host = self.relay.tunnel_host
        if not host and self.config["cluster.addresses"]:
            host = C.parse_hostport(self.config["cluster.addresses"][0])[0]
        if not host and self.tunnel_listener is not None and self.tunnel_listener.port:
            bound = self.tunnel_listener.address[0]
            if not ipaddress.ip_address(bound).is_unspecified:
                host = bound
        return host or self.hostname, self.relay.tunnel_port

    def own_live(self):
        """
        The L{LiveEntry} of every device live on this node (its notifies
        reach it; a revoked device is live nowhere).
        """
        now = self.reactor.seconds()
        return [LiveEntry(d.id, self.cluster.node, d.addr[0], d.addr[1], d.last_access)
                for d in self.table if d.addr is not None and d.socket is not None
                and not d.revoked and d.last_access is not None
                and now - d.last_access <= self.table.period]

    def _live(self, state, kind, now):
        self.cluster.notified(state.id, kind, state.addr, state.last_access, now)

    def _sync_round(self):
        d = self.store.round()
        if self.cluster.shared:
            # Not waited for: a cluster round waiting for an absent Redis
            # must not hold up the store's.
            self.cluster.round()
        self._write_stats()
        return d

    def stats(self, now):
        """This node's L{NodeStats} now."""
        relay = self.relay
        tunnels = sum(len(t) for t in relay.tunnels.values())
        return NodeStats(self.cluster.node, now, len(relay.sessions), tunnels,
                         tunnels - sum(len(t) for t in relay.idle.values()),
                         len(relay.terminals), self.traffic.from_devices,
                         self.traffic.to_devices)

    def _write_stats(self):
        """
        Every few seconds, this node's stats record for `p2pnat cluster
        status`: in Redis on a cluster, else a file in the state directory.
        """
        now = self.reactor.seconds()
        if self._stats_written is not None and now - self._stats_written < STATS_INTERVAL:
            return
        self._stats_written = now
        stats = self.stats(now)
        if self.cluster.shared:
            if self.cluster.available():
                write_stats(self.cluster.link.command, stats).addErrback(lambda f: None)
            return
        path = os.path.join(self.state_dir, STATS_FILE)
        try:
            with open(path + ".new", "w") as f:
                f.write(stats.to_json() + "\n")
            os.replace(path + ".new", path)
        except OSError as e:
            held = self._stats_throttle("write")
            if held is not None:
                self.log.warn("cannot write {path}: {error}", path=path, error=e.strerror)

    # -- what the cluster asks of this node (p2pnat.cluster.redis.RedisState) --------

    def send_connect(self, device_id, session_id, nonce, host, port):
        return self.relay.send_connect(device_id, session_id, nonce, host, port)

    def device_left(self, device_id):
        self.relay.device_left(device_id)

    def local_records(self):
        """
        This node's own registry (its SQLite), as last read: device ID ->
        record; with the revocations made here of devices it lacks.
        """
        if not self._revoked_here:
            return self._local_records
        return {**self._revoked_here, **self._local_records}

    def apply_records(self, records):
        """
        Registry records from any source in a cluster (this node's SQLite,
        the shared registry): each replaces the one in the table unless
        that one is newer (L{p2pnat.cluster.state.newer}); none is removed.
        """
        for r in records.values():
            old = self.table.get(r.id)
            if old is None or not newer(old.record, r):
                self._put_record(r)

    def revoke(self, device_id):
        """
        Revoke a device in this node's registry, now: its tunnels close on
        this node at once and, in a cluster, on every node as soon as the
        change is merged (one Redis round trip).  For the admin page.
        """
        if self.registry.device(device_id) is None and self.cluster.shared:
            # Provisioned on another node: this node's SQLite has no row to
            # mark, so the revocation goes to the shared registry, where it
            # wins over the active record (p2pnat.cluster.state.newer).
            d = self.table.get(device_id)
            if d is not None and d.record is not None and not d.revoked:
                record = dataclasses.replace(d.record, revoked=self.reactor.seconds())
                # Kept in this node's SQLite too (as the shared registry has
                # it, revoked): refused after a restart with Redis away, and
                # merged again into a Redis that came back empty.
                self.registry.import_device(record)
                self._revoked_here[device_id] = record
                self.apply_records({device_id: record})
                self.cluster.publish_registry({device_id: record})
            return
        self.registry.revoke_device(device_id)
        self.sync()

    def startService(self):
        for pool in self.pools:
            pool.start()
        super().startService()
        # Now that every socket is bound: a relay given several addresses
        # answers RFC 5780 tests as the lobby does (p2pnat.net.udp).
        link_siblings([udp.protocol for udp in self.udp])
        if not self.cluster.addresses:
            self.cluster.addresses = tuple(f"{h}:{p}" for h, p in
                                           (u.address for u in self.udp))
        self.cluster.start()
        # With port 0 (tests), learn the ports actually bound.
        if self.tunnel_listener is not None and not self.relay.tunnel_port:
            self.relay.tunnel_port = self.tunnel_listener.address[1]
        if self.terminal_https is not None and not self.relay.https_port:
            self.relay.https_port = self.terminal_https.address[1]
        if self.terminal_http is not None and not self.relay.http_port:
            self.relay.http_port = self.terminal_http.address[1]
        self.log.info(
            "relay {hostname}: {n} devices registered; notifies on {udp}; terminals on"
            " {terminals}; tunnels on port {tunnel}", hostname=self.hostname, n=len(self.table),
            udp=", ".join(wire.format_addr(u.address) for u in self.udp),
            terminals=", ".join(f"{kind} port {port}" for kind, port in
                                (("https", self.relay.https_port), ("http", self.relay.http_port))
                                if port),
            tunnel=self.relay.tunnel_port)
        self.relay.warn_unreachable_ids()
        if self.admin is not None:
            hosts = [port.getHost() for port in self.admin.ports]
            self.log.info("admin page on {addr} (https)", addr=", ".join(
                wire.format_addr((h.host, h.port)) for h in hosts))
        sizes = self.limits.sizes
        self.log.info(
            "open-file limit {nofile}: at most {total} connections, {terminals} of them"
            " terminals ({per_terminal} from one source) and the rest kept for device tunnels"
            " ({per_tunnel} from one source); {streams} streams to one device from one source",
            nofile=self.nofile, total=sizes.max_connections, terminals=sizes.max_terminals,
            per_terminal=sizes.terminals_per_source, per_tunnel=sizes.tunnels_per_source,
            streams=self.relay.shares.per_source)

    def applied(self, records):
        """
        After each store round: bring the device table in step with the
        registry's C{records} if they changed (else None).
        """
        if records is not None:
            self._local_records = records
            if self.cluster.shared:
                self.apply_records(records)
                self.cluster.publish_registry(records)
            else:
                self.reload(records)
        self.metrics.online.set(self.table.online(self.reactor.seconds()))

    def reload(self, records):
        """Bring the device table in step with the registry's C{records}."""
        for device_id in [d.id for d in self.table if d.id not in records]:
            self.table.remove(device_id)
            self.relay.device_revoked(device_id)
        for r in records.values():
            self._put_record(r)

    def _put_record(self, r):
        """Put one registry record in the device table (closing what a revocation ends)."""
        old = self.table.get(r.id)
        if old is not None and old.record == r:
            return
        # r.revoked is a time or None: a revocation at 0.0 is one too.
        revoked = r.revoked is not None
        if old is not None and not old.revoked and (revoked or old.mac_key != r.mac_key
                                                    or old.record.cert_fingerprint
                                                    != r.cert_fingerprint):
            self.log.info("device {device_id} revoked or re-provisioned; closing its"
                          " tunnels", device_id=r.id)
            self.relay.device_revoked(r.id)
        addr = (r.addr_host, r.addr_port) if r.addr_host else None
        self.table.put(DeviceState(r.id, r.mac_key, revoked, r.last_access, addr,
                                   r.access_mode, r))
        if revoked:
            self.replay.forget(r.id)

    def sync(self):
        """
        A store round now, on the calling thread: the queued notify-A times
        are written and registry changes picked up before it returns.  The
        periodic rounds (every ``relay.sync_interval`` seconds) run on the
        store's worker instead.
        """
        self.store.sync_now(self.registry)

    def stopService(self):
        d = super().stopService()  # waits for a round under way
        self.relay.close_all()
        d.addCallback(lambda _: self.cluster.stop())
        d.addCallback(lambda _: self.store.close())

        def closed(result):
            for pool in self.pools:
                pool.stop()
            self.registry.close()
            return result

        return d.addBoth(closed)


def ensure_state(state_dir, hostname):
    """
    Make a relay state directory usable: if it has no CA yet, create one
    and a certificate for C{hostname} (what `p2pnat relay init` does), so
    that a first start needs no manual step.
    """
    ca = os.path.join(state_dir, pki.CA_CERT_FILE)
    if os.path.exists(ca):
        return
    from p2pnat.deployment.provision import init_relay_state

    RelayService.log.info("no CA in {state_dir}: creating one, and a certificate for"
                          " {hostname}", state_dir=state_dir, hostname=hostname)
    init_relay_state(state_dir, hostname)


#: Seconds a tunnel's TLS session ticket can be resumed.
TICKET_LIFETIME = 3600


class _TLS:
    def __init__(self, terminal, tunnel):
        self.terminal = terminal
        self.tunnel = tunnel


def server_tls(state_dir):
    """
    TLS contexts of the relay: terminals get the relay's certificate with
    ALPN http/1.1 (browsers then keep one origin per connection); tunnels
    must present a client certificate issued by the deployment's CA.
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate, CertificateOptions

    def read(name, secret=False):
        path = os.path.join(state_dir, name)
        return pki.read_secret(path) if secret else open(path, "rb").read()

    key = crypto.load_privatekey(crypto.FILETYPE_PEM, read(pki.RELAY_KEY_FILE, True))
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, read(pki.RELAY_CERT_FILE))
    ca = Certificate.loadPEM(read(pki.CA_CERT_FILE)).original
    terminal = CertificateOptions(privateKey=key, certificate=cert,
                                  acceptableProtocols=[b"http/1.1"])
    # Session tickets let an agent resume (p2pnat.net.fastio.SessionCache): its
    # next tunnel's handshake skips certificates and signatures.  The
    # ticket keeps the device's certificate, which RelayTunnel checks
    # against the registry after every handshake, resumed or not.
    tunnel = CertificateOptions(privateKey=key, certificate=cert, verify=True, caCerts=[ca],
                                requireCertificate=True, enableSessionTickets=True)
    tunnel.getContext().set_timeout(TICKET_LIFETIME)
    return _TLS(terminal, tunnel)


def makeService(config, reactor=None, run_blocking=None, run_store=None):
    """
    The relay's service tree; C{run_blocking} and C{run_store} are
    L{RelayService}'s runners (default: its own thread pools).
    """
    if reactor is None:
        from twisted.internet import reactor
    with startup_errors("relay"):
        return RelayService(config.config, reactor, run_blocking, run_store)
