# -*- test-case-name: tests.unit.test_portmap_clients -*-
"""
UPnP IGD (v1 and v2) port mapping: our own SSDP search on the reactor,
then miniupnpc's Python binding for the rest.

miniupnpc is the reference UPnP IGD client, maintained with miniupnpd, and
it does what we would otherwise write and keep up: the device
description's XML, choosing a connected WANIPConnection (v1 or v2) and the
SOAP calls.  Its own discovery always waits at least a second after the
last answer, more than a port-mapping budget, so the search is ours (one
M-SEARCH per IGD version to the SSDP group and to the gateway, the first
answer wins) and miniupnpc starts from the description URL found.

miniupnpc's calls block (sockets with their own timeouts), so they run on
a small thread pool of our own, never the reactor's, so that a slow
router cannot take the threads DNS and other work need.  Each call to the
client is bounded by its budget: a result that comes later is not waited
for, and a mapping granted too late is deleted at once.
"""

from __future__ import annotations

import threading
import urllib.parse

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.portmap.common import DESCRIPTION, Attempt, Mapping
from p2pnat.portmap.gateway import Asking
from p2pnat.protocol import portmap as wire

#: Threads in our pool: one mapping and one deletion or probe at a time.
POOL_THREADS = 2
#: Share of the budget the SSDP search may take (the rest: HTTP and SOAP).
SEARCH_SHARE = 0.6
#: External ports to try when the one we ask for is taken (IGD v1 has no
#: "any port" call).
PORT_TRIES = 3

_pools = {}
_pools_lock = threading.Lock()


def _load_miniupnpc():
    try:
        import miniupnpc
    except ImportError:
        return None
    return miniupnpc.UPnP


def shared_runner(reactor):
    """
    ``run(f, *args) -> Deferred`` on this reactor's UPnP thread pool, made
    on first use and stopped when the reactor shuts down.
    """
    with _pools_lock:
        pool = _pools.get(id(reactor))
        if pool is None:
            pool = ThreadPool(0, POOL_THREADS, name="p2pnat-upnp")
            pool.start()
            _pools[id(reactor)] = pool

            def stop():
                with _pools_lock:
                    _pools.pop(id(reactor), None)
                pool.stop()

            reactor.addSystemEventTrigger("during", "shutdown", stop)
    return lambda f, *args: deferToThreadPool(reactor, pool, f, *args)


def _bounded(reactor, d, budget, on_late):
    """
    A Deferred that fires with ``d``'s result, or with ``None`` after
    ``budget`` seconds (or when cancelled); in that case ``on_late(result)``
    gets ``d``'s result when it comes.  A failure of ``d`` arrives as a
    :class:`_Failed` result.
    """

    def timeout(_=None):
        if call.active():
            call.cancel()
        if not out.called:
            out.callback(None)

    # Cancelling gives up waiting, as the budget's end does.
    out = defer.Deferred(timeout)
    call = reactor.callLater(budget, timeout)

    def done(result):
        if not out.called:
            call.cancel()
            out.callback(result)
        else:
            on_late(result)

    d.addErrback(lambda f: _Failed(f.value)).addCallback(done)
    return out


class _Failed:
    """A blocking call's exception, carried as a result (so it is never lost)."""

    def __init__(self, error):
        self.error = error

    def __str__(self):
        return " ".join(str(self.error).split())[:80] or type(self.error).__name__


class _Search(Asking):
    """
    An SSDP search for an IGD: fires with the first description URL found
    (on ``gateway``'s address when it is known), or ``None`` at the end of
    ``budget``.
    """

    def __init__(self, reactor, gateway, budget, log, throttle):
        super().__init__(reactor, budget, log, throttle, None)
        self.gateway = gateway

    def _send(self):
        targets = [wire.SSDP_GROUP]
        if self.gateway is not None:
            targets.append((self.gateway, wire.SSDP_GROUP[1]))  # unicast search too
        for target in targets:
            for device in wire.IGD_TYPES:
                try:
                    self.transport.write(wire.ssdp_search(device), target)
                except OSError as e:  # no multicast route: the unicast may do
                    held = self.throttle(("ssdp-send", target))
                    if held is not None:
                        self.log.info("port mapping: SSDP to {target}: {error}",
                                      target=target[0], error=str(e))

    def datagramReceived(self, data, addr):
        try:
            _, location = wire.parse_ssdp_response(data)
        except wire.PortmapError:
            return  # other SSDP traffic: NOTIFYs, others' searches
        host = urllib.parse.urlsplit(location).hostname
        if self.gateway is not None and host != self.gateway:
            return  # another UPnP device on the LAN, not our NAT
        self._finish(location)


class UpnpClient:
    """
    UPnP IGD mappings for one internal port.  ``run`` runs a blocking
    function off the reactor (default: :func:`shared_runner`); ``igd_factory``
    makes a ``miniupnpc.UPnP`` (tests pass a fake).  If ``gateway`` is
    given, only an IGD served from that address is used: another UPnP
    device on the LAN would map a port on a NAT we are not behind.
    """

    protocol = "upnp"

    def __init__(self, reactor, gateway=None, transport="udp", log=None, run=None,
                 igd_factory=None):
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be udp or tcp, not {transport!r}")
        self.reactor = reactor
        self.gateway = gateway
        self.proto = transport.upper()
        self.log = log or Logger(namespace="p2pnat.portmap")
        self._run = run
        self._factory = igd_factory if igd_factory is not None else _load_miniupnpc()
        self._throttle = Throttle(reactor)
        self._igd = None  # the chosen IGD, kept for renewals and deletion
        self._lock = threading.Lock()  # one blocking call on it at a time

    @property
    def available(self):
        """Whether miniupnpc is installed."""
        return self._factory is not None

    def _runner(self):
        if self._run is None:
            self._run = shared_runner(self.reactor)
        return self._run

    # -- blocking side (pool threads) -----------------------------------

    def _select(self, location):
        """The IGD described at ``location`` (miniupnpc raises if it is not one)."""
        if location is None:
            return self._igd
        igd = self._factory()
        igd.selectigd(location)
        self._igd = igd
        return igd

    def _map_blocking(self, location, internal_port, lifetime, external_port):
        with self._lock:
            igd = self._select(location)
            address = igd.externalipaddress()
            lease = int(lifetime)
            port = external_port
            for i in range(PORT_TRIES):
                try:
                    igd.addportmapping(port, self.proto, igd.lanaddr, internal_port,
                                       DESCRIPTION, "", lease)
                    return address, port, lease or lifetime
                except Exception as e:  # miniupnpc raises plain Exception
                    error = str(e)
                if "OnlyPermanentLeasesSupported" in error and lease:
                    lease = 0  # an IGD v1 that only has permanent leases
                    continue
                if "Conflict" not in error:
                    raise LookupError(error)
                if i == 0:
                    try:  # IGD v2: let the gateway choose a free port
                        port = igd.addanyportmapping(port, self.proto, igd.lanaddr,
                                                     internal_port, DESCRIPTION, "")
                        return address, port, lifetime
                    except Exception:  # v1: no such action
                        pass
                port = 1024 + (port * 7919 + i * 104729) % 64511
            raise LookupError("ConflictInMappingEntry")

    def _delete_blocking(self, external_port):
        with self._lock:
            if self._igd is None:
                return False
            self._igd.deleteportmapping(external_port, self.proto)
            return True

    def _address_blocking(self, location):
        with self._lock:
            return self._select(location).externalipaddress()

    # -- reactor side ------------------------------------------------------

    def _with_igd(self, budget, blocking, *args, on_late=lambda result: None):
        """
        Find the IGD (unless known), then run ``blocking(location, *args)``
        on the pool (``location`` ``None``: the known IGD), all within
        ``budget``.  Fires with its result, a :class:`_Failed`, ``"no-igd"``
        or ``None`` (out of time).
        """
        started = self.reactor.seconds()
        if self._igd is not None:
            found = defer.succeed(None)
        else:
            search = _Search(self.reactor, self.gateway, budget * SEARCH_SHARE, self.log,
                             self._throttle)
            found = search.start().addCallback(lambda location: location or "no-igd")

        def run(location):
            if location == "no-igd":
                return location
            left = budget - (self.reactor.seconds() - started)
            d = defer.maybeDeferred(self._runner(), blocking, location, *args)
            return _bounded(self.reactor, d, max(left, 0.0), on_late)

        return found.addCallback(run)

    def request(self, internal_port, lifetime, budget, external=None):
        """
        Ask for (or renew) the mapping of ``internal_port``, suggesting
        ``external``'s port.  Fires with an :class:`Attempt` within ``budget``.
        """
        if not self.available:
            return defer.succeed(Attempt(self.protocol, None, "no-miniupnpc"))
        port = external[1] if external else internal_port

        def late(result):
            if isinstance(result, tuple):
                self.log.info("port mapping: UPnP granted port {port} after the budget; "
                              "deleting it", port=result[1])
                self._runner()(self._delete_blocking, result[1]).addErrback(lambda f: None)

        def outcome(result):
            if result is None:
                return Attempt(self.protocol, None, "no-answer")
            if not isinstance(result, tuple):
                if isinstance(result, _Failed):
                    self._igd = None  # look for the IGD again next time
                return Attempt(self.protocol, None, str(result))
            address, ext_port, granted = result
            mapping = Mapping(self.protocol, (address, ext_port), internal_port,
                              float(granted), self.reactor.seconds())
            return Attempt(self.protocol, mapping)

        return self._with_igd(budget, self._map_blocking, internal_port, lifetime, port,
                              on_late=late).addCallback(outcome)

    def delete(self, mapping, budget):
        """Delete ``mapping``; fires True if the gateway agreed, within ``budget``."""
        if not self.available or self._igd is None:
            return defer.succeed(False)
        d = defer.maybeDeferred(self._runner(), self._delete_blocking, mapping.external[1])
        return _bounded(self.reactor, d, budget, lambda r: None).addCallback(
            lambda r: r is True)

    def external_address(self, budget):
        """The external address an IGD on the gateway reports, or ``None``."""
        if not self.available:
            return defer.succeed(None)
        return self._with_igd(budget, self._address_blocking).addCallback(
            lambda r: r if isinstance(r, str) and r != "no-igd" else None)
