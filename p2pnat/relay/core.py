# -*- test-case-name: tests.unit.test_relay_terminal -*-
"""
The relay's core: what the terminal side and the tunnel side share.

It owns the device table, the pending sessions and the live and idle
tunnels, and sends connect requests from the socket each device's notifies
arrive at.
"""

import hashlib

from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool

from p2pnat.daemon.logs import Logger, redact
from p2pnat.protocol import wire
from p2pnat.relay.sessions import SessionTable, SessionTimeout


class TooBusy(SessionTimeout):
    """Too many sessions pending (for this device or in all)."""


class Relay:
    """
    @param devices: the L{p2pnat.relay.devices.DeviceTable}.
    @param registry: the L{p2pnat.deployment.registry.Registry} (credential checks).
    @param tokens: the L{p2pnat.relay.terminal.Tokens} for login cookies.
    @param tunnel_host: host name told to devices in connect requests
        (empty: the one they already use for the relay).
    """

    log = Logger(namespace="p2pnat.relay")

    def __init__(self, clock, metrics, devices, registry, tokens, *, hostname, tunnel_port,
                 tunnel_host="", https_port=443, http_port=0, session_timeout=10.0,
                 idle_timeout=60.0, max_idle_per_device=8):
        self.clock = clock
        self.metrics = metrics
        self.devices = devices
        self.registry = registry
        self.tokens = tokens
        self.hostname = hostname
        self.tunnel_port = tunnel_port
        self.tunnel_host = tunnel_host
        self.https_port = https_port
        self.http_port = http_port
        self.sessions = SessionTable(clock, session_timeout)
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle_per_device
        self.head_timeout = 30.0
        #: seconds a reused idle tunnel has to confirm an OPEN
        self.open_timeout = 2.0
        self.hello_timeout = 10.0
        self.terminals = set()  # open terminal connections
        self.tunnels = {}  # device ID -> set of live tunnels
        self.idle = {}  # device ID -> list of idle tunnels, most recent last
        self._cred_cache = {}  # hash of (device, stored hash, credential) -> expiry

    # -- what the terminal side asks -------------------------------------------

    def registry_record(self, device_id):
        d = self.devices.get(device_id)
        return d.record if d is not None else None

    def check_credential(self, device_id, given):
        """
        Whether C{given} is the device's access credential.  The hash
        check (scrypt, slow on purpose) runs in the reactor's thread pool;
        a success is remembered for a minute so that a CLI presenting the
        credential on every connection does not pay it each time.

        @return: Deferred firing with a bool.
        """
        from p2pnat.deployment.registry import verify_credential

        record = self.registry_record(device_id)
        stored = record.access_credential_hash if record is not None else None
        if not stored:
            return succeed(False)
        key = hashlib.sha256(f"{device_id}\0{stored}\0{given}".encode()).digest()
        now = self.clock.seconds()
        if self._cred_cache.get(key, 0) > now:
            return succeed(True)
        pool = getattr(self.clock, "getThreadPool", None)
        if pool is None:  # a test clock: check inline
            d = succeed(verify_credential(stored, given))
        else:
            d = deferToThreadPool(self.clock, pool(), verify_credential, stored, given)

        def remember(ok):
            if ok:
                if len(self._cred_cache) > 1024:
                    self._cred_cache.clear()
                self._cred_cache[key] = now + 60
            return ok

        return d.addCallback(remember)

    def device_url(self, device_id, secure):
        port = self.https_port if secure else self.http_port
        scheme = "https" if secure else "http"
        default = 443 if secure else 80
        suffix = "" if port in (default, 0) else f":{port}"
        return f"{scheme}://{device_id}.{self.hostname}{suffix}/"

    def get_tunnel(self, device_id, terminal, reuse=True):
        """
        A tunnel to C{device_id} for C{terminal}: an idle one at once, else
        a new session whose connect request is sent (and retransmitted)
        now.

        @return: Deferred firing with a L{p2pnat.relay.tunnel.RelayTunnel}
            in state ``idle``.
        """
        idle = self.idle.get(device_id) if reuse else None
        while idle:
            t = idle.pop()
            if not idle:
                del self.idle[device_id]
            if t.state == "idle":
                self.metrics.sessions.labels("reused").inc()
                t.reused = True
                return succeed(t)
        session = self.sessions.create(device_id, self._send_connect)
        if session is None:
            return fail(TooBusy("too many sessions waiting for this device"))
        terminal.session = session
        self.metrics.sessions.labels("connect-request").inc()
        self.metrics.active_sessions.set(len(self.sessions))
        return session.ready

    def cancel_wait(self, terminal):
        if terminal.session is not None:
            self.sessions.cancel(terminal.session.id)
            self.metrics.active_sessions.set(len(self.sessions))

    def _send_connect(self, session):
        d = self.devices.get(session.device_id)
        if d is None or d.revoked or d.socket is None or d.addr is None:
            return
        proto = d.socket
        message = wire.ConnectRequest(session.id, session.nonce, self.tunnel_port,
                                      self.tunnel_host)
        data = wire.seal(message, d.id, d.mac_key, proto.stamper())
        if session.sent == 0:
            self.log.debug("connect request for {device_id} to {addr}, session {sid}",
                           device_id=d.id, addr=d.addr, sid=redact(session.id))
        try:
            proto.send(data, d.addr, "ConnectRequest")
        except OSError as e:
            self.log.warn("cannot send connect request to {device_id}: {error}",
                          device_id=d.id, error=e)

    # -- what the tunnel side tells ---------------------------------------------

    def tunnel_opened(self, tunnel):
        self.tunnels.setdefault(tunnel.device_id, set()).add(tunnel)
        self.metrics.active_sessions.set(len(self.sessions))

    def tunnel_idle(self, tunnel):
        idle = self.idle.setdefault(tunnel.device_id, [])
        idle.append(tunnel)
        while len(idle) > self.max_idle:
            idle.pop(0).close()

    def tunnel_closed(self, tunnel):
        live = self.tunnels.get(tunnel.device_id)
        if live is not None:
            live.discard(tunnel)
            if not live:
                del self.tunnels[tunnel.device_id]
        idle = self.idle.get(tunnel.device_id)
        if idle and tunnel in idle:
            idle.remove(tunnel)
            if not idle:
                del self.idle[tunnel.device_id]

    def close_all(self):
        """Shutting down: drop every terminal and tunnel connection."""
        for t in list(self.terminals):
            t.transport.abortConnection()
        for live in list(self.tunnels.values()):
            for t in list(live):
                t.close()
        self.idle.clear()

    def device_moved(self, device_id):
        """
        The device's notifies come from a new address: its idle tunnels
        went through the old mapping, which the NAT (or a renumbered
        router) may have dropped without a word, and a stream opened on
        such a tunnel would hang.  Close them; the next request sends a
        connect request to the new address instead.
        """
        idle = self.idle.pop(device_id, ())
        if idle:
            self.log.info("device {device_id} moved; closing its {n} idle tunnels",
                          device_id=device_id, n=len(idle))
        for t in idle:
            t.close()

    def device_revoked(self, device_id):
        """
        End everything a revoked device has open, at once: terminals still
        waiting get 403; tunnels are dropped; and so is every terminal
        connection that carried the device's data, even one whose stream
        the device already finished (its last bytes may still be queued).
        """
        self.sessions.cancel_device(device_id)
        for t in list(self.tunnels.get(device_id, ())):
            t.close()
        self.idle.pop(device_id, None)
        for t in list(self.terminals):
            if t.device_id == device_id and t.streamed and t.transport is not None:
                t.transport.abortConnection()
