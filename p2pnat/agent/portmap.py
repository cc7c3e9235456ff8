# -*- test-case-name: tests.unit.test_agent_portmap -*-
"""
Port mapping for the device agent: while the agent runs, its gateway keeps
a mapping (PCP, NAT-PMP or UPnP IGD: L{p2pnat.portmap}) to the agent's UDP
notify socket, and the agent's notifies tell the relay the mapped public
address.  The relay sends each connect request there as well as to the
notifies' source, so the device stays reachable when its NAT drops the
notifies' mapping before the next notify B.
"""


from twisted.application import service

from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.net.sources import is_loopback
from p2pnat.protocol import wire

SCHEMA = [
    C.Setting("agent.port_mapping", bool, True,
              "ask the gateway (PCP, NAT-PMP, UPnP IGD) to map the notify socket's port while"
              " the agent runs, and tell the relay the mapped address (false: never ask)"),
    C.Setting("agent.port_mapping_budget", float, 1.0,
              "seconds the gateway has to grant the mapping (all protocols at once)",
              C.positive),
]


def make_mapper(reactor, internal_port, **options):
    """
    A L{p2pnat.portmap.PortMapper}.  Imported here, only for an agent that
    maps a port: an agent with port mapping off never loads it.
    """
    from p2pnat.portmap import PortMapper

    return PortMapper(reactor, internal_port, **options)


class NotifyPortMapping(service.MultiService):
    """
    Keeps a port mapping for the agent's notify socket while the agent
    runs; a child of the agent's service tree, after the socket's
    L{p2pnat.daemon.services.UDPService}.

    The socket's port is known only once it listens (``udp.listen`` may
    say port 0), so the mapper is made in L{startService}, as a child of
    this service: it maps the port and renews the mapping before it
    expires, and stopping the agent stops it, which deletes the mapping
    (the agent's C{stopService} waits for that, within the mapper's
    budget).  Each change of the mapping (granted, moved, lost) goes to
    the notifier (L{p2pnat.agent.notifier.Notifier.set_mapped}).

    A socket bound to a loopback address asks for nothing: nothing from
    outside the host can reach it, mapped or not.

    @param udp: the notify socket's UDPService.
    @param notifier: the agent's L{p2pnat.agent.notifier.Notifier}.
    @param budget: seconds the gateway has to grant the mapping.
    """

    log = Logger(namespace="p2pnat.agent.portmap")
    #: Makes the mapper: L{make_mapper}'s signature (tests give a double).
    make_mapper = staticmethod(make_mapper)

    def __init__(self, reactor, udp, notifier, budget=1.0):
        super().__init__()
        self.reactor = reactor
        self.udp = udp
        self.notifier = notifier
        self.budget = budget
        self.mapper = None

    def startService(self):
        super().startService()
        host, port = self.udp.address
        if is_loopback(host):
            self.log.info("notify socket on loopback ({addr}): no port mapping asked",
                          addr=wire.format_addr((host, port)))
            return
        self.mapper = self.make_mapper(self.reactor, port, transport="udp", budget=self.budget)
        self.mapper.subscribe(self._changed)
        self.mapper.setServiceParent(self)  # starts it: it maps the port

    def stopService(self):
        # Its changes from now on are not told: the agent is stopping.
        mapper, self.mapper = self.mapper, None
        d = super().stopService()  # stops the mapper, which deletes the mapping
        if mapper is not None:
            # A restarted agent may listen on another port: a new mapper then.
            mapper.disownServiceParent()
        return d

    def _changed(self, mapping):
        if self.mapper is None:
            return  # stopping: the mapper deletes what it holds
        external = tuple(mapping.external) if mapping is not None else None
        if external == self.notifier.mapped:
            return
        if external is None:
            self.log.info("port mapping gone; the relay reaches the device through its"
                          " notifies' mapping only")
        else:
            self.log.info("gateway mapped {external} to notify port {port} ({protocol},"
                          " {lifetime:.0f}s)", external=wire.format_addr(external),
                          port=mapping.internal_port, protocol=mapping.protocol,
                          lifetime=mapping.lifetime)
        self.notifier.set_mapped(external)


def add_port_mapping(config, reactor, udp, notifier, parent):
    """
    The agent's port mapping as configured (``agent.port_mapping``,
    ``agent.port_mapping_budget``), as a child of C{parent} after C{udp}:
    the L{NotifyPortMapping}, or None when it is off.
    """
    if not config["agent.port_mapping"]:
        return None
    mapping = NotifyPortMapping(reactor, udp, notifier, config["agent.port_mapping_budget"])
    mapping.setServiceParent(parent)
    return mapping
