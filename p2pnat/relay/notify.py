# -*- test-case-name: tests.unit.test_relay_notify -*-
"""
The relay's UDP side: devices ask for the access-check period and send
notify A and notify B; the relay answers and later sends connect requests
from the same socket.
"""

from p2pnat.daemon.logs import Logger
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
    """

    log = Logger(namespace="p2pnat.relay.notify")

    def __init__(self, table, clock, metrics, notify_b_max=25, on_moved=None):
        self.table = table
        self.clock = clock
        self.metrics = metrics
        self.notify_b_max = notify_b_max
        self.on_moved = on_moved or (lambda device_id: None)

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
        if isinstance(message, wire.NotifyA):
            d = self.table.get(device_id)
            was = d.addr, d.last_access
            self.table.notify_a(device_id, addr, message.local, proto, now)
            if was[0] != addr or was[1] is None or now - was[1] > self.table.period:
                self.log.info("device {device_id} online at {addr}", device_id=device_id,
                              addr=wire.format_addr(addr))
            if was[0] is not None and was[0] != addr:
                self.on_moved(device_id)
            return wire.NotifyAck(frame.timestamp, addr, 0)
        if isinstance(message, wire.NotifyB):
            old = self.table.get(device_id).addr
            changed = self.table.notify_b(device_id, addr, message.local, proto)
            if changed:
                self.log.info("device {device_id} mapping now {addr}", device_id=device_id,
                              addr=wire.format_addr(addr))
                if old is not None and old != addr:
                    self.on_moved(device_id)
            d = self.table.get(device_id)
            flags = 0
            if d.last_access is None or now - d.last_access > self.table.period / 2:
                flags |= wire.NEED_NOTIFY_A
            # Notify B only keeps the NAT's mapping, which the device's own
            # outgoing packet refreshes.  It is answered only when the
            # device must act (send a notify A now) or learn its new public
            # address: at 100 000 devices, an ack for every B was a third
            # of the relay's CPU (bench/notify_scale.py).  Or when the
            # device asks (wire.ACK_REQUESTED): it checks that we are alive
            # after a quiet spell, at most once per its notify B.
            if flags or changed or frame.flags & wire.ACK_REQUESTED:
                return wire.NotifyAck(frame.timestamp, addr, flags)
            return None
        if isinstance(message, wire.PeriodRequest):
            return wire.Period(self.table.period, self.notify_b_max, int(now * 1e6),
                               frame.timestamp)
        if isinstance(message, wire.Ping):
            return wire.Pong(frame.timestamp, addr, int(now * 1e6))
        return None

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
            ack = wire.seal(wire.NotifyAck(frame.timestamp, to, wire.NEED_NOTIFY_A), d.id,
                            d.mac_key, sock.stamper())
            if len(ack) <= size:  # no amplification, as for any answer
                sock.send(ack, to, "NotifyAck")

