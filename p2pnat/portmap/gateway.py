# -*- test-case-name: tests.unit.test_portmap_clients -*-
"""
NAT-PMP and PCP clients: requests to the gateway's port 5351 over a
Twisted datagram protocol, retransmitted on RFC 6886's schedule cut to a
budget.

Every call returns a Deferred that fires by the end of its budget and never
errbacks: with an :class:`~p2pnat.portmap.common.Attempt` for map
requests, a bool for deletions and probes.  Each exchange opens its own
socket, *connected* to the gateway: only the gateway's answers reach it,
the kernel picks the source address PCP must name, and an ICMP "port
unreachable" (no server there) ends the exchange at once.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol

from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.portmap.common import Attempt, Mapping
from p2pnat.protocol import portmap as wire

#: What an exchange fires with when it ends without an accepted answer.
NO_ANSWER = "no-answer"
REFUSED = "refused"
CANCELLED = "cancelled"
_ENDINGS = (NO_ANSWER, REFUSED, CANCELLED)


class Asking(DatagramProtocol):
    """
    A request on its own UDP socket, sent on RFC 6886's schedule cut to
    ``budget``: :meth:`start` fires :attr:`done` with what :meth:`_finish`
    is given (an answer; ``ending`` at the budget's end or when no socket
    can be had; ``cancelled`` when cancelled); the socket is closed and
    every timer cancelled before it fires.  Subclasses send in
    :meth:`_send` and may connect or prepare in :meth:`_prepare`.
    """

    def __init__(self, reactor, budget, log, throttle, ending, cancelled=None):
        self.reactor = reactor
        self.budget = budget
        self.log = log
        self.throttle = throttle
        self.ending = ending
        cancelled = ending if cancelled is None else cancelled
        self.done = defer.Deferred(lambda d: self._finish(cancelled))
        self._calls = []
        self._port = None

    def _prepare(self):
        """Called once the socket is open, before the first send."""

    def start(self):
        try:
            self._port = self.reactor.listenUDP(0, self)
            self._prepare()
        except (CannotListenError, OSError, ValueError) as e:
            # No route to the gateway, no socket: the same as no answer.
            self.log.info("port mapping: cannot ask: {error}", error=str(e))
            self._finish(self.ending)
            return self.done
        for at in wire.retransmit_times(self.budget)[1:]:
            self._calls.append(self.reactor.callLater(at, self._send))
        self._calls.append(self.reactor.callLater(self.budget, self._finish, self.ending))
        self._send()
        return self.done

    def _finish(self, result):
        if self.done.called:
            return
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self._port is not None:
            self._port.stopListening()
        self.done.callback(result)


class _Exchange(Asking):
    """
    One request to ``gateway``:5351 and the answer to it.  ``accept(response)``
    gets each decoded response and returns the exchange's result, or ``None``
    to keep waiting (not ours, an ANNOUNCE...).  The Deferred fires with that
    result or one of :data:`NO_ANSWER`, :data:`REFUSED`, :data:`CANCELLED`.
    """

    def __init__(self, reactor, gateway, build, accept, budget, log, throttle):
        super().__init__(reactor, budget, log, throttle, NO_ANSWER, CANCELLED)
        self.gateway = gateway
        self.build = build
        self.accept = accept
        self._request = None

    def _prepare(self):
        self.transport.connect(self.gateway, wire.PORT)
        self._request = self.build(self.transport.getHost().host)

    def _send(self):
        try:
            self.transport.write(self._request)
        except OSError as e:  # e.g. ENETUNREACH; the next send may work
            self._note("send", e)

    def datagramReceived(self, data, addr):
        if self.done.called:
            return
        try:
            response = wire.decode_response(data)
        except wire.PortmapError as e:
            self._note(e.reason, e)
            return
        result = self.accept(response)
        if result is not None:
            self._finish(result)

    def connectionRefused(self):
        self._finish(REFUSED)

    def stopProtocol(self):
        # Twisted's epoll reactor closes a connected UDP port whose socket
        # reports an ICMP error (EPOLLERR without EPOLLIN) instead of calling
        # connectionRefused: a port that stops before we finished it was
        # refused.
        self._port = None
        self._finish(REFUSED)

    def _note(self, reason, error):
        held = self.throttle(("bad", reason))
        if held is not None:
            self.log.info("port mapping: ignored a datagram from {gateway} ({reason}: {error}; "
                          "{held} more held back)", gateway=self.gateway, reason=reason,
                          error=str(error), held=held)

class _GatewayClient:
    """What the PCP and NAT-PMP clients share: the gateway, the epoch, logs."""

    protocol = None

    def __init__(self, reactor, gateway, transport="udp", log=None):
        if transport not in wire.TRANSPORTS:
            raise ValueError(f"transport must be udp or tcp, not {transport!r}")
        self.reactor = reactor
        self.gateway = gateway
        self.transport = transport
        self.log = log or Logger(namespace="p2pnat.portmap")
        self._throttle = Throttle(reactor)
        self._epoch = wire.EpochCheck()

    def _exchange(self, build, accept, budget):
        ex = _Exchange(self.reactor, self.gateway, build, accept, budget, self.log,
                       self._throttle)
        return ex.start()

    def _restarted(self, epoch):
        return not self._epoch.observe(self.reactor.seconds(), epoch)

    def _attempt(self, result):
        """An exchange's result as an :class:`Attempt` (an ending has no mapping)."""
        if result in _ENDINGS:
            return Attempt(self.protocol, None, result)
        return result


class PcpClient(_GatewayClient):
    """
    PCP MAP requests for one mapping (one nonce for its whole life:
    renewals and the deletion must repeat it, RFC 6887 section 11.2).
    """

    protocol = "pcp"

    def __init__(self, reactor, gateway, transport="udp", log=None, nonce=None):
        super().__init__(reactor, gateway, transport, log)
        self.nonce = nonce if nonce is not None else os.urandom(wire.NONCE_SIZE)

    def request(self, internal_port, lifetime, budget, external=None):
        """
        Ask for (or renew) the mapping of ``internal_port``; ``external`` is
        the (ip, port) to suggest.  Fires with an :class:`Attempt`.
        """
        ext_ip, ext_port = external if external else (None, internal_port)

        def build(local_ip):
            return wire.pcp_map_request(local_ip, self.nonce, self.transport, internal_port,
                                        int(lifetime), ext_port, ext_ip)

        def accept(response):
            if isinstance(response, wire.NatPmpResponse):
                # RFC 6887 section 9: a NAT-PMP-only gateway answers version 2
                # with its own "unsupported version".
                return Attempt(self.protocol, None, "unsupported-version")
            if not wire.check_pcp_map(response, self.nonce, self.transport, internal_port):
                return None
            restarted = self._restarted(response.epoch)
            if response.result != 0:
                return Attempt(self.protocol, None, response.result_name, restarted)
            if response.lifetime == 0:
                return Attempt(self.protocol, None, "no-lifetime", restarted)
            mapping = Mapping(self.protocol, (response.external_ip, response.external_port),
                              internal_port, float(response.lifetime), self.reactor.seconds())
            return Attempt(self.protocol, mapping, restarted=restarted)

        return self._exchange(build, accept, budget).addCallback(self._attempt)

    def delete(self, mapping, budget):
        """Delete ``mapping`` (lifetime 0, same nonce); fires True if the gateway agreed."""

        def build(local_ip):
            return wire.pcp_map_request(local_ip, self.nonce, self.transport,
                                        mapping.internal_port, 0)

        def accept(response):
            if isinstance(response, wire.NatPmpResponse):
                return False
            if not wire.check_pcp_map(response, self.nonce, self.transport,
                                      mapping.internal_port):
                return None
            return response.result == 0

        return self._exchange(build, accept, budget).addCallback(lambda r: r is True)

    def announce(self, budget):
        """Whether the gateway answers a PCP ANNOUNCE: it speaks PCP (for a probe)."""

        def accept(response):
            if isinstance(response, wire.NatPmpResponse):
                return False
            if response.opcode != wire.PCP_OP_ANNOUNCE:
                return None
            return response.result == 0

        return self._exchange(wire.pcp_announce_request, accept, budget).addCallback(
            lambda r: r is True)


class NatPmpClient(_GatewayClient):
    """
    NAT-PMP map requests.  A map response has no address, so each request
    also asks for the external address, in parallel.
    """

    protocol = "nat-pmp"

    def external_address(self, budget):
        """The gateway's external address (text), or ``None``."""

        def accept(response):
            if not isinstance(response, wire.NatPmpResponse) or response.opcode != 0:
                return None
            self._restarted(response.epoch)
            return response.external_ip if response.result == 0 else False

        return self._exchange(lambda _: wire.natpmp_external_request(), accept,
                              budget).addCallback(lambda r: r if isinstance(r, str)
                                                  and r not in _ENDINGS else None)

    def _map(self, internal_port, external_port, lifetime, budget):
        opcode, _ = wire.TRANSPORTS[self.transport]

        def accept(response):
            if not isinstance(response, wire.NatPmpResponse) or response.opcode != opcode:
                return None
            if response.result == 0 and response.internal_port != internal_port:
                return None  # an answer about another of our host's ports
            return response

        return self._exchange(
            lambda _: wire.natpmp_map_request(self.transport, internal_port, external_port,
                                              int(lifetime)),
            accept, budget)

    def request(self, internal_port, lifetime, budget, external=None):
        """
        Ask for (or renew) the mapping of ``internal_port``, suggesting
        ``external``'s port.  Fires with an :class:`Attempt`.
        """
        suggested = external[1] if external else internal_port
        both = defer.gatherResults([
            self.external_address(budget),
            self._map(internal_port, suggested, lifetime, budget),
        ])

        def combine(results):
            address, response = results
            if not isinstance(response, wire.NatPmpResponse):
                return Attempt(self.protocol, None, response)
            restarted = self._restarted(response.epoch)
            if response.result != 0:
                return Attempt(self.protocol, None, response.result_name, restarted)
            if address is None:
                # Granted, but useless without its address: give it back
                # rather than hold a port nobody will be told about.
                self._delete(internal_port, budget)
                return Attempt(self.protocol, None, "no-address", restarted)
            if response.lifetime == 0:
                return Attempt(self.protocol, None, "no-lifetime", restarted)
            mapping = Mapping(self.protocol, (address, response.external_port), internal_port,
                              float(response.lifetime), self.reactor.seconds())
            return Attempt(self.protocol, mapping, restarted=restarted)

        return both.addCallback(combine)

    def _delete(self, internal_port, budget):
        # RFC 6886 section 3.4: lifetime 0 and external port 0 delete the
        # mapping of the internal port.
        return self._map(internal_port, 0, 0, budget).addCallback(
            lambda r: isinstance(r, wire.NatPmpResponse) and r.result == 0)

    def delete(self, mapping, budget):
        """Delete ``mapping``; fires True if the gateway agreed."""
        return self._delete(mapping.internal_port, budget)
