# -*- test-case-name: tests.test_relay_tap -*-
"""
``twistd relay``: the relay of the relay method (SPEC.md Part 1).
"""

from twisted.application import service
from twisted.application.internet import TimerService

from p2pnat import config as C
from p2pnat import wire
from p2pnat.daemon import UDPService, common_services, make_options
from p2pnat.logs import Logger
from p2pnat.metrics import Metrics
from p2pnat.relay.devices import DeviceState, DeviceTable
from p2pnat.relay.notify import NotifyHandler
from p2pnat.udp import ControlProtocol

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
              "UDP addresses for notifies and STUN, ip:port", C.udp_addresses, item=str),
    C.Setting("udp.stun_rate", float, 20.0,
              "STUN answers per second per source address (0: STUN off)"),
    C.Setting("relay.sync_interval", float, 1.0,
              "seconds between writes of notify A times to the store and checks for"
              " registry changes (devices added or removed)", C.positive),
] + C.COMMON


class Options(make_options("relay", SCHEMA, "relay.toml")):
    pass


class RelayService(service.MultiService):
    """
    The relay: its device table kept in step with the registry, its UDP
    notify sockets.
    """

    log = Logger(namespace="p2pnat.relay")

    def __init__(self, config, reactor):
        super().__init__()
        from p2pnat.registry import Registry

        self.config = config
        self.reactor = reactor
        self.metrics = Metrics("relay")
        self.state_dir = config.path_of("relay.state_dir")
        self.registry = Registry.open_state_dir(self.state_dir)
        self.table = DeviceTable(config["relay.access_check_period"])
        self._data_version = None
        self.reload()
        self.replay = wire.ReplayGuard(reactor)
        self.stamper = wire.Stamper(reactor)
        self.handler = NotifyHandler(self.table, reactor, self.metrics,
                                     config["relay.notify_b_interval"])
        self.udp = []
        for item in config["udp.listen"]:
            host, port = C.parse_hostport(item)
            proto = ControlProtocol(self.handler, reactor, self.metrics, self.replay,
                                    name="relay.udp", stun_rate=config["udp.stun_rate"],
                                    stamper=self.stamper)
            udp = UDPService(reactor, host, port, proto)
            udp.setServiceParent(self)
            self.udp.append(udp)
        sync = TimerService(config["relay.sync_interval"], self.sync)
        sync.clock = reactor
        sync.setServiceParent(self)
        common_services(config, self.metrics, reactor, self)

    def reload(self):
        """Bring the device table in step with the registry."""
        records = {r.id: r for r in self.registry.devices(include_revoked=True)}
        for device_id in [d.id for d in self.table if d.id not in records]:
            self.table.remove(device_id)
        for r in records.values():
            old = self.table.get(r.id)
            if old is not None and old.revoked == bool(r.revoked) and old.mac_key == r.mac_key:
                continue
            if r.revoked and old is not None and not old.revoked:
                self.log.info("device {device_id} revoked", device_id=r.id)
                self.device_revoked(r.id)
            addr = (r.addr_host, r.addr_port) if r.addr_host else None
            self.table.put(DeviceState(r.id, r.mac_key, bool(r.revoked), r.last_access, addr,
                                       r.access_mode, r))
        self._data_version = self.registry.data_version()

    def device_revoked(self, device_id):
        """Hook: end whatever a revoked device still has open."""

    def sync(self):
        """
        Write queued notify-A times to the store and pick up registry
        changes.  Runs every ``relay.sync_interval`` seconds; a failure is
        logged and the next round tries again.
        """
        try:
            pending = self.table.take_pending()
            if pending:
                self.registry.record_accesses(
                    [(device_id, when, host, port)
                     for device_id, (when, host, port) in pending.items()])
            if self.registry.data_version() != self._data_version:
                self.reload()
            self.metrics.online.set(self.table.online(self.reactor.seconds()))
        except Exception:
            self.log.failure("relay store sync failed; retrying next round")

    def stopService(self):
        d = super().stopService()
        self.sync()
        self.registry.close()
        return d


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return RelayService(config.config, reactor)
