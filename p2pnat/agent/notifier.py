# -*- test-case-name: tests.unit.test_relay_notify,tests.unit.test_agent_failover -*-
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


class Liveness:
    """
    When to check that the relay is alive, and when it is dead: the
    schedule of L{Notifier}'s dead-relay detection, apart from its I/O.

    After the relay's last answer (or our start with it), the first check
    goes out once the relay has been quiet for C{quiet} seconds, then
    L{RETRANSMITS} more spread over the remaining C{window}; with no answer
    by C{dead_after} seconds, the relay is dead.  The window is a third of
    C{dead_after}, at most L{MAX_WINDOW} seconds: time enough for a lost
    datagram to be sent again, while a longer C{dead_after} buys fewer
    checks (one per C{quiet} seconds of silence) rather than a longer wait.
    Before the relay has told its period, only the deadline applies (the
    period requests are the checks).
    """

    RETRANSMITS = 2
    MAX_WINDOW = 10.0

    def __init__(self, dead_after):
        self.dead_after = float(dead_after)
        self.window = min(self.dead_after / 3, self.MAX_WINDOW)
        self.quiet = self.dead_after - self.window
        self.last = 0.0
        self.checks = 0

    def restart(self, now):
        """We start with a relay: as if it had just answered."""
        self.heard(now)

    def heard(self, now):
        """The relay answered at C{now}."""
        self.last = now
        self.checks = 0

    def next(self, running):
        """
        The next step and when it is due: ``("ack", at)`` (the first
        check: a notify B asking for an ack), ``("ping", at)`` (a
        retransmission) or ``("dead", at)``.  C{running}: the relay has
        told its period (before that, only the deadline counts).
        """
        if not running or self.checks > self.RETRANSMITS:
            return "dead", self.last + self.dead_after
        at = self.last + self.quiet + self.checks * self.window / (self.RETRANSMITS + 1)
        return ("ack" if self.checks == 0 else "ping"), at

    def checked(self):
        """A check was sent."""
        self.checks += 1


class Notifier:
    """
    The agent's relay-facing protocol logic (used as the handler of a
    L{p2pnat.net.udp.ControlProtocol}).

    Timers: until the relay has told its period, a period request is
    retried with backoff; then notify B goes out every C{b_interval}
    seconds and notify A at least three times per access-check period
    (and at once when the relay asks for one).

    Dead-relay detection (with C{dead_after}): a relay that has not
    answered for C{dead_after} seconds, retransmitted checks included, is
    dead, and C{on_dead(relay_addr)} is called (by default the agent starts
    over with the same address).  A relay that has told nothing for the
    quiet time (L{Liveness}) is checked: the notify B due then goes out at
    once with the frame flag L{wire.ACK_REQUESTED}, which the relay answers
    with a NotifyAck, and then up to L{Liveness.RETRANSMITS} L{wire.Ping}s
    (answered by relays of any version).  What counts as an answer: the
    period, an ack of a notify sent to this relay, a pong to our ping.
    Until the relay has told its period, the period requests are the
    checks.

    @param on_connect: called with a verified L{wire.ConnectRequest}.
    @param dead_after: seconds of silence, retransmitted checks included,
        after which the relay counts as dead; None turns the detection off.
    @param on_dead: called with the address of a relay found dead; it
        calls L{switch} to report elsewhere.
    @param on_direct: called with a verified L{wire.DirectConnectRequest}
        (the first copy of each), the relay's address and the socket it
        came on; when given, every notify carries L{wire.DIRECT_CAPABLE}
        so that the relay sends them.
    """

    log = Logger(namespace="p2pnat.agent")

    def __init__(self, device_id, mac_key, relay_addr, clock, b_interval=20.0,
                 on_connect=None, dead_after=None, on_dead=None, on_direct=None):
        self.device_id = device_id
        self.mac_key = mac_key
        self.relay_addr = relay_addr
        self.clock = clock
        self.b_interval_config = b_interval
        self.on_connect = on_connect or (lambda request: None)
        self.take_direct(on_direct)
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
        self.liveness = Liveness(dead_after) if dead_after is not None else None
        self.on_dead = on_dead or (lambda relay_addr: self.switch(relay_addr, self.proto))
        self._live_call = None
        self._pinged = {}  # ping timestamp -> local send time
        self._since = None  # our first notify stamp to this relay

    # -- timers ---------------------------------------------------------------

    def start(self, proto):
        """Begin talking to the relay through C{proto}."""
        self.proto = proto
        if self.liveness is not None:
            self.liveness.restart(self.clock.seconds())
            self._arm(self.liveness.dead_after)  # for the first answer
        self._ask_period()

    def stop(self):
        for loop in (self._a_loop, self._b_loop):
            if loop is not None and loop.running:
                loop.stop()
        for call in (self._period_call, self._live_call):
            if call is not None and call.active():
                call.cancel()
        self._period_call = self._live_call = None

    def take_direct(self, on_direct):
        """
        Take direct requests with C{on_direct} from now on, or none (None):
        every notify from now on says so (L{wire.DIRECT_CAPABLE}).
        """
        self.on_direct = on_direct
        self._notify_flags = wire.DIRECT_CAPABLE if on_direct is not None else 0

    def switch(self, relay_addr, proto):
        """
        Report to the relay at C{relay_addr} through C{proto} from now on,
        as from a fresh start: learn its period and clock, then send it a
        notify A at once (it owns the device's mapping from then on).
        """
        self.stop()
        self.relay_addr = relay_addr
        self.period = self.advised_b = self.public_addr = None
        self._period_asked.clear()
        self._pinged.clear()
        self._retry = 1.0
        self._since = None
        # The new relay's timestamps follow its own clock, which may be
        # behind the old one's: start its replay mark afresh.
        self.replay.forget(self.device_id)
        self.start(proto)

    def _send(self, message, stamp=None, flags=0):
        """Send C{message} to the relay; False if it could not be sent."""
        if stamp is None:
            stamp = self.stamper()
            if self._since is None:
                self._since = stamp
        data = wire.seal(message, self.device_id, self.mac_key, stamp, flags)
        try:
            self.proto.send(data, self.relay_addr, type(message).__name__)
        except OSError as e:
            # No route while the network is down: the timers try again.
            self.log.warn("cannot send {kind} to the relay: {error}",
                          kind=type(message).__name__, error=e)
            return False
        return True

    def _ask_period(self):
        # The next try is set before this one goes out: an answer that comes
        # back at once (in-memory tests) must find it to cancel it.
        self._period_call = self.clock.callLater(self._retry, self._ask_period)
        self._retry = min(self._retry * 2, 30.0)
        try:
            # A clock probe: we may not know the relay's clock yet.
            self._send_probe(wire.PeriodRequest(), self._period_asked, 16)
        except Exception:
            self.log.failure("period request failed")

    def _send_probe(self, message, asked, limit):
        """
        Send the clock probe C{message} (answered at most once per stamp),
        remembering its stamp and our send time in C{asked} (the latest
        C{limit}) for the answer's echo.  Remembered before it is sent: the
        answer may come at once.
        """
        stamp = self.stamper.probe()
        asked[stamp] = self.clock.seconds()
        while len(asked) > limit:
            del asked[next(iter(asked))]
        if not self._send(message, stamp):
            self.stamper.probe_unsent()

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
        self._send(wire.NotifyA(local=self._local(), mapped=mapped), flags=self._notify_flags)

    def notify_b(self, flags=0):
        self._send(wire.NotifyB(local=self._local(), mapped=self._mapped_told()),
                   flags=flags | self._notify_flags)

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
        self._b_loop = LoopingCall(self._safely(self._b_tick))
        self._b_loop.clock = self.clock
        self._b_loop.start(self.b_interval, now=False)

    # -- dead-relay detection ----------------------------------------------------

    def _arm(self, delay):
        if self._live_call is not None and self._live_call.active():
            self._live_call.cancel()
        self._live_call = self.clock.callLater(max(0.0, delay), self._live_tick)

    def _live_tick(self):
        self._live_call = None
        try:
            now = self.clock.seconds()
            running = self.period is not None
            action, at = self.liveness.next(running)
            if at - now > 1e-6:
                return self._arm(at - now)
            if action == "dead":
                return self.on_dead(self.relay_addr)
            self.liveness.checked()
            self._check(action)
            self._arm(self.liveness.next(running)[1] - now)
        except Exception:
            self.log.failure("liveness check failed; will retry")
            if self._live_call is None:
                self._arm(1.0)

    def _b_tick(self):
        """
        The periodic notify B.  It is the check too when one is due before
        the next B would be half-way: so the checks replace notifies B
        rather than come on top of them.
        """
        if self.liveness is not None:
            now = self.clock.seconds()
            action, at = self.liveness.next(True)
            if action == "ack" and at - now <= self.b_interval / 2:
                self.liveness.checked()
                self.notify_b(wire.ACK_REQUESTED)
                return self._arm(self.liveness.next(True)[1] - now)
        self.notify_b()

    def _check(self, action):
        """Ask the relay for a sign of life: a notify B it acks, or a ping."""
        if action == "ack":
            self.notify_b(wire.ACK_REQUESTED)
            if self._b_loop is not None and self._b_loop.running:
                self._b_loop.reset()  # this was the notify B: the next one is due later
            return
        self._send_probe(wire.Ping(), self._pinged, 8)

    def _heard(self):
        """The current relay answered us."""
        if self.liveness is not None:
            self.liveness.heard(self.clock.seconds())

    def _got_pong(self, message):
        sent = self._pinged.pop(message.echo, None)
        if sent is None:
            return
        self._pinged.clear()
        self.stamper.sync(sent, self.clock.seconds(), message.server_time)
        self._heard()

    # -- datagrams from the relay ----------------------------------------------

    _FROM_RELAY = frozenset({wire.Period.TYPE, wire.NotifyAck.TYPE, wire.ConnectRequest.TYPE,
                             wire.Pong.TYPE})

    def key_for(self, key_id, mtype):
        if key_id != self.device_id:
            return None
        if mtype not in self._FROM_RELAY and not (
                mtype == wire.DirectConnectRequest.TYPE and self.on_direct is not None):
            return None
        return self.mac_key

    def handle(self, frame, message, addr, proto):
        if isinstance(message, wire.Period):
            self._got_period(message)
        elif isinstance(message, wire.NotifyAck):
            self._got_ack(message, addr)
        elif isinstance(message, wire.ConnectRequest):
            self._got_connect(message, addr)
        elif isinstance(message, wire.Pong):
            self._got_pong(message)
        elif isinstance(message, wire.DirectConnectRequest):
            self._got_direct(message, addr, proto)
        return None

    def _got_direct(self, message, addr, proto):
        # The relay sends each twice: act on the first copy.
        if self.on_direct is None or not self.seen.add(b"direct" + message.direct_id):
            return
        self.on_direct(message, addr, proto)

    def _got_period(self, message):
        sent = self._period_asked.pop(message.echo, None)
        if sent is None:
            self.log.info("ignored a period answer to no request of ours")
            return
        self._period_asked.clear()
        self.stamper.sync(sent, self.clock.seconds(), message.server_time)
        self._heard()
        first = self.period is None
        changed = message.period != self.period or message.notify_b_max != self.advised_b
        self.period = message.period
        self.advised_b = message.notify_b_max
        if self._period_call is not None and self._period_call.active():
            self._period_call.cancel()
        self._period_call = None
        self._retry = 1.0
        if first and self.liveness is not None:
            # From the deadline for a first answer to the quiet-time checks.
            self._arm(self.liveness.next(True)[1] - self.clock.seconds())
        if first or changed:
            self.log.info(
                "relay {relay} access-check period {period}s; notify A every {a:.0f}s,"
                " notify B every {b:.0f}s", relay=wire.format_addr(self.relay_addr), period=self.period,
                a=self.a_interval, b=self.b_interval)
            self._schedule()

    def _got_ack(self, message, addr):
        self.last_ack = self.clock.seconds()
        # Stamps only increase: an ack of a notify sent before we moved to
        # this relay came from the one before.
        if self._since is not None and message.echo >= self._since:
            self._heard()
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

