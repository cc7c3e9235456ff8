# -*- test-case-name: tests.test_lobby_tap -*-
"""
``twistd lobby``: introduces peers for hole punching (SPEC.md Part 2).
"""

from twisted.application import service
from twisted.application.internet import TimerService

from p2pnat import config as C
from p2pnat import wire
from p2pnat.daemon import UDPService, common_services, make_options, startup_errors
from p2pnat.logs import Logger
from p2pnat.metrics import Metrics
from p2pnat.udp import ControlProtocol

SCHEMA = [
    C.Setting("lobby.state_dir", str, "/var/lib/p2pnat/lobby",
              "directory of the lobby's client registry"),
    C.Setting("udp.listen", list, ["0.0.0.0:3478", "0.0.0.0:3479"],
              "UDP addresses, one socket each (several ports let clients discover their"
              " NAT's behaviour); all answer STUN", C.udp_addresses, item=str),
    C.Setting("udp.stun_rate", float, 20.0,
              "STUN answers per second per source address (0: STUN off)"),
    C.Setting("lobby.sync_interval", float, 1.0,
              "seconds between checks for registry changes (clients added or removed)",
              C.positive),
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


class LobbyHandler:
    """
    Handles authenticated datagrams from lobby clients (see L{p2pnat.udp}).
    """

    log = Logger(namespace="p2pnat.lobby")
    _FROM_CLIENTS = frozenset({wire.Ping.TYPE})

    def __init__(self, keys, clock):
        self.keys = keys
        self.clock = clock

    def key_for(self, key_id, mtype):
        if mtype not in self._FROM_CLIENTS:
            return None
        return self.keys.get(key_id)

    def handle(self, frame, message, addr, proto):
        if isinstance(message, wire.Ping):
            return wire.Pong(frame.timestamp, addr, int(self.clock.seconds() * 1e6))
        return None


class LobbyService(service.MultiService):
    """
    The lobby: one UDP socket per configured address, a shared handler.
    """

    log = Logger(namespace="p2pnat.lobby")

    def __init__(self, config, reactor):
        super().__init__()
        from p2pnat.registry import Registry

        self.config = config
        self.reactor = reactor
        self.metrics = Metrics("lobby")
        self.registry = Registry.open_state_dir(config.path_of("lobby.state_dir"))
        self.keys = ClientKeys(self.registry)
        self.handler = LobbyHandler(self.keys, reactor)
        replay = wire.ReplayGuard(reactor)
        stamper = wire.Stamper(reactor)
        self.udp = []
        for item in config["udp.listen"]:
            host, port = C.parse_hostport(item)
            proto = ControlProtocol(self.handler, reactor, self.metrics, replay,
                                    name="lobby.udp", stun_rate=config["udp.stun_rate"],
                                    stamper=stamper)
            udp = UDPService(reactor, host, port, proto)
            udp.setServiceParent(self)
            self.udp.append(udp)
        sync = TimerService(config["lobby.sync_interval"], self.sync)
        sync.clock = reactor
        sync.setServiceParent(self)
        common_services(config, self.metrics, reactor, self)

    def sync(self):
        try:
            self.keys.sync()
        except Exception:
            self.log.failure("lobby registry reload failed; retrying next round")

    def stopService(self):
        d = super().stopService()
        self.registry.close()
        return d


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    with startup_errors("lobby"):
        return LobbyService(config.config, reactor)
