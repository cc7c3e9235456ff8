# -*- test-case-name: tests.unit.test_portmap_mapper -*-
"""
:class:`PortMapper`: keep one port mapping on the gateway, with whichever
of PCP, NAT-PMP and UPnP IGD it grants; and :func:`probe`: what the gateway
offers.

The race (:meth:`PortMapper.map`), within one budget:

- PCP and UPnP are asked at once.  NAT-PMP shares PCP's port and server,
  and a NAT-PMP deletion is keyed on the internal port only, so asking
  both at once could make a NAT-PMP grant whose deletion takes the PCP one
  with it.  NAT-PMP is therefore asked as RFC 6887 section 9 says: when the
  gateway answers PCP with "unsupported version" (or any PCP refusal), or
  when PCP has had a third of the budget without an answer (PCP is then
  given up).
- The first grant wins, except that a grant waits for a more preferred
  protocol (pcp > nat-pmp > upnp) still under way, never past the budget.
- A grant that loses is deleted at once, unless it is the very mapping the
  winner holds (same external address and port, as a gateway that speaks
  two protocols gives).  So is a UPnP grant that comes after the budget.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer

from p2pnat.daemon.logs import Logger
from p2pnat.portmap.common import PROTOCOLS, Attempt, check_gateway, default_gateway
from p2pnat.portmap.gateway import NatPmpClient, PcpClient
from p2pnat.portmap.upnp import UpnpClient

#: Seconds between attempts while the gateway grants nothing.
RETRY_INTERVAL = 300.0
#: Bounds on what callers may ask.
MAX_BUDGET = 30.0
MIN_LIFETIME = 2
MAX_LIFETIME = 7 * 86400


def _check(internal_port, transport, protocols, budget, lifetime):
    if not isinstance(internal_port, int) or not 1 <= internal_port <= 65535:
        raise ValueError(f"internal_port {internal_port!r} is not a port")
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be udp or tcp, not {transport!r}")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or isinstance(protocols, str):
        raise ValueError(f"protocols must be among {', '.join(PROTOCOLS)}, not {protocols!r}")
    if not 0 < budget <= MAX_BUDGET:
        raise ValueError(f"budget must be in (0, {MAX_BUDGET}] seconds, not {budget!r}")
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime must be {MIN_LIFETIME}-{MAX_LIFETIME} seconds")


class PortMapper(service.Service):
    """
    Keeps a mapping of ``internal_port`` (``transport``) on the gateway
    while the service runs.

    - :meth:`map` asks once (see the module's docstring for the race);
      it fires with a :class:`~p2pnat.portmap.common.Mapping` or ``None``
      within ``budget`` seconds, and never errbacks.
    - :attr:`current` is the mapping held now, or ``None``.
    - :meth:`subscribe` callbacks get the new :attr:`current` on every
      change: granted, renewed with another external address, lost, given
      back at stop.  A renewal that keeps the address is not a change.
    - :meth:`startService` maps, then renews at half the granted lifetime
      with the protocol that granted (retrying in what time is left, then
      racing anew if the mapping expired); with nothing granted it tries
      again every :data:`RETRY_INTERVAL` seconds.
    - :meth:`stopService` deletes the mapping (a Deferred, within
      ``budget``).

    ``gateway`` ``None`` is the default IPv4 route's gateway, read at each
    race.  :attr:`clients` holds the protocol clients by name.
    """

    def __init__(self, reactor, internal_port, *, transport="udp", protocols=PROTOCOLS,
                 gateway=None, budget=1.0, lifetime=7200, log=None):
        _check(internal_port, transport, protocols, budget, lifetime)
        self.reactor = reactor
        self.internal_port = internal_port
        self.transport = transport
        self.protocols = tuple(p for p in PROTOCOLS if p in protocols)
        self.gateway = check_gateway(gateway) if gateway is not None else None
        self.budget = float(budget)
        self.lifetime = int(lifetime)
        self.log = log or Logger(namespace="p2pnat.portmap")
        self.current = None
        self.clients = {}
        self._clients_gateway = False  # the gateway the clients were made for
        self._subscribers = []
        self._timer = None
        self._racing = False
        self._waiters = []
        self._stopped = False
        self._stop_d = None  # the deletion of what a race granted after stop

    # -- public -----------------------------------------------------------

    def subscribe(self, callback):
        """Call ``callback(mapping_or_None)`` on every change of :attr:`current`."""
        self._subscribers.append(callback)

    def map(self):
        """Ask the gateway now; fires with the mapping granted, or ``None``."""
        waiter = defer.Deferred()
        self._waiters.append(waiter)  # before the race: it may end at once
        if not self._racing:
            self._racing = True
            self._race().addErrback(self._unexpected, "race").addCallback(self._raced)
        return waiter

    def _raced(self, mapping):
        self._racing = False
        if mapping is not None:
            if self._stopped:
                self._stop_d = self._give_back(mapping, None)
                mapping = None
            else:
                self._adopt(mapping)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(mapping)

    def startService(self):
        super().startService()
        self._stopped = False
        self._cycle()

    def stopService(self):
        super().stopService()
        self._stopped = True
        self._cancel_timer()
        mapping, self.current = self.current, None
        deletions = []
        if mapping is not None:
            self.log.info("port mapping: deleting {protocol} mapping {ip}:{port}",
                          protocol=mapping.protocol, ip=mapping.external[0],
                          port=mapping.external[1])
            deletions.append(self._delete(mapping))
            self._tell(None)
        if self._racing:
            # What the race grants is given back when it ends (within the budget).
            waiter = defer.Deferred()
            self._waiters.append(waiter)
            deletions.append(waiter.addCallback(lambda _: self._stop_d))
        return defer.gatherResults(deletions).addBoth(lambda _: None)

    # -- the race ---------------------------------------------------------

    def _gateway_now(self):
        gateway = self.gateway if self.gateway is not None else default_gateway()
        if gateway != self._clients_gateway:
            self._clients_gateway = gateway
            self.clients = {}
            if gateway is not None:
                self.clients["pcp"] = PcpClient(self.reactor, gateway, self.transport, self.log)
                self.clients["nat-pmp"] = NatPmpClient(self.reactor, gateway, self.transport,
                                                       self.log)
            self.clients["upnp"] = UpnpClient(self.reactor, gateway, self.transport, self.log)
        return gateway

    def _race(self):
        self._gateway_now()
        protocols = [p for p in self.protocols if p in self.clients]
        suggested = self.current.external if self.current else None
        results = {}
        pending = set()
        calls = []
        done = defer.Deferred()
        won = []  # the winner, once decided
        asked = {}  # every attempt's Deferred, by protocol

        def ask(protocol, budget):
            pending.add(protocol)
            attempt = self.clients[protocol].request(self.internal_port, self.lifetime, budget,
                                                     suggested)
            asked[protocol] = attempt
            attempt.addCallback(arrived)
            attempt.addErrback(self._unexpected, protocol)

        def arrived(attempt):
            pending.discard(attempt.protocol)
            results[attempt.protocol] = attempt
            if attempt.restarted:
                self.log.info("port mapping: the gateway lost its mappings (epoch)")
            if attempt.mapping is None:
                self.log.debug("port mapping: {protocol}: {reason}",
                               protocol=attempt.protocol, reason=attempt.reason)
            if won:
                self._give_back(attempt.mapping, won[0])
                return
            if attempt.protocol == "pcp" and attempt.mapping is None and natpmp_waiting:
                start_natpmp()
            decide()

        def best():
            for protocol in PROTOCOLS:
                attempt = results.get(protocol)
                if attempt is not None and attempt.mapping is not None:
                    return attempt.mapping
            return None

        def decide(deadline=False):
            if won:
                return
            winner = best()
            if not deadline:
                waiting = pending | set(natpmp_waiting)
                if winner is None and waiting:
                    return
                if winner is not None and any(
                        PROTOCOLS.index(p) < PROTOCOLS.index(winner.protocol) for p in waiting):
                    return
            for call in calls:
                if call.active():
                    call.cancel()
            natpmp_waiting.clear()
            for attempt in results.values():
                if attempt.mapping is not None and attempt.mapping is not winner:
                    self._give_back(attempt.mapping, winner)
            won.append(winner)
            for attempt in asked.values():
                attempt.cancel()  # at the deadline: stop asking (a late grant is given back)
            done.callback(winner)

        def start_natpmp():
            if natpmp_waiting and not won:
                natpmp_waiting.clear()
                left = self.budget - (self.reactor.seconds() - started)
                ask("nat-pmp", max(left, 0.05))
                # A silent PCP is given up: both at once could leave a
                # NAT-PMP mapping whose deletion takes the PCP one along.
                if "pcp" in asked:
                    asked["pcp"].cancel()

        started = self.reactor.seconds()
        natpmp_waiting = []
        if "nat-pmp" in protocols and "pcp" in protocols:
            natpmp_waiting.append("nat-pmp")
            calls.append(self.reactor.callLater(self.budget / 3, start_natpmp))
        calls.append(self.reactor.callLater(self.budget, decide, True))
        for protocol in protocols:
            if protocol not in natpmp_waiting:
                ask(protocol, self.budget)
        if not protocols:
            decide(True)
        return done

    def _give_back(self, mapping, winner):
        """Delete a grant that lost the race, unless it is the winner's own mapping."""
        if mapping is None or mapping.same_as(winner):
            return None
        self.log.info("port mapping: giving back the {protocol} grant {ip}:{port}",
                      protocol=mapping.protocol, ip=mapping.external[0],
                      port=mapping.external[1])
        return self._delete(mapping)

    def _delete(self, mapping):
        client = self.clients.get(mapping.protocol)
        if client is None:  # the gateway changed since: the mapping went with it
            return defer.succeed(False)
        return client.delete(mapping, self.budget).addErrback(self._unexpected, "delete")

    # -- holding the mapping ------------------------------------------------

    def _adopt(self, mapping):
        old, self.current = self.current, mapping
        if self.running:
            self._schedule(mapping.lifetime / 2, self._renew)
        if old is None or not old.same_as(mapping):
            self.log.info("port mapping: {protocol} granted {ip}:{port} for {lifetime}s",
                          protocol=mapping.protocol, ip=mapping.external[0],
                          port=mapping.external[1], lifetime=mapping.lifetime)
            if old is not None and old.protocol != mapping.protocol:
                self._give_back(old, mapping)
            self._tell(mapping)

    def _cycle(self):
        """Race; if nothing is granted, try again later."""
        if not self.running:
            return

        def after(mapping):
            if mapping is None and self.running and self.current is None:
                self._schedule(RETRY_INTERVAL, self._cycle)
            return mapping

        self.map().addCallback(after)

    def _renew(self):
        mapping = self.current
        if mapping is None or not self.running:
            return
        client = self.clients.get(mapping.protocol)
        if client is None:  # the gateway changed since
            d = defer.succeed(Attempt(mapping.protocol, None, "gateway-changed"))
        else:
            d = client.request(self.internal_port, self.lifetime, self.budget, mapping.external)

        def renewed(attempt):
            if not self.running or self.current is not mapping:
                self._give_back(attempt.mapping, self.current)
                return
            if attempt.mapping is not None:
                self._adopt(attempt.mapping)
                return
            left = mapping.expires_at - self.reactor.seconds()
            self.log.info("port mapping: renewal by {protocol} failed ({reason}), "
                          "{left:.0f}s left", protocol=mapping.protocol,
                          reason=attempt.reason, left=left)
            if left > 4 * self.budget:
                self._schedule(left / 2, self._renew)
            else:
                self._schedule(max(left, 0), self._expired, mapping)

        d.addCallback(renewed).addErrback(self._unexpected, "renew")

    def _expired(self, mapping):
        if self.current is not mapping:
            return
        self.log.info("port mapping: lost {ip}:{port}", ip=mapping.external[0],
                      port=mapping.external[1])
        self.current = None
        self._tell(None)
        self._cycle()

    def _schedule(self, delay, f, *args):
        self._cancel_timer()
        self._timer = self.reactor.callLater(delay, f, *args)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tell(self, mapping):
        for callback in list(self._subscribers):
            try:
                callback(mapping)
            except Exception:
                self.log.failure("port mapping: a subscriber failed")

    def _unexpected(self, failure, what):
        # Returns None: the Deferred goes on as if nothing was granted.
        self.log.failure("port mapping: {what} failed", failure, what=what)


def probe(reactor, gateway=None, budget=1.0):
    """
    What the gateway offers, keeping no mapping: fires within ``budget``
    with ``{"pcp": bool, "nat-pmp": bool, "upnp": bool, "external": ip or
    None}`` (the external address from NAT-PMP, else UPnP), and never
    errbacks.
    """
    if not 0 < budget <= MAX_BUDGET:
        raise ValueError(f"budget must be in (0, {MAX_BUDGET}] seconds")
    gateway = check_gateway(gateway) if gateway is not None else default_gateway()
    none = defer.succeed
    pcp = PcpClient(reactor, gateway).announce(budget) if gateway else none(False)
    natpmp = (NatPmpClient(reactor, gateway).external_address(budget) if gateway
              else none(None))
    upnp = UpnpClient(reactor, gateway).external_address(budget)

    def report(results):
        has_pcp, natpmp_ip, upnp_ip = results
        return {"pcp": bool(has_pcp), "nat-pmp": natpmp_ip is not None,
                "upnp": upnp_ip is not None, "external": natpmp_ip or upnp_ip}

    return defer.gatherResults([pcp, natpmp, upnp]).addCallback(report)
