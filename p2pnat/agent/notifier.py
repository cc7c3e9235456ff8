# -*- test-case-name: tests.unit.test_relay_notify -*-
"""
The device agent's UDP side: learn the access-check period, keep the NAT
mapping open with notify B, refresh the last access with notify A, and
accept only genuine connect requests.
"""

from twisted.internet.task import LoopingCall

from p2pnat.daemon.logs import Logger, redact
from p2pnat.protocol import wire


class SeenSessions:
    """
    Session IDs of connect requests already acted on, remembered for
    C{ttl} seconds (longer than the replay window), at most C{limit}.
    """

    def __init__(self, clock, ttl=300.0, limit=4096):
        self._clock = clock
        self.ttl = ttl
        self.limit = limit
        self._seen = {}

    def add(self, session_id):
        """Remember C{session_id}; False if it was already seen."""
        now = self._clock.seconds()
        if len(self._seen) >= self.limit:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.ttl}
            while len(self._seen) >= self.limit:
                del self._seen[next(iter(self._seen))]
        if session_id in self._seen and now - self._seen[session_id] < self.ttl:
            return False
        self._seen[session_id] = now
        return True


class Notifier:
    """
    The agent's relay-facing protocol logic (used as the handler of a
    L{p2pnat.net.udp.ControlProtocol}).

    Timers: until the relay has told its period, a period request is
    retried with backoff; then notify B goes out every C{b_interval}
    seconds and notify A at least three times per access-check period
    (and at once when the relay asks for one).

    @param on_connect: called with a verified L{wire.ConnectRequest}.
    """

    log = Logger(namespace="p2pnat.agent")

    def __init__(self, device_id, mac_key, relay_addr, clock, b_interval=20.0,
                 on_connect=None):
        self.device_id = device_id
        self.mac_key = mac_key
        self.relay_addr = relay_addr
        self.clock = clock
        self.b_interval_config = b_interval
        self.on_connect = on_connect or (lambda request: None)
        self.stamper = wire.Stamper(clock)
        self.replay = wire.ReplayGuard(self.stamper)
        self.seen = SeenSessions(clock)
        self.proto = None
        self.period = None
        self.public_addr = None
        self.last_ack = None
        #: Our port-mapped public (host, port) (L{set_mapped}), or None.
        self.mapped = None
        self._takes_mapped = None  # the relay address whose NotifyAck said it takes it
        self._mapped_a_at = None  # when the last notify A that told it was sent
        self._period_asked = {}  # timestamp -> local send time
        self._retry = 1.0
        self._period_call = None
        self._a_loop = None
        self._b_loop = None

    # -- timers ---------------------------------------------------------------

    def start(self, proto):
        """Begin talking to the relay through C{proto}."""
        self.proto = proto
        self._ask_period()

    def stop(self):
        for loop in (self._a_loop, self._b_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self._period_call is not None and self._period_call.active():
            self._period_call.cancel()
        self._period_call = None

    def _send(self, message, stamp=None):
        """Send C{message} to the relay; False if it could not be sent."""
        stamp = stamp or self.stamper()
        data = wire.seal(message, self.device_id, self.mac_key, stamp)
        try:
            self.proto.send(data, self.relay_addr, type(message).__name__)
        except OSError as e:
            # No route while the network is down: the timers try again.
            self.log.warn("cannot send {kind} to the relay: {error}",
                          kind=type(message).__name__, error=e)
            return False
        return True

    def _ask_period(self):
        self._period_call = None
        try:
            # A clock probe (we may not know the relay's clock yet): the
            # relay answers each probe stamp at most once.  Remember the
            # request before sending: the answer may come at once.
            stamp = self.stamper.probe()
            self._period_asked[stamp] = self.clock.seconds()
            while len(self._period_asked) > 16:
                del self._period_asked[next(iter(self._period_asked))]
            if not self._send(wire.PeriodRequest(), stamp):
                self.stamper.probe_unsent()
        except Exception:
            self.log.failure("period request failed")
        self._period_call = self.clock.callLater(self._retry, self._ask_period)
        self._retry = min(self._retry * 2, 30.0)

    def _safely(self, what):
        def run():
            try:
                what()
            except Exception:
                self.log.failure("periodic {name} failed; will retry", name=what.__name__)
        return run

    def notify_a(self):
        if self._mapped_a_at is not None and (self.last_ack or 0) < self._mapped_a_at:
            # The last notify A that told our mapped address got no answer:
            # the relay may have been replaced by one that refuses it.
            # Leave it out until a NotifyAck says the relay takes it again.
            self._takes_mapped = None
        mapped = self._mapped_told()
        self._mapped_a_at = self.clock.seconds() if mapped is not None else None
        self._send(wire.NotifyA(local=self._local(), mapped=mapped))

    def notify_b(self):
        self._send(wire.NotifyB(local=self._local(), mapped=self._mapped_told()))

    def _relay_takes_mapped(self):
        # Only a relay that said so: an older one drops a notify that tells it.
        return self._takes_mapped is not None and self._takes_mapped == self.relay_addr

    def _mapped_told(self):
        return self.mapped if self._relay_takes_mapped() else None

    def set_mapped(self, addr):
        """
        Our port-mapped public (host, port), or None once the mapping is
        gone: every notify tells it from now on (to a relay that takes it,
        L{wire.TAKES_MAPPED}), and a notify B tells it at once.
        """
        if addr == self.mapped:
            return
        self.mapped = addr
        if self.proto is not None and self._relay_takes_mapped():
            self._safely(self.notify_b)()

    def _local(self):
        host = self.proto.transport.getHost()
        ip = host.host if host.host not in ("0.0.0.0", "::") else "0.0.0.0"
        return (ip, host.port)

    @property
    def a_interval(self):
        return max(1.0, self.period / 3)

    @property
    def b_interval(self):
        return max(1.0, min(self.b_interval_config, self.advised_b or self.b_interval_config))

    advised_b = None

    def _schedule(self):
        for loop in (self._a_loop, self._b_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._a_loop = LoopingCall(self._safely(self.notify_a))
        self._a_loop.clock = self.clock
        self._a_loop.start(self.a_interval, now=True)
        self._b_loop = LoopingCall(self._safely(self.notify_b))
        self._b_loop.clock = self.clock
        self._b_loop.start(self.b_interval, now=False)

    # -- datagrams from the relay ----------------------------------------------

    _FROM_RELAY = frozenset({wire.Period.TYPE, wire.NotifyAck.TYPE, wire.ConnectRequest.TYPE,
                             wire.Pong.TYPE})

    def key_for(self, key_id, mtype):
        if key_id != self.device_id or mtype not in self._FROM_RELAY:
            return None
        return self.mac_key

    def handle(self, frame, message, addr, proto):
        if isinstance(message, wire.Period):
            self._got_period(message)
        elif isinstance(message, wire.NotifyAck):
            self._got_ack(message, addr)
        elif isinstance(message, wire.ConnectRequest):
            self._got_connect(message, addr)
        return None

    def _got_period(self, message):
        sent = self._period_asked.pop(message.echo, None)
        if sent is None:
            self.log.info("ignored a period answer to no request of ours")
            return
        self._period_asked.clear()
        self.stamper.sync(sent, self.clock.seconds(), message.server_time)
        first = self.period is None
        changed = message.period != self.period or message.notify_b_max != self.advised_b
        self.period = message.period
        self.advised_b = message.notify_b_max
        if self._period_call is not None and self._period_call.active():
            self._period_call.cancel()
        self._period_call = None
        self._retry = 1.0
        if first or changed:
            self.log.info(
                "relay {relay} access-check period {period}s; notify A every {a:.0f}s,"
                " notify B every {b:.0f}s", relay=wire.format_addr(self.relay_addr), period=self.period,
                a=self.a_interval, b=self.b_interval)
            self._schedule()

    def _got_ack(self, message, addr):
        self.last_ack = self.clock.seconds()
        if message.observed != self.public_addr:
            self.log.info("public address is {addr}", addr=wire.format_addr(message.observed))
            self.public_addr = message.observed
        told = self._relay_takes_mapped()
        self._takes_mapped = self.relay_addr if message.flags & wire.TAKES_MAPPED else None
        if message.flags & wire.NEED_NOTIFY_A:
            self.notify_a()
        elif self._takes_mapped is not None and not told and self.mapped is not None:
            self.notify_b()  # with the mapped address the acknowledged notify left out

    def _got_connect(self, message, addr):
        if not self.seen.add(message.session_id):
            self.log.warn("ignored a repeated connect request for session {sid}",
                          sid=redact(message.session_id))
            return
        self.on_connect(message, addr)
        # Logged on the reactor's next turn, after the tunnel's connect():
        # the log line is not on the terminal's clock.
        self.clock.callLater(0, self.log.info, "connect request for session {sid}: tunnel to"
                             " {host}:{port}", sid=redact(message.session_id),
                             host=message.tunnel_host or addr[0], port=message.tunnel_port)

