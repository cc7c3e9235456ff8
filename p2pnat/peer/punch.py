# -*- test-case-name: tests.unit.test_peer_punch,tests.lab.test_p2p_lab -*-
"""
The hole-punch executor: runs one side of a punch plan with real sockets
and reactor timers, and reports the first authenticated exchange with the
peer as the path.

What each side does is given as L{Actions} (derived from the plan, see
L{actions_for}); the executor knows nothing of NAT kinds:

- probe some addresses from the fresh socket (whose mapping the lobby
  observed: direct, simultaneous open, the easy side of a birthday punch);
- open C{n} new sockets, each probing some addresses (the seed's window on
  the requesting side; the random side of a birthday punch);
- open one new socket probing one predicted address (the seed's single
  packet on the answering side);
- spray probes at random ports of an address at a bounded rate (the easy
  side of a birthday punch).

Every probe is a MAC'd L{M.Probe}; a probe that arrives is answered with
a L{M.ProbeAck} from the socket it reached.  The first Probe or ProbeAck
received fixes the path: (that socket, that source address).
"""

import random as _random
import socket

from twisted.internet.defer import Deferred

from p2pnat.daemon.logs import Logger
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire


class PunchFailed(Exception):
    """No path within the deadline."""


class Punch:
    """
    One side of one punch round.

    @param session: the L{p2pnat.peer.client.Session}.
    @param fresh: the fresh socket (a ControlProtocol) whose mapping the
        lobby observed.
    @param listen: C{listen(handler) -> ControlProtocol}, opening a new
        UDP socket on the same interface.
    @ivar done: fires with ``(proto, addr)`` or fails with L{PunchFailed}.
    """

    log = Logger(namespace="p2pnat.punch")

    def __init__(self, session, actions, fresh, listen, clock, deadline, rnd=None):
        self.session = session
        self.actions = actions
        self.fresh = fresh
        self.listen = listen
        self.clock = clock
        self.deadline = deadline
        self.random = rnd or _random.SystemRandom()
        self.done = Deferred()
        self.sockets = []  # (proto, destinations)
        self.sent = 0
        self.result = None
        self._calls = []
        self._round = session.next_round()

    def start(self):
        a = self.actions
        self.fresh.handler = self
        if a.from_fresh:
            self.sockets.append((self.fresh, list(a.from_fresh)))
        for _ in range(a.new_sockets):
            try:
                proto = self.listen(self)
            except OSError as e:
                self.log.warn("cannot open a punch socket: {error}", error=e)
                break
            self.sockets.append((proto, list(a.new_to)))
        # The seed's order: open every socket at once, then repeat.
        for index, (proto, dests) in enumerate(self.sockets):
            self._probe(index, proto, dests, first=True)
        if a.spray_ip:
            self._spray_interval = 1.0 / a.spray_rate
            self._spray()
        self._calls.append(self.clock.callLater(self.deadline, self._expire))
        return self.done

    def _probe(self, index, proto, dests, first=False):
        if self.result is not None:
            return
        ttl = self.actions.first_ttl if first else 0
        if ttl:
            _set_ttl(proto, ttl)
        for dest in dests:
            self._send(proto, M.Probe(self._round, index), dest)
        if ttl:
            _set_ttl(proto, 0)
        # The first repetitions come quickly (the peer may have learnt of the
        # session a moment after our first probe), then every interval.
        repeat = getattr(proto, "_punch_repeats", 0)
        proto._punch_repeats = repeat + 1
        delay = min(self.actions.interval, 0.05 * 2 ** repeat)
        self._calls.append(self.clock.callLater(delay, self._probe, index, proto, dests))

    def _spray(self):
        if self.result is not None:
            return
        lo, hi = self.actions.spray_ports
        # Bursts of up to 10 per timer call keep the reactor responsive.
        for _ in range(max(1, int(self.actions.spray_rate / 100))):
            self._send(self.fresh, M.Probe(self._round, 0xFFFF),
                       (self.actions.spray_ip, self.random.randint(lo, hi)))
        self._calls.append(self.clock.callLater(max(0.01, self._spray_interval * max(
            1, int(self.actions.spray_rate / 100))), self._spray))

    def _send(self, proto, message, dest):
        s = self.session
        data = wire.seal(message, s.my_key_id, s.key, s.stamper())
        try:
            proto.send(data, dest, "Probe")
            self.sent += 1
        except OSError:
            pass  # e.g. no route yet; the next repetition tries again

    # -- ControlProtocol handler of every punch socket -------------------------------

    _TYPES = frozenset({M.Probe.TYPE, M.ProbeAck.TYPE, M.Data.TYPE, M.PathKeepalive.TYPE})

    def key_for(self, key_id, mtype):
        if key_id == self.session.peer_key_id and mtype in self._TYPES:
            return self.session.key
        # Lobby answers reaching the fresh socket (retransmitted ones).
        return self.session.client.lobby_key_for(key_id, mtype)

    def handle(self, frame, message, addr, proto):
        if frame.key_id != self.session.peer_key_id:
            return self.session.client.lobby_message(frame, message, addr, proto)
        # Acknowledge and keep data before declaring success: success runs
        # the application, which may send at once.
        if isinstance(message, M.Probe):
            if self.result is None or self.result == (proto, addr):
                # Sent under our own key ID, not echoed under the prober's.
                self._send(proto, M.ProbeAck(message.round, message.index, addr), addr)
            self._success(proto, addr)
        elif isinstance(message, (M.ProbeAck, M.Data, M.PathKeepalive)):
            if isinstance(message, M.Data) and (self.result is None
                                                or self.result == (proto, addr)):
                self.session.early.append(message.payload)
            self._success(proto, addr)
        return None

    def _success(self, proto, addr):
        if self.result is not None:
            return
        self.result = (proto, addr)
        self._stop(keep=proto)
        self.log.info("punched {peer}: {local} <-> {addr} after {sent} probes",
                      peer=self.session.peer, local=proto.transport.getHost().port, addr=addr,
                      sent=self.sent)
        self.done.callback(self.result)

    def _expire(self):
        if self.result is None:
            self._stop(keep=None)
            self.done.errback(PunchFailed(f"no path after {self.sent} probes"))

    def cancel(self):
        if self.result is None and not self.done.called:
            self._stop(keep=None)
            self.done.errback(PunchFailed("cancelled"))

    def _stop(self, keep):
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        for proto, _ in self.sockets:
            if proto is not keep and proto is not self.fresh and proto.transport is not None:
                proto.transport.stopListening()


def _set_ttl(proto, ttl):
    try:
        sock = proto.transport.getHandle()
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl or 64)
    except (AttributeError, OSError):
        pass


def new_socket(reactor, interface, handler, clock, metrics, replay):
    """Open a new UDP socket (a fresh NAT mapping) served by C{handler}."""
    proto = ControlProtocol(handler, clock, metrics, replay, name="punch", stun_rate=0)
    reactor.listenUDP(0, proto, interface=interface)
    return proto
