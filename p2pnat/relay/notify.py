# -*- test-case-name: tests.unit.test_relay_notify -*-
"""
The relay's UDP side: devices ask for the access-check period and send
notify A and notify B; the relay answers and later sends connect requests
from the same socket.
"""

from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.protocol import wire

_DEVICE_TYPES = frozenset({wire.Ping.TYPE, wire.PeriodRequest.TYPE, wire.NotifyA.TYPE,
                           wire.NotifyB.TYPE})


class NotifyHandler:
    """
    Handles authenticated datagrams from devices (see L{p2pnat.net.udp}).

    @param table: the L{p2pnat.relay.devices.DeviceTable}.
    @param notify_b_max: the longest notify-B interval we advise, seconds.
    @param on_moved: called with a device ID when its notifies come from a
        new address (its NAT mapping or public address changed).

    A notify may tell the device's port-mapped address (L{wire.Notify.mapped}):
    the table keeps the latest one its authenticated notifies told, if the
    relay may send there (L{p2pnat.relay.devices.usable_mapped}).  Every
    NotifyAck carries L{wire.TAKES_MAPPED}, so that devices send it only
    to relays that take it.
    @param on_live: called with the device's state, ``"A"`` or ``"B"`` and
        the time, after each notify is recorded (a cluster shares the
        device's live entry; L{p2pnat.cluster.state.LiveWrites} decides
        when to write).
    """

    log = Logger(namespace="p2pnat.relay.notify")

    def __init__(self, table, clock, metrics, notify_b_max=25, on_moved=None, on_live=None,
                 on_flags=None):
        self.table = table
        self.clock = clock
        self.metrics = metrics
        self.notify_b_max = notify_b_max
        self.on_moved = on_moved or (lambda device_id: None)
        self._throttle = Throttle(clock)
        self.on_live = on_live or (lambda state, kind, now: None)
        self.on_flags = on_flags or (lambda device_id, flags: None)

    def key_for(self, key_id, mtype):
        if mtype not in _DEVICE_TYPES:
            return None
        return self.table.key_for(key_id)

    def handle(self, frame, message, addr, proto):
        now = self.clock.seconds()
        device_id = frame.key_id
        if isinstance(message, (wire.NotifyA, wire.NotifyB)):
            d = self.table.get(device_id)
            d.stamp, d.disputed = frame.timestamp, False
            self.on_flags(device_id, frame.flags)
        if isinstance(message, wire.NotifyA):
            d = self.table.get(device_id)
            was = d.addr, d.last_access, d.mapped
            self.table.notify_a(device_id, addr, message.local, proto, now, message.mapped)
            if was[0] != addr or was[1] is None or now - was[1] > self.table.period:
                self.log.info("device {device_id} online at {addr}", device_id=device_id,
                              addr=wire.format_addr(addr))
            if was[0] is not None and was[0] != addr:
                self.on_moved(device_id)
            self._mapped_told(d, was[2], message.mapped, addr)
            self.on_live(d, "A", now)
            return wire.NotifyAck(frame.timestamp, addr, wire.TAKES_MAPPED)
        if isinstance(message, wire.NotifyB):
            d = self.table.get(device_id)
            old, old_mapped = d.addr, d.mapped
            changed = self.table.notify_b(device_id, addr, message.local, proto, message.mapped)
            if changed:
                if old != addr:
                    self.log.info("device {device_id} mapping now {addr}", device_id=device_id,
                                  addr=wire.format_addr(addr))
                if old is not None and old != addr:
                    self.on_moved(device_id)
            if changed or (message.mapped is not None and d.mapped is None):
                self._mapped_told(d, old_mapped, message.mapped, addr)
            d = self.table.get(device_id)
            self.on_live(d, "B", now)
            flags = wire.TAKES_MAPPED
            if d.last_access is None or now - d.last_access > self.table.period / 2:
                flags |= wire.NEED_NOTIFY_A
            # Notify B only keeps the NAT's mapping, which the device's own
            # outgoing packet refreshes.  It is answered only when the
            # device must act (send a notify A now) or learn its new public
            # address: at 100 000 devices, an ack for every B was a third
            # of the relay's CPU (bench/notify_scale.py).  Or when the
            # device asks (wire.ACK_REQUESTED): it checks that we are alive
            # after a quiet spell, at most once per its notify B.
            if flags & wire.NEED_NOTIFY_A or changed or frame.flags & wire.ACK_REQUESTED:
                return wire.NotifyAck(frame.timestamp, addr, flags)
            return None
        if isinstance(message, wire.PeriodRequest):
            return wire.Period(self.table.period, self.notify_b_max, int(now * 1e6),
                               frame.timestamp)
        if isinstance(message, wire.Ping):
            return wire.Pong(frame.timestamp, addr, int(now * 1e6))
        return None

    def _mapped_told(self, d, was, told, addr):
        """Log a change of C{d}'s port-mapped address, or one refused (rate-limited)."""
        if d.mapped != was:
            if d.mapped is None:
                self.log.info("device {device_id} has no port-mapped address now",
                              device_id=d.id)
            else:
                self.log.info("device {device_id} port-mapped at {mapped}", device_id=d.id,
                              mapped=wire.format_addr(d.mapped))
        same = told is not None and told[1] == addr[1] and told[0] in (
            addr[0], addr[0].removeprefix("::ffff:"))
        if told is not None and d.mapped is None and not same:
            held = self._throttle("refused-mapped")
            if held is not None:
                self.log.info("device {device_id} told port-mapped address {mapped}, which"
                              " the relay does not send to from {addr} ({held} more such"
                              " since the last line)", device_id=d.id,
                              mapped=wire.format_addr(told), addr=wire.format_addr(addr),
                              held=held)

    def replayed(self, frame, message, addr, proto):
        """
        A genuine frame refused as a replay.  When it is a copy of the
        device's latest notify from another address, one of the two came
        from someone who saw the notify on the wire and raced the device
        to the relay, and the relay cannot tell which: if the copy won, it
        now sends the device's connect requests to the copy's source.  So
        it asks both addresses, once per notify, for a fresh notify A
        (NotifyAck flag L{wire.NEED_NOTIFY_A}, never larger than the
        notify): the device's answer, from its real address, settles it.
        """
        if not isinstance(message, (wire.NotifyA, wire.NotifyB)):
            return
        d = self.table.get(frame.key_id)
        if d is None or d.stamp != frame.timestamp or d.addr == addr or d.disputed:
            return
        d.disputed = True
        self.log.warn("device {device_id}: a copy of its notify came from {addr} too;"
                      " asking {there} and {addr} for a fresh notify A", device_id=d.id,
                      addr=wire.format_addr(addr), there=wire.format_addr(d.addr))
        size = len(frame.signed) + wire.MAC_LEN
        for to, sock in ((d.addr, d.socket or proto), (addr, proto)):
            ack = wire.seal(wire.NotifyAck(frame.timestamp, to,
                                           wire.NEED_NOTIFY_A | wire.TAKES_MAPPED),
                            d.id, d.mac_key, sock.stamper())
            if len(ack) <= size:  # no amplification, as for any answer
                sock.send(ack, to, "NotifyAck")

