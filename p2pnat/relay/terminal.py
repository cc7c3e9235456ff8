# -*- test-case-name: tests.unit.test_relay_terminal -*-
"""
The relay's terminal side: browsers and the ``p2pnat`` CLI connect here.

Every request of a connection is routed and authorized by its own head:
the first, and each later one on a kept-alive or pipelined connection
(a pooling proxy in front of ``terminal.http`` mixes users on one
connection).  A head names the device (``Host: DEVICE.RELAYHOST``, the
seed's ``/connect?ID=DEVICE``, or ``CONNECT DEVICE[:SERVICE]`` from the
CLI) and carries the terminal's credential when the device asks the relay
to check it.  Between heads the request bodies go to the device as they
are, framed by L{p2pnat.relay.http.RequestFramer} (a Content-Length body
costs a comparison per read); the device's bytes come back untouched.  A
request for another device, or one that is refused, never reaches the
stream's device: the stream ends and the request is read afresh (see
docs/relay.rst).  CONNECT streams, and a connection after an Upgrade
(WebSocket), are opaque.

This module is the transport code; the rules are in
L{p2pnat.relay.terminal_machine}.
"""

from twisted.internet.protocol import Factory, Protocol

from p2pnat.net import streams
from p2pnat.protocol import wire
from p2pnat.relay import limits
from p2pnat.relay.http import BadRequest, Tokens, parse_head
from p2pnat.relay.machine import MachineProtocol
from p2pnat.relay.terminal_machine import TerminalCore, TerminalMachine

# Tokens, BadRequest and parse_head live in p2pnat.relay.http; the daemon's
# tap and older tests import them from here.
__all__ = ["BadRequest", "Terminal", "TerminalFactory", "Tokens", "parse_head"]


class Terminal(MachineProtocol, Protocol):
    """
    One terminal connection: turns reads and connection events into inputs
    of a L{TerminalMachine}, and is the machine's connection (its C{io}).

    For the tunnel carrying its stream it is the other end: the tunnel
    writes to it (L{writer}), pairs back-pressure with it (L{gate},
    L{register_producer}) and tells it how the stream ends
    (L{tunnel_ended}, L{tunnel_lost}, L{retry}).
    """

    def __init__(self, relay, secure, slot=None):
        self.relay = relay
        self.secure = secure
        self.slot = slot  # the connection's place in the ConnectionLimits, if counted
        self.source = slot.source if slot is not None else None
        self.gate = None
        self.core = None
        self.machine = None
        # While streaming, bytes read go straight to the stream's framer
        # (TerminalCore.forward) or, opaque, to the tunnel: one call per
        # read, no machine input (the data path runs thousands of reads a
        # second; a machine input costs microseconds each).  The
        # tunnel's idle watch traps it (RelayTunnel.stream_quiet).
        self._send = None

    def connectionMade(self):
        if self.source is None:
            self.source = limits.source_of(self.transport.getPeer())
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self.core = TerminalCore(self.relay, self, self.secure)
        self.machine = self.core.machine = TerminalMachine(self.core)
        self.relay.terminal_opened(self)

    def dataReceived(self, data):
        send = self._send
        if send is not None:
            send(data)
        else:
            self.machine.data(data)

    def connectionLost(self, reason):
        self._send = None
        self.machine_lost()

    @property
    def stream_idle_timeout(self):
        """Seconds this connection's stream may carry nothing before it is closed."""
        timeouts = self.relay.timeouts
        return timeouts.tcp_stream if self.core.tcp else timeouts.stream

    # -- the machine's connection --------------------------------------------------

    def write(self, data):
        self.transport.write(data)

    def close_connection(self):
        """Close once what was written is sent."""
        streams.close_after_writes(self.transport)

    def abort_connection(self):
        self.transport.abortConnection()

    def pause_reading(self):
        self.transport.pauseProducing()

    def resume_reading(self):
        self.transport.resumeProducing()

    def peer(self):
        p = self.transport.getPeer()
        return wire.format_addr((getattr(p, "host", "?"), getattr(p, "port", "?")))

    def peer_host(self):
        """The terminal's IP address (its TCP source), or None."""
        return getattr(self.transport.getPeer(), "host", None)

    def stream_to(self, send):
        self._send = send

    # -- the tunnel's side of the stream ---------------------------------------------

    def writer(self):
        """The tunnel's way to write the device's bytes here: the transport's own write."""
        return self.transport.write

    def register_producer(self, producer):
        self.transport.registerProducer(producer, True)

    def unregister_producer(self):
        if self.transport is not None:
            try:
                self.transport.unregisterProducer()
            except RuntimeError:
                pass

    def tunnel_ended(self):
        """The device's side closed: close ours once written."""
        self.machine.tunnel_ended()

    def tunnel_lost(self, abort=False):
        """The tunnel died under the stream (C{abort}: the device was revoked)."""
        self.machine.tunnel_lost(abort)

    def retry(self, pending):
        """
        The reused tunnel this stream went to was dead: send what it was
        given again, on a new tunnel.
        """
        self.machine.retry(pending)


class TerminalFactory(Factory):
    """
    Terminal connections.  Counted ones come through a
    L{p2pnat.relay.tap.Admission} wrapped around this factory (or
    around the TLS factory wrapping it), which hands over the connection's
    slot in L{admitted}.
    """

    noisy = False

    def __init__(self, relay, secure):
        self.relay = relay
        self.secure = secure
        self.admitted = None

    def buildProtocol(self, addr):
        slot, self.admitted = self.admitted, None
        return Terminal(self.relay, self.secure, slot)
