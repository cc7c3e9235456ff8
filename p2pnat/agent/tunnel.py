# -*- test-case-name: tests.unit.test_relay_loopback -*-
"""
The device agent's end of a tunnel (see L{p2pnat.protocol.tunnel}): a TLS
connection to the relay, opened for a verified connect request, carrying
streams to the device's local service.
"""

from twisted.internet.protocol import Protocol

from p2pnat.daemon.logs import Logger, redact
from p2pnat.net import streams
from p2pnat.protocol import tunnel

_BAD_GATEWAY_BODY = b"The device's local web server is not answering.\r\n"
_BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BAD_GATEWAY_BODY)
                + _BAD_GATEWAY_BODY)


class _Local(Protocol):
    """The agent's connection to the local service for one stream."""

    def __init__(self, tun):
        self.tun = tun

    def connectionMade(self):
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self.tun.local_connected(self)

    def dataReceived(self, data):
        self.tun.send_data(data)

    def connectionLost(self, reason):
        self.tun.local_lost(self)


class AgentTunnel(streams.IdleTimeout, Protocol):
    """
    States: ``hello`` (waiting for the relay's status), ``idle``,
    ``connecting`` (to the local service), ``stream``, ``closed``.
    """

    log = Logger(namespace="p2pnat.agent.tunnel")

    def __init__(self, agent, session_id, nonce):
        self.agent = agent
        self.session_id = session_id
        self.nonce = nonce
        self.state = "hello"
        self.local = None
        self._pending = []
        self._sent_end = self._got_end = False
        self.decoder = tunnel.FrameDecoder(self._open, self._data, self._end)

    def connectionMade(self):
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self.transport.write(tunnel.hello(self.session_id, self.nonce))

    def dataReceived(self, data):
        try:
            if self.state == "hello":
                status, data = data[0], data[1:]
                if status != tunnel.HELLO_OK:
                    self.log.warn("relay refused tunnel for session {sid}: {why}",
                                  sid=redact(self.session_id),
                                  why=tunnel.HELLO_ERRORS.get(status, status))
                    self.transport.loseConnection()
                    self.state = "closed"
                    return
                self.state = "idle"
                self.agent.tunnel_opened(self)
                self._start_idle()
                if not data:
                    return
            self.decoder.feed(data)
        except tunnel.TunnelError as e:
            self.log.warn("tunnel protocol error: {error}; closing", error=e)
            self.transport.abortConnection()

    # -- frames from the relay ------------------------------------------------

    def _open(self, service):
        if self.state != "idle":
            raise tunnel.TunnelError("OPEN while a stream is running")
        self._cancel_idle()
        self.transport.write(tunnel.frame(tunnel.OPENED))
        address = self.agent.local_services.get(service)
        self._sent_end = self._got_end = False
        self.service = service
        if address is None:
            self.log.warn("relay asked for unknown service {service!r}", service=service)
            self.state = "stream"
            self._finish_local()
            return
        self.state = "connecting"
        # Nothing is read from the relay until the local service is there.
        self.transport.pauseProducing()
        d = self.agent.local_endpoint(address).connect(streams.OneShotFactory(_Local(self)))
        d.addErrback(self._local_failed, address)

    def _local_failed(self, failure, address):
        if self.state != "connecting":
            return
        self.log.warn("local service {host}:{port} not answering: {error}", host=address[0],
                      port=address[1], error=failure.getErrorMessage())
        self.state = "stream"
        self.transport.resumeProducing()
        if self.service == "":
            self.send_data(_BAD_GATEWAY)
        self._finish_local()

    def local_connected(self, local):
        if self.state != "connecting":
            local.transport.abortConnection()
            return
        self.local = local
        self.state = "stream"
        for data in self._pending:
            local.transport.write(data)
        self._pending = []
        local.transport.registerProducer(self.gate, True)
        self.transport.registerProducer(local.gate, True)
        self.transport.resumeProducing()
        if self._got_end:
            local.transport.loseConnection()

    def _data(self, data):
        if self.state == "stream" and self.local is not None:
            self.local.transport.write(data)
        elif self.state == "connecting":
            self._pending.append(data)
        elif self.state != "stream":
            raise tunnel.TunnelError("data outside a stream")

    def _end(self):
        if self.state not in ("stream", "connecting") or self._got_end:
            raise tunnel.TunnelError("END outside a stream")
        self._got_end = True
        if self.local is not None:
            streams.close_after_writes(self.local.transport)
        elif self.state == "stream":
            self._finish_local()

    # -- the local side -----------------------------------------------------------

    def send_data(self, data):
        if self.state == "stream" and not self._sent_end:
            self.transport.writeSequence([tunnel.data_header(len(data)), data])

    def local_lost(self, local):
        if local is self.local and self.state != "closed":
            self.local = None
            try:
                self.transport.unregisterProducer()
            except RuntimeError:
                pass
            self.gate.resumeProducing()
            self._finish_local()

    def _finish_local(self):
        """The local side of the stream is closed: tell the relay once."""
        if self.state == "closed":
            return
        if not self._sent_end:
            self._sent_end = True
            self.transport.write(tunnel.frame(tunnel.END))
        if self._got_end:
            self.state = "idle"
            self._start_idle()

    # -- idle ---------------------------------------------------------------------

    def _start_idle(self):
        streams.IdleTimeout._start_idle(self, self.agent.clock, self.agent.idle_timeout)

    def connectionLost(self, reason):
        self._cancel_idle()
        self.state = "closed"
        local, self.local = self.local, None
        if local is not None:
            streams.close_after_writes(local.transport)
        self.agent.tunnel_closed(self)
