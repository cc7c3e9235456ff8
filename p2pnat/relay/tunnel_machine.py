# -*- test-case-name: tests.unit.test_relay_machines,tests.unit.test_relay_terminal,tests.unit.test_relay_tunnel_early -*-
"""
The rules of the relay's end of one device tunnel, as a state machine with
no transport (L{p2pnat.relay.tunnel.RelayTunnel} drives it).

States::

    hello ──► idle ──► stream ──► draining ──► idle ...
      │        │  └──► opening ─┘   (reused tunnel: until the device's OPENED)
      │        │          └──► answering ──► idle ...
      └────────┴─────────────────────────────► closed

- ``hello``: waiting for the device's hello (bounded by the hello timeout);
  a refused hello, or a hello timeout, closes;
- ``idle``: bound to its device, no stream (bounded by the idle timeout);
- ``opening``: OPEN sent on a reused idle tunnel, not yet confirmed: what
  the terminal sends is kept, and if the device does not answer within the
  open timeout the tunnel was dead and the terminal retries on a new one.
  What the terminal sends after L{TunnelInputs.hold} (a request that must
  not be sent twice) is not even sent until the OPENED: a retry never
  repeats it;
- ``stream``: carrying one terminal connection, both ways;
- ``draining``: the terminal's side ended (END sent), waiting for the
  device's END;
- ``answering``: the terminal ended the stream but still reads (its next
  request is for another device, or was refused): END sent, the device's
  answers still go to the terminal, and its END tells the terminal it may
  reuse the connection;
- ``closed``: the connection is closing or gone.

A tunnel bound early, by a resumed TLS handshake that named its session
(L{TunnelInputs.resumed}), leaves ``hello`` before its hello arrives; that
hello, read in whatever state the tunnel is then in, must name the same
session and nonce.
"""

from typing import Protocol

from p2pnat.daemon.logs import Logger, redact
from p2pnat.deployment import pki
from p2pnat.protocol import tunnel
from p2pnat.relay.limits import IdleWatch
from p2pnat.relay.machine import MachineBuilder


class TunnelInputs(Protocol):
    """What can happen to a device tunnel."""

    def hello(self, data: bytes) -> None:
        "The device's hello (exactly L{tunnel.HELLO} bytes)."

    def resumed(self, offered: list) -> None:
        "A resumed TLS handshake offered these ALPN names."

    def bind(self, device_id: str, session: object, early: bool) -> None:
        "The hello (or the resumed handshake) claimed C{session}."

    def refuse(self, code: int, fmt: str, kw: dict) -> None:
        "The hello is refused with status C{code}."

    def hello_late(self) -> None:
        "The hello timeout passed."

    def start_stream(self, terminal: object, service: str) -> None:
        "Carry C{terminal}'s connection (a tunnel just opened)."

    def start_reused_stream(self, terminal: object, service: str) -> None:
        "Carry C{terminal}'s connection on an idle tunnel: the device must confirm."

    def give_back(self) -> None:
        "The terminal this tunnel was for is gone: it is idle again."

    def terminal_data(self, data: bytes) -> None:
        "Bytes from the terminal (in ``stream``, only until the direct path is set)."

    def terminal_end(self) -> None:
        "The terminal's side of the stream closed."

    def terminal_done(self) -> None:
        "The terminal sends no more on this stream but reads the device's answers to the end."

    def hold(self) -> None:
        "Until the device confirms the OPEN, send nothing more of what the terminal sends."

    def device_open(self) -> None:
        "The device sent OPEN (only the relay may)."

    def device_opened(self) -> None:
        "The device confirmed the OPEN."

    def device_data(self, data: bytes) -> None:
        "Stream bytes from the device (in a stream, only until the direct path is set)."

    def device_end(self) -> None:
        "The device's side of the stream closed."

    def open_late(self) -> None:
        "The open timeout passed without the device's OPENED."

    def idle_late(self) -> None:
        "The idle timeout passed."

    def stream_idle(self) -> None:
        "The stream carried no byte either way for its idle timeout."

    def drop(self) -> None:
        "Close at once, and the terminal with it (revocation, shutdown)."

    def connection_lost(self) -> None:
        "The tunnel's connection is gone."

    def state(self) -> str:
        "The current state's name."


class TunnelCore:
    """
    What a tunnel knows, and the logic its outputs run.

    @param relay: the L{p2pnat.relay.core.IRelay}.
    @param io: the connection: C{write}, C{write_data} (one DATA frame),
        C{close_connection}, C{abort_connection}, C{peer()},
        C{peer_certificate()}, C{couple(terminal)}/C{uncouple(terminal)}
        (back-pressure both ways), C{resume_reading()} and
        C{route(terminal, direct)}: stream bytes from the device go straight
        to C{terminal} (None: through the machine), and the terminal's
        straight to the device when C{direct}; C{stream_quiet()}: whether
        no byte went either way since it was last asked.
    """

    log = Logger(namespace="p2pnat.relay.tunnel")

    def __init__(self, relay, io):
        self.relay = relay
        self.io = io
        self.device_id = None
        self.terminal = None
        self.early = None  # the session a resumed handshake bound, until its hello
        self.unconfirmed = None  # terminal bytes given since an unconfirmed OPEN
        self.held = None  # unconfirmed[held:] are kept, not sent, until OPENED
        self.end_held = False  # END to send after the held bytes
        self.dropped = False  # closed by the relay: the terminal is cut too
        self.open_timer = None
        self.idle_timer = None
        self.stream_watch = None  # a limits.IdleWatch while a stream runs or drains
        self.stream_timeout = None  # its timeout
        self.machine = None

    def _timer(self, seconds, input):
        return self.relay.clock.callLater(seconds, self._fire, input)

    def _fire(self, name):
        if name == "open":
            self.open_timer = None
            self.machine.open_late()
        else:
            self.idle_timer = None
            self.machine.idle_late()

    def cancel_timers(self, *which):
        for name in which:
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def device(self):
        """
        The device this tunnel's client certificate names, if the registry
        knows it under this certificate and has not revoked it.

        @return: ``(device_id, None)`` or ``(None, (code, log format, kw))``.
        """
        cert = self.io.peer_certificate()
        if cert is None:
            return None, (5, "no client certificate", {})
        device_id = pki.device_id_of(cert)
        record = self.relay.registry_record(device_id) if device_id else None
        if record is None or record.revoked:
            return None, (5, "certificate of unknown or revoked device {device_id}",
                          {"device_id": device_id})
        if not record.accepts(pki.fingerprint(cert)):
            return None, (5, "certificate of {device_id} is not the registered one",
                          {"device_id": device_id})
        return device_id, None

    def begin(self, terminal, service, reused):
        self.cancel_timers("idle_timer")
        self.terminal = terminal
        self.io.write(tunnel.frame(tunnel.OPEN, service.encode("ascii")))
        if reused:
            self.unconfirmed = []
            self.held = None
            self.end_held = False
            self.open_timer = self._timer(self.relay.timeouts.open, "open")
        self.io.couple(terminal)
        self.io.route(terminal, direct=not reused)
        # A stream holds one of the device's tunnels and two descriptors:
        # one that carries nothing either way is ended (see Terminal).
        self.stop_watch()
        # (A terminal that is no Terminal, in tests, gets the HTTP figure.)
        self.stream_timeout = getattr(terminal, "stream_idle_timeout", self.relay.timeouts.stream)
        self.stream_watch = IdleWatch(self.relay.clock, self.stream_timeout, self.stream_quiet,
                                      self.machine.stream_idle)

    def stream_quiet(self):
        return self.io.stream_quiet()

    def stop_watch(self):
        if self.stream_watch is not None:
            self.stream_watch.stop()
            self.stream_watch = None

    def detach(self):
        """End the pairing with the stream's terminal; return it."""
        terminal, self.terminal = self.terminal, None
        self.stop_watch()
        self.io.route(None, direct=False)
        self.io.uncouple(terminal)
        return terminal

    def confirmed(self):
        """The device confirmed the OPEN: send what was held, and the END after it."""
        self.cancel_timers("open_timer")
        if self.held is not None:
            for data in self.unconfirmed[self.held:]:
                self.io.write_data(data)
        if self.end_held:
            self.io.write(tunnel.frame(tunnel.END))
        self.unconfirmed = self.held = None
        self.end_held = False

    def go_idle(self):
        self.detach()
        self.io.resume_reading()
        self.relay.tunnel_idle(self.io)
        self.idle_timer = self._timer(self.relay.timeouts.idle, "idle")


def _unexpected(core, state, input):
    core.log.warn("tunnel of {device_id}: {input} unexpected in state {state}; ignored",
                  device_id=core.device_id, input=input, state=state)


I = TunnelInputs
_b = MachineBuilder(I, TunnelCore)
hello = _b.state("hello")
idle = _b.state("idle")
opening = _b.state("opening")
stream = _b.state("stream")
draining = _b.state("draining")
answering = _b.state("answering")
closed = _b.state("closed")
BOUND = [idle, opening, stream, draining, answering]
OPEN = [hello] + BOUND


@_b.on(hello, I.hello)
def _check_hello(m, c, data):
    try:
        session_id, nonce = tunnel.parse_hello(data)
    except tunnel.TunnelError:
        return m.refuse(1, "malformed hello", {})
    device_id, refusal = c.device()
    if refusal is not None:
        return m.refuse(*refusal)
    session, error = c.relay.claim(session_id, device_id, nonce)
    if session is None:
        return m.refuse(error, "{device_id}: {why} (session {sid})",
                        {"device_id": device_id, "why": tunnel.HELLO_ERRORS[error],
                         "sid": redact(session_id)})
    m.bind(device_id, session, False)


@_b.on(BOUND, I.hello)
def _confirm_early(m, c, data):
    """The hello after an early binding: it must name the same session."""
    session, c.early = c.early, None
    session_id, nonce = tunnel.parse_hello(data)
    if session is None or not session.matches(session_id, nonce):
        raise tunnel.TunnelError("the hello names another session than the one the"
                                 " resumed handshake bound")


@_b.on(hello, I.resumed)
def _resumed(m, c, offered):
    session_id = tunnel.session_from_alpn(offered)
    if session_id is None:
        return
    device_id, refusal = c.device()
    if refusal is not None:
        return  # the hello will be refused the usual way
    session = c.relay.claim_early(session_id, device_id)
    if session is not None:
        m.bind(device_id, session, True)


@_b.on(hello, I.bind, to=idle)
def _bind(m, c, device_id, session, early):
    c.device_id = device_id
    if early:
        c.early = session
        c.relay.count("tunnel-half-rtt")
    c.io.write(bytes([tunnel.HELLO_OK]))
    c.log.debug("tunnel of {device_id} bound to session {sid}", device_id=device_id,
                sid=redact(session.id))
    c.relay.tunnel_opened(c.io, session)


@_b.on(hello, I.refuse, to=closed)
def _refuse(m, c, code, fmt, kw):
    c.log.warn("tunnel from {peer} refused: " + fmt, peer=c.io.peer(), **kw)
    c.relay.count("tunnel-refused")
    c.io.write(bytes([code]))
    c.io.close_connection()


@_b.on(OPEN, I.hello_late)
def _hello_late(m, c):
    c.log.info("tunnel from {peer}: no hello in time", peer=c.io.peer())
    c.io.abort_connection()


@_b.on(idle, I.start_stream, to=stream)
def _start(m, c, terminal, service):
    c.begin(terminal, service, reused=False)


@_b.on(idle, I.start_reused_stream, to=opening)
def _start_reused(m, c, terminal, service):
    c.begin(terminal, service, reused=True)


@_b.on([hello, opening, stream, draining, answering, closed], I.start_stream)
@_b.on([hello, opening, stream, draining, answering, closed], I.start_reused_stream)
def _cannot_stream(m, c, terminal, service):
    # Only an idle tunnel is handed out; should a closed one slip through,
    # the terminal must not wait for it for ever.
    terminal.tunnel_lost(False)


@_b.on(idle, I.give_back)
def _give_back(m, c):
    c.relay.tunnel_idle(c.io)
    c.cancel_timers("idle_timer")
    c.idle_timer = c._timer(c.relay.timeouts.idle, "idle")


@_b.on(opening, I.terminal_data)
def _send_unconfirmed(m, c, data):
    c.unconfirmed.append(data)
    if c.held is None:
        c.io.write_data(data)


@_b.on(opening, I.hold)
def _hold(m, c):
    if c.held is None:
        c.held = len(c.unconfirmed)


@_b.on(stream, I.terminal_data)
def _send(m, c, data):
    c.io.write_data(data)


@_b.on([opening, stream], I.terminal_end, to=draining)
def _terminal_end(m, c):
    c.io.route(None, direct=False)
    if c.held is not None:
        del c.unconfirmed[c.held:]  # the terminal is gone: its held request with it
        c.held = None
    c.io.write(tunnel.frame(tunnel.END))


@_b.on(answering, I.terminal_end, to=draining)
def _terminal_gone(m, c):
    c.io.route(None, direct=False)
    if c.end_held:
        c.end_held = False
        c.held = None
        c.io.write(tunnel.frame(tunnel.END))


@_b.on([opening, stream], I.terminal_done, to=answering)
def _terminal_done(m, c):
    # The device's answers still go straight to the terminal; its END
    # tells the terminal they are all written.
    c.io.route(c.terminal, direct=False)
    if c.held is not None:
        c.end_held = True  # after the held bytes, once confirmed
    else:
        c.io.write(tunnel.frame(tunnel.END))


@_b.on(OPEN, I.device_open)
def _device_open(m, c):
    raise tunnel.TunnelError("device sent OPEN")


@_b.on(opening, I.device_opened, to=stream)
def _confirmed(m, c):
    c.confirmed()
    c.io.route(c.terminal, direct=True)


@_b.on(answering, I.device_opened)
def _confirmed_answering(m, c):
    c.confirmed()


@_b.on(draining, I.device_opened)
def _confirmed_late(m, c):
    c.cancel_timers("open_timer")
    c.unconfirmed = None


@_b.on([opening, stream, answering], I.device_data)
def _deliver(m, c, data):
    c.terminal.writer()(data)


@_b.on([hello, idle], I.device_data)
def _stray_data(m, c, data):
    raise tunnel.TunnelError("data outside a stream")


@_b.on([opening, stream], I.device_end, to=idle)
def _device_end(m, c):
    # The device's service closed: acknowledge, and close the terminal
    # after what was written.
    c.cancel_timers("open_timer")
    c.unconfirmed = None
    c.io.write(tunnel.frame(tunnel.END))
    terminal = c.terminal
    c.go_idle()
    terminal.tunnel_ended()


@_b.on(draining, I.device_end, to=idle)
def _drained(m, c):
    c.cancel_timers("open_timer")
    c.unconfirmed = None
    c.go_idle()


@_b.on(answering, I.device_end, to=idle)
def _answered(m, c):
    c.cancel_timers("open_timer")
    c.unconfirmed = c.held = None
    c.end_held = False
    terminal = c.terminal
    c.go_idle()
    terminal.tunnel_ended()


@_b.on([hello, idle], I.device_end)
def _stray_end(m, c):
    raise tunnel.TunnelError("END outside a stream")


@_b.on(opening, I.open_late, to=closed)
def _dead(m, c):
    """The device never confirmed the OPEN: this idle tunnel was dead."""
    c.open_timer = None
    pending, c.unconfirmed = b"".join(c.unconfirmed), None
    c.log.info("idle tunnel of {device_id} did not answer; retrying on a new one",
               device_id=c.device_id)
    terminal = c.detach()
    c.io.abort_connection()
    terminal.retry(pending)


@_b.on(answering, I.open_late, to=closed)
def _dead_answering(m, c):
    """A dead reused tunnel while the terminal waits for its answers: it gets none."""
    c.open_timer = None
    c.unconfirmed = c.held = None
    terminal = c.detach()
    c.io.abort_connection()
    terminal.tunnel_lost(False)


@_b.on(draining, I.open_late, to=closed)
def _dead_drained(m, c):
    c.open_timer = None
    c.unconfirmed = None
    c.detach()
    c.io.abort_connection()


@_b.on(idle, I.idle_late, to=closed)
def _idle_late(m, c):
    c.idle_timer = None
    c.io.close_connection()


@_b.on([opening, stream, draining, answering], I.stream_idle)
def _stream_idle(m, c):
    """Nothing went either way for the stream's idle timeout: end it, tunnel and all."""
    c.stream_watch = None
    c.log.info("stream of {device_id} idle for {seconds}s; closing it", device_id=c.device_id,
               seconds=c.stream_timeout)
    c.relay.count("stream-idle")
    c.io.abort_connection()


@_b.on(OPEN, I.drop)
def _drop(m, c):
    c.dropped = True
    c.io.abort_connection()


@_b.on(OPEN + [closed], I.connection_lost, to=closed)
def _lost(m, c):
    c.cancel_timers("open_timer", "idle_timer")
    c.stop_watch()
    if c.device_id is not None:
        c.relay.tunnel_closed(c.io)
    terminal, c.terminal = c.terminal, None
    if terminal is not None:
        terminal.tunnel_lost(c.dropped)


_b.ignore(BOUND, I.resumed)
# The direct paths stop at these states; what still comes is dropped.
_b.ignore([hello, idle, draining, answering, closed], I.terminal_data)
_b.ignore([draining, closed], I.device_data)
_b.ignore([hello, idle, draining, closed], I.terminal_end)
_b.ignore([hello, idle, draining, answering, closed], I.terminal_done)
_b.ignore([hello, idle, stream, draining, answering, closed], I.hold)
_b.ignore([idle, stream], I.device_opened)
_b.ignore([stream, closed], I.open_late)
_b.ignore([hello, opening, stream, draining, answering, closed], I.idle_late, I.give_back)
_b.ignore([hello, idle, closed], I.stream_idle)  # a watch stopped as it fired
_b.ignore(closed, I.hello, I.resumed, I.hello_late, I.device_open, I.device_opened,
          I.device_end, I.drop)

TunnelMachine = _b.build(_unexpected)
del _b
