# -*- test-case-name: tests.test_agent_tap -*-
"""
``twistd device-agent``: keeps a device reachable through its relay.
"""

import ipaddress
import os
import stat

from twisted.application import service

from p2pnat import config as C
from p2pnat import wire
from p2pnat.agent.notifier import Notifier
from p2pnat.daemon import UDPService, common_services, make_options
from p2pnat.logs import Logger
from p2pnat.metrics import Metrics
from p2pnat.udp import ControlProtocol

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
    C.Setting("agent.notify_b_interval", float, 20.0,
              "seconds between notify B (keep it below the NAT's UDP timeout)", C.positive),
    C.Setting("udp.listen", str, "0.0.0.0:0", "local UDP address for notifies", C.hostport),
] + C.COMMON


class Options(make_options("device-agent", SCHEMA, "device-agent.toml")):
    def check(self, config):
        if not config["agent.device_id"]:
            raise C.ConfigError(f"{config.path or 'command line'}: agent.device_id: missing"
                                " (the ID given to `p2pnat device add`)")
        if not wire.valid_key_id(config["agent.device_id"]):
            raise C.ConfigError(f"{config.path}: agent.device_id: not a valid device ID")
        self.mac_key = read_mac_key(config, "agent.mac_key_file")


def read_mac_key(config, name):
    """
    Read a MAC key file (hex): it must exist, be readable by its owner only
    and hold L{wire.KEY_LEN} bytes.

    @raise C.ConfigError: naming the file and the setting.
    """
    path = config.path_of(name)
    where = f"{config.path or 'command line'}: {name}"
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise C.ConfigError(f"{where}: {path} is readable by others; chmod 600 it")
        with open(path) as f:
            key = bytes.fromhex(f.read().strip())
    except OSError as e:
        raise C.ConfigError(f"{where}: cannot read {path}: {e.strerror}")
    except ValueError:
        raise C.ConfigError(f"{where}: {path} does not hold a hex key")
    if len(key) != wire.KEY_LEN:
        raise C.ConfigError(f"{where}: {path} holds {len(key)} bytes, expected {wire.KEY_LEN}")
    return key


class AgentService(service.MultiService):
    """
    The device agent: its notify socket and timers.
    """

    log = Logger(namespace="p2pnat.agent")

    def __init__(self, config, mac_key, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics("device-agent")
        self.relay_host, self.relay_port = C.parse_hostport(config["agent.relay"])
        self.notifier = Notifier(config["agent.device_id"], mac_key, None, reactor,
                                 config["agent.notify_b_interval"], self.connect_requested)
        self.proto = ControlProtocol(self.notifier, reactor, self.metrics,
                                     self.notifier.replay, name="agent.udp", stun_rate=0,
                                     stamper=self.notifier.stamper)
        host, port = C.parse_hostport(config["udp.listen"])
        UDPService(reactor, host, port, self.proto).setServiceParent(self)
        common_services(config, self.metrics, reactor, self)
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
        """Hook: open the tunnel a verified connect request asks for."""

    def stopService(self):
        self.notifier.stop()
        if self._resolving is not None and self._resolving.active():
            self._resolving.cancel()
        return super().stopService()


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return AgentService(config.config, config.mac_key, reactor)
