# -*- test-case-name: tests.unit.test_fastio -*-
"""
A leaner data path for Twisted TCP and TLS connections on the relay and the
agent, where every request crosses two proxies.

Twisted's stock path costs about 100 µs of CPU per proxied request and hop
on a 1 KiB HTTP exchange (``bench/http_load.py``), for two reasons this
module removes:

- C{FileDescriptor.write} only buffers: the bytes leave on the reactor's
  next turn, after an C{epoll_ctl} to watch for writability and another to
  stop.  L{write_through} sends at once when nothing is queued, and queues
  only what the kernel did not take (so back-pressure, producers and
  C{loseConnection} behave as before).
- C{TLSMemoryBIOProtocol} wraps the TCP transport in a protocol/transport
  pair of its own, and each read or write crosses both layers.  L{TLSFactory}
  runs the same pyOpenSSL connection (same memory BIOs, same contexts,
  certificate checks and ALPN, built by Twisted's own
  C{TLSMemoryBIOFactory}) directly on the TCP transport: one C{recv} per
  read, all its records decrypted and delivered as one C{dataReceived},
  every C{write} encrypted and sent at once.

Two TLS 1.3 features ride on it: session resumption for clients
(L{SessionCache}), and for servers (C{half_rtt}) a window between a
resumed ClientHello and the client's Finished in which the protocol may
already write (0.5-RTT data; see C{_TLS._tls_half_step}).

Both work by giving the TCP transport (C{twisted.internet.tcp.Server} or
C{Client}) a subclass with these methods, as Twisted's own C{startTLS} once
did.  A transport that is not a plain TCP connection (an in-memory test
transport, a UNIX socket...) gets Twisted's stock behaviour instead.
"""

import errno

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet import interfaces, main, tcp
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)
_BIO_CHUNK = 64 * 1024  # ciphertext read from the memory BIO per call
_RECORD = 32 * 1024  # plaintext asked of SSL_read per call (one record is <= 16 KiB)
# SSL_read_early_data's results (ssl.h).
_READ_EARLY_DATA_ERROR, _READ_EARLY_DATA_FINISH = 0, 2


def _as_bytes(data):
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes, not {type(data).__name__}")


class _WriteThrough:
    """Mixin for C{tcp.Connection}: send at once what can be sent."""

    def _raw_write(self, data):
        if not self.connected or self._writeDisconnected or getattr(self, "_aborting", False):
            return
        if not self._tempDataLen and self.offset >= len(self.dataBuffer):
            try:
                sent = self.socket.send(data)
            except OSError:
                # "Try again", or an error that doWrite meets again and
                # reports the usual way.
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        tcp.Connection.write(self, data)

    def write(self, data):
        data = _as_bytes(data)
        if data:
            self._raw_write(data)

    def writeSequence(self, iovec):
        self.write(b"".join(iovec))


_subclasses = {}  # (mixin, TCP transport class) -> their subclass


def _subclass(mixin, cls):
    sub = _subclasses.get((mixin, cls))
    if sub is None:
        sub = _subclasses[mixin, cls] = type(f"{mixin.__name__.strip('_')}{cls.__name__}",
                                             (mixin, cls), {})
    return sub


def _plain_tcp(transport):
    """Whether C{transport} is a TCP connection this module has not changed yet."""
    return isinstance(transport, tcp.Connection) and hasattr(transport, "socket") \
        and not isinstance(transport, _WriteThrough)


def write_through(transport):
    """
    Make C{transport}, a plain TCP connection, send what it is given at once
    (see the module docstring).  Anything else is left as it is.

    @return: whether the transport sends at once now.
    """
    if isinstance(transport, _WriteThrough):
        return True
    if not _plain_tcp(transport):
        return False
    transport.__class__ = _subclass(_WriteThrough, type(transport))
    return True


@implementer(interfaces.ISSLTransport)
class _TLS(_WriteThrough):
    """
    Mixin for C{tcp.Connection}: TLS over a pyOpenSSL connection with memory
    BIOs, driven by the TCP connection itself.  Plaintext written before the
    handshake ends is kept and sent once it has.
    """

    _tls_reason = None
    _tls_handshaking = False
    _tls_closed = False
    _tls_batching = False
    _tls_session_kept = False
    _tls_half = False  # server: may answer a resumed ClientHello with 0.5-RTT data
    _tls_half_open = False  # ... and is in that window now (until the client's Finished)
    tls_alpn_offer = ()  # server: the ALPN names the ClientHello offered

    def _tls_start(self, connection, app):
        self._tls = connection
        self._tls_handshaking = True
        self._tls_early = []  # plaintext written during the handshake
        self._tls_reason = None  # why the connection failed (verification, alert)
        self._tls_lose = False  # loseConnection() asked for during the handshake
        self._tls_closed = False  # our close_notify is out: no more writes
        self.protocol = app

    # -- what TLSMemoryBIOProtocol offers to protocols and to Twisted's TLS options

    def getPeerCertificate(self):
        return self._tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self):
        try:
            return self._tls.get_alpn_proto_negotiated() or None
        except (NotImplementedError, SSL.Error):  # pragma: no cover - old OpenSSL
            return None

    def failVerification(self, reason):
        """Called by Twisted's client TLS options when the peer's identity is wrong."""
        self._tls_reason = reason
        self.abortConnection()

    # -- reading ----------------------------------------------------------------

    def doRead(self):
        try:
            raw = self.socket.recv(self.bufferSize)
        except OSError as e:
            return None if e.errno in _AGAIN else main.CONNECTION_LOST
        if not raw:
            # TCP closed without close_notify (browsers and curl do this).
            return main.CONNECTION_LOST if self._tls_handshaking else main.CONNECTION_DONE
        self._tls.bio_write(raw)
        return self._tls_process()

    def _tls_process(self):
        # What the protocol writes while it handles this read (an answer,
        # the handshake's last flight and the first data...) leaves in one
        # send() at the end: one segment, one wake-up of the peer.
        self._tls_batching = True
        try:
            return self._tls_process_batched()
        finally:
            self._tls_batching = False
            self._tls_flush()

    def _tls_out(self):
        if not self._tls_batching:
            self._tls_flush()

    def _tls_process_batched(self):
        tls = self._tls
        if self._tls_handshaking:
            if not self._tls_handshake():
                return main.CONNECTION_LOST
            if self._tls_handshaking or self.disconnected or self._tls_reason is not None:
                return None
        chunks = []
        done = False
        error = None
        while True:
            try:
                chunks.append(tls.recv(_RECORD))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the peer's close_notify
                done = True
                break
            except SSL.Error as e:
                error = e
                break
        if chunks and not self.disconnecting:
            if not self._tls_session_kept and self.factory.sessions is not None:
                # The server's session tickets came before its first data.
                self._tls_session_kept = True
                self.factory.sessions.session = tls.get_session()
            self.protocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if error is not None:
            self._tls_reason = self._tls_reason or Failure(error)
            return main.CONNECTION_LOST
        if done:
            self._tls_shutdown()
            return main.CONNECTION_DONE
        return None

    def _tls_handshake(self):
        """
        Drive the handshake one step.

        @return: False when it failed (the reason is kept for
            connectionLost), else True.
        """
        if self._tls_half:
            return self._tls_half_step()
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._tls_out()
            return True
        except SSL.Error as e:
            self._tls_flush()  # the alert telling the peer why
            if self._tls_reason is None:
                self._tls_reason = Failure(e)
            return False
        self._tls_handshaking = False
        self._tls_half_open = False
        if self._tls_reason is not None or self.disconnected:
            return True
        listener = interfaces.IHandshakeListener(self.protocol, None)
        if listener is not None:
            listener.handshakeCompleted()
        early, self._tls_early = self._tls_early, []
        if early:
            self._tls_send(b"".join(early))
        if self._tls_lose:
            self.loseConnection()
        self._tls_out()
        return True

    def _tls_half_step(self):
        """
        Server, first step: process the ClientHello through
        C{SSL_read_early_data} (which accepts no early data: the context
        allows none), so that the server may write before the client's
        Finished.  That window is opened to the protocol (C{tlsResumed})
        only when the ClientHello resumed a session: its PSK binder proves
        the client's key, and the session holds the client's certificate.
        After a full handshake the client is unauthenticated until its
        Finished, and nothing is written early.
        """
        self._tls_half = False
        ssl = self._tls._ssl
        buf = _ffi.new("char[]", 1)
        got = _ffi.new("size_t *")
        result = _lib.SSL_read_early_data(ssl, buf, 1, got)
        if result == _READ_EARLY_DATA_ERROR:
            if _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ:
                self._tls_half = True  # the ClientHello is not all here yet
                self._tls_out()
                return True
            return self._tls_handshake()  # meets the error and reports it the usual way
        if result != _READ_EARLY_DATA_FINISH:
            self._tls_reason = Failure(SSL.Error("early data offered, none accepted"))
            return False
        if _lib.SSL_session_reused(ssl):
            hook = getattr(self.protocol, "tlsResumed", None)
            if hook is not None:
                self._tls_half_open = True
                hook(self.tls_alpn_offer)
        self._tls_out()
        return True

    def _tls_write_half(self, data):
        """0.5-RTT data: written before the client's Finished."""
        written = _ffi.new("size_t *")
        view = memoryview(data)
        while view:
            if not _lib.SSL_write_early_data(self._tls._ssl, _ffi.from_buffer(view), len(view),
                                             written):
                self._tls_early.append(bytes(view))  # sent after the handshake instead
                break
            view = view[written[0]:]
        self._tls_out()

    # -- writing ----------------------------------------------------------------

    def _tls_flush(self):
        """Send the ciphertext waiting in the memory BIO."""
        chunks = []
        while True:
            try:
                chunk = self._tls.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _BIO_CHUNK:
                break
        if chunks:
            self._raw_write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _tls_send(self, data):
        view = memoryview(data)
        try:
            while view:
                view = view[self._tls.send(view):]
        except SSL.Error as e:
            self._tls_reason = self._tls_reason or Failure(e)
            self.abortConnection()
            return
        self._tls_out()

    def write(self, data):
        data = _as_bytes(data)
        if not data or not self.connected or self._tls_closed or self._writeDisconnected:
            return
        if self._tls_handshaking:
            if self._tls_half_open and not self._tls_early:
                return self._tls_write_half(data)
            self._tls_early.append(data)
            if self.producer is not None and self.streamingProducer and \
                    sum(map(len, self._tls_early)) > self.bufferSize:
                self.producerPaused = True
                self.producer.pauseProducing()
            return
        self._tls_send(data)

    # -- closing ----------------------------------------------------------------

    def _tls_shutdown(self):
        if not self._tls_closed:
            self._tls_closed = True
            try:
                self._tls.shutdown()
            except SSL.Error:
                pass
            self._tls_flush()

    def loseConnection(self):
        if not self.connected or self.disconnecting:
            return
        if self._tls_handshaking:
            self._tls_lose = True
            return
        self._tls_shutdown()
        tcp.Connection.loseConnection(self)

    def loseWriteConnection(self):
        self._tls_shutdown()
        tcp.Connection.loseWriteConnection(self)

    def connectionLost(self, reason):
        if self._tls_reason is not None:
            reason = self._tls_reason
        tcp.Connection.connectionLost(self, reason)


class _Starter:
    """
    The protocol the TCP transport is first given: on L{makeConnection} it
    turns the transport into a TLS one and hands it to the application
    protocol.
    """

    def __init__(self, factory, app):
        self.factory = factory
        self.app = app

    def makeConnection(self, transport):
        if not _plain_tcp(transport):
            # Not a plain TCP connection: Twisted's TLS wrapper.
            proto = TLSMemoryBIOProtocol(self.factory, self.app)
            if getattr(transport, "protocol", None) is self:
                transport.protocol = proto
            proto.makeConnection(transport)
            self.app = proto
            return
        transport.__class__ = _subclass(_TLS, type(transport))
        # Twisted's connection creators read the TLS factory (ALPN) off the
        # object they are given.
        transport.factory = self.factory
        connection = self.factory._creatorCallable(transport)
        sessions = self.factory.sessions
        if sessions is not None and sessions.session is not None:
            connection.set_session(sessions.session)
            if self.factory.alpn:
                connection.set_alpn_protos(self.factory.alpn)
        transport._tls_start(connection, self.app)
        transport._tls_half = self.factory.half_rtt
        self.app.makeConnection(transport)
        if transport._tls_handshaking and transport.connected and self.factory.is_client:
            # A client speaks first: the ClientHello.
            if not transport._tls_handshake():
                transport.abortConnection()

    # When a wrapper (an endpoint's) keeps us as the transport's protocol,
    # pass events on.
    def dataReceived(self, data):
        self.app.dataReceived(data)

    def connectionLost(self, reason):
        self.app.connectionLost(reason)

    def __getattr__(self, name):
        return getattr(self.app, name)


class TLSFactory(TLSMemoryBIOFactory):
    """
    Like C{TLSMemoryBIOFactory} (same arguments: the TLS options, whether
    this is the client side, the wrapped factory), with the lean data path.
    """

    noisy = False

    def __init__(self, options, is_client, wrapped, clock=None, sessions=None, alpn=None,
                 half_rtt=False):
        super().__init__(options, is_client, wrapped, clock)
        self.is_client = is_client
        self.sessions = sessions if is_client else None
        self.alpn = alpn if is_client else None  # offered when resuming a session
        self.half_rtt = half_rtt and not is_client
        if self.half_rtt:
            _record_alpn_offers(options.getContext())

    def buildProtocol(self, addr):
        app = self.wrappedFactory.buildProtocol(addr)
        if app is None:
            return None
        return _Starter(self, app)


def _record_alpn_offers(context):
    """
    Keep, on the transport, the ALPN names each ClientHello offers (for
    C{tlsResumed}), and select the first one offered: the server accepts
    whatever its client names (the protocol decides what it means).
    """
    if getattr(context, "_p2pnat_alpn", False):
        return

    def select(connection, offered):
        transport = connection.get_app_data()
        if isinstance(transport, _TLS):
            transport.tls_alpn_offer = tuple(offered)
        return offered[0] if offered else SSL.NO_OVERLAPPING_PROTOCOLS

    context.set_alpn_select_callback(select)
    context._p2pnat_alpn = True


class SessionCache:
    """
    The last TLS session a client got from its server, offered again on the
    next connection (TLS 1.3 resumption with a session ticket: no
    certificates sent, signed or checked again, about half the handshake's
    CPU on both sides).  The server must issue tickets
    (C{CertificateOptions(enableSessionTickets=True)}); what it checks after
    the handshake (the peer certificate, kept in the ticket) is unchanged.
    """

    session = None


def wrap_client(options, endpoint, sessions=None, alpn=None):
    """
    Like C{endpoints.wrapClientTLS}, with the lean data path; with a
    L{SessionCache}, connections resume the last session, and then offer
    the ALPN names C{alpn}.
    """
    return _ClientEndpoint(options, endpoint, sessions, alpn)


@implementer(interfaces.IStreamClientEndpoint)
class _ClientEndpoint:
    def __init__(self, options, endpoint, sessions=None, alpn=None):
        self.options = options
        self.endpoint = endpoint
        self.sessions = sessions
        self.alpn = alpn

    def connect(self, factory):
        tls_factory = TLSFactory(self.options, True, factory, sessions=self.sessions,
                                 alpn=self.alpn)
        return self.endpoint.connect(tls_factory).addCallback(
            lambda proto: proto.app if isinstance(proto, _Starter) else proto)
