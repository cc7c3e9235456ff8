# -*- test-case-name: tests.unit.test_taps -*-
"""
``twistd lobby``: introduces peers for hole punching.
"""

import ipaddress
import os
import socket

from twisted.application import service

from p2pnat.cluster.state import check_node_name, check_node_setting, check_redis_setting
from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.daemon.metrics import Metrics
from p2pnat.daemon.services import (
    common_services,
    control_sockets,
    every,
    make_options,
    open_state_registry,
    startup_errors,
)
from p2pnat.lobby.server import Lobby
from p2pnat.net.udp import link_siblings
from p2pnat.protocol import wire


def _addresses(value):
    for item in value:
        C.parse_hostport(item)


SCHEMA = [
    C.Setting("lobby.state_dir", str, "/var/lib/p2pnat/lobby",
              "directory of the lobby's client registry"),
    C.Setting("udp.listen", list, ["0.0.0.0:3478", "0.0.0.0:3479"],
              "UDP addresses, one socket each (several ports let clients discover their"
              " NAT's behaviour); all answer STUN", C.udp_addresses, item=str),
    C.Setting("udp.stun_rate", float, 20.0,
              "STUN answers per second per source address, across all the lobby's sockets"
              " (0: STUN off)", C.non_negative),
    C.Setting("lobby.keepalive", int, 20,
              "seconds between clients' keepalives (presence ends after three missed)",
              C.positive),
    C.Setting("lobby.relay_rate", int, 512 * 1024,
              "bytes per second the lobby relays for one session that cannot go direct",
              C.positive),
    C.Setting("lobby.request_rate", float, 5.0,
              "connect requests per second one client may make (burst: twice that)",
              C.positive),
    C.Setting("lobby.sync_interval", float, 1.0,
              "seconds between checks for registry changes (clients added or removed)",
              C.positive),
    C.Setting("cluster.redis", str, "",
              "redis://HOST:PORT/DB of the Redis lobby nodes share (presence, messages);"
              ' "": a single lobby (the default)', check_redis_setting),
    C.Setting("cluster.node", str, "",
              "this node's name, unique among the lobby nodes (\"\": the machine's host name)",
              check_node_setting),
    C.Setting("cluster.addresses", list, [],
              "this node's UDP address (host:port) as clients of other lobby nodes reach it:"
              " the first udp.listen socket's, where they bind the relayed sessions this node"
              " introduces (so it must be reachable from where clients are);"
              " []: that socket's bound address", _addresses, item=str),
    C.Setting("cluster.secret_file", str, "",
              "file holding the secret every lobby node shares (at least 32 bytes)"
              ' ("": cluster.secret in lobby.state_dir)'),
] + C.COMMON


class Options(make_options("lobby", SCHEMA, "lobby.toml")):
    pass


class ClientKeys:
    """
    The MAC keys of the lobby's clients, loaded from the registry and
    reloaded when it changes.
    """

    def __init__(self, registry):
        self.registry = registry
        self.keys = {}
        self.version = None
        self.reload()

    def reload(self):
        self.keys = {c.id: c.mac_key for c in self.registry.clients()}
        self.version = self.registry.data_version()

    def sync(self):
        if self.registry.data_version() != self.version:
            self.reload()

    def get(self, client_id):
        return self.keys.get(client_id)


class LobbyService(service.MultiService):
    """
    The lobby: one UDP socket per configured address, a shared handler.
    """

    log = Logger(namespace="p2pnat.lobby")

    def __init__(self, config, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics("lobby")
        self.registry = open_state_registry(config, "lobby.state_dir")
        self.keys = ClientKeys(self.registry)
        self.handler = self.lobby = Lobby(
            self.keys.get, reactor, self.metrics, keepalive=config["lobby.keepalive"],
            relay_rate=config["lobby.relay_rate"], request_rate=config["lobby.request_rate"])
        self.cluster = self._cluster(config, reactor)
        self.lobby.cluster = self.cluster
        self.udp = control_sockets(self, config, reactor, self.handler, self.metrics,
                                   wire.ReplayGuard(reactor), wire.Stamper(reactor), "lobby.udp")
        every(self, config["lobby.sync_interval"], self.sync, reactor)
        common_services(config, self.metrics, reactor, self)

    def _cluster(self, config, reactor):
        """The node's L{p2pnat.cluster.lobby.RedisLobbyCluster}, or None (no ``cluster.redis``)."""
        url = config["cluster.redis"]
        if not url:
            return None
        from p2pnat.cluster.lobby import RedisLobbyCluster, lobby_secret

        node = config["cluster.node"] or socket.gethostname().split(".")[0].lower()
        check_node_name(node)
        if not config["cluster.addresses"] and ipaddress.ip_address(
                C.listen_address(config["udp.listen"][0])[0]).is_unspecified:
            raise C.ConfigError("cluster.addresses: needed when the first udp.listen address"
                                " is a wildcard (other nodes must know where to reach this one)")
        path = (config.path_of("cluster.secret_file") if config["cluster.secret_file"]
                else os.path.join(config.path_of("lobby.state_dir"), "cluster.secret"))
        try:
            secret = lobby_secret(path)
        except ValueError as e:
            raise C.ConfigError(f"cluster.secret_file: {e}")
        return RedisLobbyCluster(reactor, url, node, secret, config["lobby.keepalive"], self)

    def cluster_message(self, fields):
        """A message from another node (L{p2pnat.lobby.server.Lobby.cluster_message})."""
        self.lobby.cluster_message(fields)

    def client_ids(self):
        """This node's clients, revoked ones left out (the cluster's client list)."""
        return list(self.keys.keys)

    def sync(self):
        """
        Pick up clients added or removed, and expire presence, requests and
        sessions.  A failure is logged; the next round tries again.
        """
        try:
            self.keys.sync()
            self.lobby.expire()
            if self.cluster is not None:
                self.cluster.sync_clients()
        except Exception:
            self.log.failure("lobby housekeeping failed; retrying next round")

    def startService(self):
        super().startService()
        # Now that every socket is bound: answer RFC 5780 CHANGE-REQUESTs
        # from the socket with the other port or IP.
        link_siblings([udp.protocol for udp in self.udp])
        if self.cluster is not None:
            # A relayed session this node introduces runs here alone: the
            # other node's client binds its role at the first socket's
            # address, which the Invite names.
            first = self.udp[0]
            listed = self.config["cluster.addresses"]
            self.lobby.relay_address = (C.parse_hostport(listed[0]) if listed
                                        else tuple(first.address[:2]))
            self.log.info("lobby node {node}: other nodes reach it at {addr}",
                          node=self.cluster.node, addr=wire.format_addr(self.lobby.relay_address))
            self.cluster.start()

    def stopService(self):
        d = super().stopService()
        if self.cluster is not None:
            d.addCallback(lambda _: self.cluster.stop())
        d.addCallback(lambda _: self.registry.close())
        return d


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    with startup_errors("lobby"):
        return LobbyService(config.config, reactor)
