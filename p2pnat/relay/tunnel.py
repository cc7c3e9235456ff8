# -*- test-case-name: tests.unit.test_relay_tunnel_early,tests.unit.test_relay_loopback -*-
"""
The relay's end of device tunnels (see L{p2pnat.protocol.tunnel}).

A device connects over TLS with its client certificate; the TLS layer has
already checked the certificate against the relay's CA.  Here the relay
checks that the certificate is the one registered for a device that is
not revoked, reads the hello, claims the session, and then carries streams
between a terminal connection and the device.
"""

import hmac

from twisted.internet.protocol import Factory, Protocol

from p2pnat.daemon.logs import Logger, redact
from p2pnat.deployment import pki
from p2pnat.net import streams
from p2pnat.protocol import tunnel


class RelayTunnel(streams.IdleTimeout, Protocol):
    """
    One device's TLS connection to the relay.

    States: ``hello`` (waiting for the hello), ``idle`` (no stream),
    ``stream`` (carrying one terminal connection), ``closed``.
    """

    log = Logger(namespace="p2pnat.relay.tunnel")

    def __init__(self, relay):
        self.relay = relay
        self.state = "hello"
        self.device_id = None
        self.terminal = None
        self._buf = b""
        self._sent_end = self._got_end = False
        self._hello_timer = None
        self.decoder = tunnel.FrameDecoder(self._open, self._data, self._end, self._opened)
        self._unconfirmed = None  # bytes sent since an unconfirmed OPEN
        self._early = None  # the session bound by a resumed handshake, until its hello
        self._open_timer = None

    def connectionMade(self):
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self._hello_timer = self.relay.clock.callLater(self.relay.hello_timeout, self._hello_late)

    def _hello_late(self):
        self._hello_timer = None
        self.log.info("tunnel from {peer}: no hello in time", peer=self._peer())
        self.transport.abortConnection()

    def _cancel_hello_timer(self):
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None

    def _peer(self):
        p = self.transport.getPeer()
        return f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"

    def dataReceived(self, data):
        try:
            if self._early is not None:
                self._buf += data
                if len(self._buf) < tunnel.HELLO.size:
                    return
                data, hello = self._buf[tunnel.HELLO.size:], self._buf[:tunnel.HELLO.size]
                self._buf = b""
                self._confirm_early(hello)
                if not data:
                    return
            elif self.state == "hello":
                self._buf += data
                if len(self._buf) < tunnel.HELLO.size:
                    return
                data, self._buf = self._buf[tunnel.HELLO.size:], self._buf[:tunnel.HELLO.size]
                if not self._hello(self._buf):
                    return
                self._buf = b""
                if not data:
                    return
            self.decoder.feed(data)
        except tunnel.TunnelError as e:
            self.log.warn("tunnel of {device_id}: {error}; closing", device_id=self.device_id,
                          error=e)
            self.transport.abortConnection()

    def _refuse(self, code, fmt, **kw):
        self.log.warn("tunnel from {peer} refused: " + fmt, peer=self._peer(), **kw)
        self.relay.metrics.sessions.labels("tunnel-refused").inc()
        self.transport.write(bytes([code]))
        self.transport.loseConnection()
        self.state = "closed"
        return False

    def _device(self):
        """
        The device this tunnel's client certificate names, if the registry
        knows it under this certificate and has not revoked it.

        @return: ``(device_id, None)`` or ``(None, (code, log format, kw))``.
        """
        cert = self.transport.getPeerCertificate()
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

    def _hello(self, data):
        self._cancel_hello_timer()
        try:
            session_id, nonce = tunnel.parse_hello(data)
        except tunnel.TunnelError:
            return self._refuse(1, "malformed hello")
        device_id, refusal = self._device()
        if refusal is not None:
            code, fmt, kw = refusal
            return self._refuse(code, fmt, **kw)
        session, error = self.relay.sessions.claim(session_id, device_id, nonce)
        if session is None:
            return self._refuse(error, "{device_id}: {why} (session {sid})",
                                device_id=device_id, why=tunnel.HELLO_ERRORS[error],
                                sid=redact(session_id))
        self._bind(device_id, session)
        return True

    def _bind(self, device_id, session):
        self.device_id = device_id
        self.transport.write(bytes([tunnel.HELLO_OK]))
        self.state = "idle"
        self.relay.tunnel_opened(self)
        self.log.debug("tunnel of {device_id} bound to session {sid}", device_id=device_id,
                       sid=redact(session.id))
        session.ready.callback(self)

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
        session_id = tunnel.session_from_alpn(offered)
        if session_id is None or self.state != "hello":
            return
        device_id, refusal = self._device()
        if refusal is not None:
            return  # the hello will be refused the usual way
        session = self.relay.sessions.claim_early(session_id, device_id)
        if session is None:
            return
        self._early = session
        self.relay.metrics.sessions.labels("tunnel-half-rtt").inc()
        self._bind(device_id, session)

    def _confirm_early(self, data):
        """The hello after an early binding: it must name the same session."""
        session, self._early = self._early, None
        self._cancel_hello_timer()
        session_id, nonce = tunnel.parse_hello(data)
        if session_id != session.id or not hmac.compare_digest(nonce, session.nonce):
            raise tunnel.TunnelError("the hello names another session than the one the"
                                     " resumed handshake bound")

    # -- streams ------------------------------------------------------------

    def start_stream(self, terminal, service="", reused=False):
        """
        Carry C{terminal}'s connection on this idle tunnel.  On a C{reused}
        tunnel, what is sent is kept until the device confirms the OPEN.
        """
        assert self.state == "idle", self.state
        self._cancel_idle()
        self.state = "stream"
        self.terminal = terminal
        self._sent_end = self._got_end = False
        self.transport.write(tunnel.frame(tunnel.OPEN, service.encode("ascii")))
        if reused:
            self._unconfirmed = []
            self._open_timer = self.relay.clock.callLater(self.relay.open_timeout,
                                                          self._open_late)
        # Each side stops reading when the other cannot keep up.
        self.transport.registerProducer(terminal.gate, True)
        terminal.transport.registerProducer(self.gate, True)

    def send_data(self, data):
        if self.state == "stream" and not self._sent_end:
            if self._unconfirmed is not None:
                self._unconfirmed.append(data)
            self.transport.writeSequence([tunnel.data_header(len(data)), data])

    def _opened(self):
        if self._open_timer is not None and self._open_timer.active():
            self._open_timer.cancel()
        self._open_timer = None
        self._unconfirmed = None

    def _open_late(self):
        """The device never confirmed the OPEN: this idle tunnel was dead."""
        self._open_timer = None
        pending, self._unconfirmed = b"".join(self._unconfirmed or []), None
        self.log.info("idle tunnel of {device_id} did not answer; retrying on a new one",
                      device_id=self.device_id)
        terminal = self._detach()
        self.state = "closed"
        self.transport.abortConnection()
        if terminal is not None:
            terminal.retry(pending)

    def send_end(self):
        """The terminal's side of the stream closed."""
        if self.state != "stream" or self._sent_end:
            return
        self._sent_end = True
        self.transport.write(tunnel.frame(tunnel.END))
        self._maybe_done()

    def _open(self, service):
        raise tunnel.TunnelError("device sent OPEN")

    def _data(self, data):
        if self.state == "stream" and not self._got_end:
            self.terminal.transport.write(data)
        elif self.state != "stream":
            raise tunnel.TunnelError("data outside a stream")

    def _end(self):
        if self.state != "stream" or self._got_end:
            raise tunnel.TunnelError("END outside a stream")
        self._got_end = True
        terminal = self.terminal
        if not self._sent_end:
            # The device's service closed: close the terminal after what
            # was written, and acknowledge.
            self._sent_end = True
            self.transport.write(tunnel.frame(tunnel.END))
        self._maybe_done()
        terminal.tunnel_ended()

    def _detach(self):
        """End the back-pressure pairing with the stream's terminal; return it."""
        terminal, self.terminal = self.terminal, None
        self.transport.unregisterProducer()
        if terminal is not None and terminal.transport is not None:
            try:
                terminal.transport.unregisterProducer()
            except RuntimeError:
                pass
        return terminal

    def _maybe_done(self):
        if not (self._sent_end and self._got_end):
            return
        self._detach()
        self.gate.resumeProducing()
        self.state = "idle"
        self.relay.tunnel_idle(self)
        self._start_idle(self.relay.clock, self.relay.idle_timeout)

    def close(self):
        """Drop the tunnel at once (revocation), and its terminal with it."""
        self.revoked = True
        self.transport.abortConnection()

    revoked = False

    def connectionLost(self, reason):
        self._cancel_idle()
        self._cancel_hello_timer()
        was, self.state = self.state, "closed"
        if self.device_id is not None:
            self.relay.tunnel_closed(self)
        if self._open_timer is not None and self._open_timer.active():
            self._open_timer.cancel()
        if was == "stream" and self.terminal is not None:
            terminal, self.terminal = self.terminal, None
            terminal.tunnel_lost(abort=self.revoked)


class RelayTunnelFactory(Factory):
    noisy = False

    def __init__(self, relay):
        self.relay = relay

    def buildProtocol(self, addr):
        return RelayTunnel(self.relay)
