# -*- test-case-name: tests.unit.test_relay_tunnel_early,tests.unit.test_relay_terminal,tests.unit.test_relay_loopback -*-
"""
The relay's end of device tunnels (see L{p2pnat.protocol.tunnel}).

A device connects over TLS with its client certificate; the TLS layer has
already checked the certificate against the relay's CA.  Here the relay
checks that the certificate is the one registered for a device that is
not revoked, reads the hello, claims the session, and then carries streams
between a terminal connection and the device.

This module is the transport code; the rules are in
L{p2pnat.relay.tunnel_machine}.
"""

from twisted.internet.protocol import Factory, Protocol

from p2pnat.daemon.logs import Logger
from p2pnat.net import streams
from p2pnat.protocol import tunnel, wire
from p2pnat.relay import limits
from p2pnat.relay.machine import MachineProtocol
from p2pnat.relay.tunnel_machine import TunnelCore, TunnelMachine


class RelayTunnel(MachineProtocol, Protocol):
    """
    One device's TLS connection to the relay: reads the hello, then frames,
    and turns them and connection events into inputs of a
    L{TunnelMachine}; it is the machine's connection (its C{io}).

    The terminal whose stream it carries calls L{start_stream},
    L{send_data}, L{hold}, L{finish}, L{send_end} and L{give_back}; the
    relay calls L{drop}.
    """

    log = Logger(namespace="p2pnat.relay.tunnel")

    def __init__(self, relay, slot=None):
        self.relay = relay
        self.slot = slot  # the connection's place in the ConnectionLimits, if counted
        self.gate = None
        self.core = TunnelCore(relay, self)
        self.machine = self.core.machine = TunnelMachine(self.core)
        self.decoder = tunnel.FrameDecoder(self._open, self._data, self._end, self._opened)
        self._hello = bytearray()  # the hello as it arrives; None once read
        self._hello_timer = None
        self._closing = False  # the machine closed the connection: ignore what follows
        # The data path, both ways, while a stream runs: direct calls, no
        # machine input per chunk (thousands a second; an input costs
        # microseconds).  Set and cleared by the machine (route()).
        self._to_terminal = None
        self._direct = False
        self._probe = None  # the stream's QuietProbe, and the terminal it watches
        self._probed = None

    def connectionMade(self):
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self._hello_timer = self.relay.clock.callLater(self.relay.timeouts.hello,
                                                       self._hello_late)

    def _hello_late(self):
        self._hello_timer = None
        self.machine.hello_late()

    def dataReceived(self, data):
        if self._closing:
            return
        try:
            if self._hello is not None:
                # Every tunnel starts with exactly one hello, then frames.
                self._hello += data
                if len(self._hello) < tunnel.HELLO.size:
                    return
                hello, data = bytes(self._hello[:tunnel.HELLO.size]), self._hello[tunnel.HELLO.size:]
                self._hello = None
                if self._hello_timer is not None and self._hello_timer.active():
                    self._hello_timer.cancel()
                self._hello_timer = None
                self.machine.hello(hello)
                if not data or self._closing:
                    return
                data = bytes(data)
            self.decoder.feed(data)
        except tunnel.TunnelError as e:
            self.log.warn("tunnel of {device_id}: {error}; closing", device_id=self.device_id,
                          error=e)
            self.abort_connection()

    def tlsResumed(self, offered):
        """
        Called by p2pnat.net.fastio between the device's ClientHello and its
        Finished, when the ClientHello resumed a TLS session (its PSK binder
        proves the device's key; the session holds the device's
        certificate).  If the device named its session in ALPN
        (L{tunnel.alpn_for}), bind to it now: the hello status, OPEN and the
        terminal's first bytes leave with the relay's handshake flight
        (0.5-RTT data, readable only by the holder of the device's key
        share), one round trip earlier.  The hello, which still follows the
        device's Finished, must then name the same session and nonce.
        """
        self.machine.resumed(offered)

    def connectionLost(self, reason):
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        self._to_terminal = None
        self._direct = False
        self._probe = self._probed = None
        self.machine_lost()

    @property
    def terminal(self):
        """The terminal connection whose stream this tunnel carries, if any."""
        return self.core.terminal

    # -- frames from the device ---------------------------------------------------

    def _open(self, service):
        self.machine.device_open()

    def _data(self, data):
        write = self._to_terminal
        if write is not None:
            write(data)
        else:
            self.machine.device_data(data)

    def _end(self):
        self.machine.device_end()

    def _opened(self):
        self.machine.device_opened()

    # -- what the terminal and the relay call ----------------------------------------

    def start_stream(self, terminal, service="", reused=False):
        """
        Carry C{terminal}'s connection on this idle tunnel.  On a C{reused}
        tunnel, what is sent is kept until the device confirms the OPEN.
        """
        if reused:
            self.machine.start_reused_stream(terminal, service)
        else:
            self.machine.start_stream(terminal, service)

    def send_data(self, data):
        if self._direct:
            self.transport.writeSequence([tunnel.data_header(len(data)), data])
        else:
            self.machine.terminal_data(data)

    def send_end(self):
        """The terminal's side of the stream closed."""
        self.machine.terminal_end()

    def finish(self):
        """
        End the stream from the terminal's side while the terminal still
        reads: the device's answers go on to it, and its END ends the
        stream (L{Terminal.tunnel_ended}).
        """
        self.machine.terminal_done()

    def hold(self):
        """
        On a reused tunnel not confirmed yet, send nothing more until the
        device's OPENED: what follows must never be sent twice (a retry
        on a new tunnel sends it again).
        """
        self.machine.hold()

    def give_back(self):
        """The terminal this new tunnel was for is gone: keep it idle for the next."""
        self.machine.give_back()

    def drop(self):
        """Drop the tunnel at once (revocation, shutdown), and its terminal with it."""
        self.machine.drop()

    # -- the machine's connection ----------------------------------------------------

    def write(self, data):
        self.transport.write(data)

    def write_data(self, data):
        self.transport.writeSequence([tunnel.data_header(len(data)), data])

    def close_connection(self):
        self._closing = True
        self.transport.loseConnection()

    def abort_connection(self):
        self._closing = True
        self.transport.abortConnection()

    def peer(self):
        p = self.transport.getPeer()
        return wire.format_addr((getattr(p, "host", "?"), getattr(p, "port", "?")))

    def peer_certificate(self):
        return self.transport.getPeerCertificate()

    def couple(self, terminal):
        """Each side stops reading when the other cannot keep up."""
        self.transport.registerProducer(terminal.gate, True)
        terminal.register_producer(self.gate)

    def uncouple(self, terminal):
        self.transport.unregisterProducer()
        if terminal is not None:
            terminal.unregister_producer()

    def resume_reading(self):
        self.gate.resumeProducing()

    def route(self, terminal, direct):
        self._to_terminal = terminal.writer() if terminal is not None else None
        self._direct = direct

    def stream_quiet(self):
        """
        Whether no byte went either way on the stream since the last call
        (the first call of a stream answers False): the two direct paths
        are trapped by a L{limits.QuietProbe}, so the data path pays
        nothing per chunk.
        """
        terminal = self.core.terminal
        if self._probe is None or self._probed is not terminal:
            paths = [(self, "_to_terminal")]
            if terminal is not None:
                paths.append((terminal, "_send"))  # the Terminal's direct path
            self._probe, self._probed = limits.QuietProbe(paths), terminal
        return self._probe.quiet()


class RelayTunnelFactory(Factory):
    """
    Device tunnels.  Counted ones come through a L{p2pnat.relay.tap.Admission}
    wrapped around the TLS factory wrapping this one, which hands over the
    connection's slot in L{admitted}.
    """

    noisy = False

    def __init__(self, relay):
        self.relay = relay
        self.admitted = None

    def buildProtocol(self, addr):
        slot, self.admitted = self.admitted, None
        return RelayTunnel(self.relay, slot)
