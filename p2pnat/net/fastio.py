# -*- test-case-name: tests.unit.test_fastio -*-
"""
A leaner data path for Twisted TCP and TLS connections on the relay and the
agent, where every request crosses two proxies.  It is optional: the
daemons' ``tls.fast_path`` setting turns it off, and it turns itself off
(one log line at start-up, then Twisted's stock TLS and transports) when
this Twisted or pyOpenSSL lacks what it relies on (L{supported}).

Twisted's stock path costs more CPU per proxied request and hop
(``bench/http_load.py``, ``bench/README.rst``), for two reasons this module
removes:

- C{FileDescriptor.write} only buffers: the bytes leave on the reactor's
  next turn, after an C{epoll_ctl} to watch for writability and another to
  stop.  L{write_through} sends at once when nothing is queued, and queues
  only what the kernel did not take (so back-pressure, producers and
  C{loseConnection} behave as before).
- C{TLSMemoryBIOProtocol} wraps the TCP transport in a protocol/transport
  pair of its own, and each read or write crosses both layers (and, since
  Twisted 22.8, small writes wait for the next reactor turn).
  L{TLSFactory} runs the same pyOpenSSL connection (same memory BIOs, made
  by the same TLS options, so the same certificate checks and ALPN)
  directly on the TCP transport: one C{recv} per read, all its records
  decrypted and delivered as one C{dataReceived}, every C{write} encrypted
  and sent at once.

Two TLS 1.3 features ride on it: session resumption for clients
(L{SessionCache}), and for servers (C{half_rtt}) a window between a
resumed ClientHello and the client's Finished in which the protocol may
already write (0.5-RTT data; see L{_EarlyData}).  The second needs OpenSSL
functions that neither pyOpenSSL nor cryptography offer as API
(L{early_data_supported}); without them the server simply waits for the
client's Finished.

Both work by giving the TCP transport (C{twisted.internet.tcp.Server} or
C{Client}) a subclass with these methods, as Twisted's own C{startTLS} once
did, and by reading a few of Twisted's private write-buffer attributes.  A
transport that is not a plain TCP connection (an in-memory test
transport, a UNIX socket...) gets Twisted's stock behaviour instead.
"""

import errno
import inspect
import socket
import types

from OpenSSL import SSL
from twisted.internet import endpoints, interfaces, main, tcp
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)
_BIO_CHUNK = 64 * 1024  # ciphertext read from the memory BIO per call
_RECORD = 32 * 1024  # plaintext asked of SSL_read per call (one record is <= 16 KiB)
# SSL_read_early_data's results (ssl.h).
_READ_EARLY_DATA_ERROR, _READ_EARLY_DATA_FINISH = 0, 2

_log = Logger(namespace="p2pnat.net.fastio")

#: The help of the daemons' ``tls.fast_path`` setting.
SETTING_HELP = ("the lean TCP/TLS data path (p2pnat.net.fastio: TLS session resumption and"
                " 0.5-RTT tunnels); false: Twisted's stock TLS and transports")


# -- what the fast path relies on, checked once per process ----------------------

#: Attributes of a live C{tcp.Connection} that L{_WriteThrough} and L{_TLS}
#: read or set, with the kinds they must have.  The first five are
#: Twisted's private write-buffer state: C{_raw_write} sends at once only
#: when they say nothing is queued.
_TCP_STATE = {
    "_tempDataLen": int,
    "dataBuffer": bytes,
    "offset": int,
    "_writeDisconnected": (bool, int),
    "_aborting": (bool, int),
    "bufferSize": int,
    "connected": (bool, int),
    "disconnecting": (bool, int),
    "disconnected": (bool, int),
    "streamingProducer": (bool, int),
    "producerPaused": (bool, int),
}
#: Methods of C{tcp.Connection} that the subclasses override or call.
#: C{doRead} is what the reactor calls when the socket is readable: if
#: Twisted stopped calling it, the TLS subclass would never see a byte.
_TCP_METHODS = ("doRead", "write", "writeSequence", "loseConnection", "loseWriteConnection",
                "connectionLost", "abortConnection", "setTcpNoDelay")
#: pyOpenSSL connection methods the TLS subclass drives (all public API).
_SSL_METHODS = ("bio_read", "bio_write", "recv", "send", "do_handshake", "shutdown",
                "get_session", "set_session", "set_alpn_protos", "get_alpn_proto_negotiated",
                "get_peer_certificate", "set_app_data", "get_app_data", "set_connect_state",
                "set_accept_state")
#: OpenSSL functions for 0.5-RTT data that no public API offers.
_EARLY_FUNCTIONS = ("SSL_read_early_data", "SSL_write_early_data", "SSL_get_error",
                    "SSL_session_reused")


def _kind_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _probe_connection():
    """
    A C{tcp.Connection} on one end of a socket pair, never given to the
    reactor: what the reactor's TCP transports look like in this Twisted.
    The caller closes C{probe.socket}.
    """
    a, b = socket.socketpair()
    b.close()
    return tcp.Connection(a, None, reactor=object())


def _check_tcp(probe):
    """
    Why C{probe} (a C{tcp.Connection}) cannot take the fast path, or None.
    Attributes are read without running properties or C{__getattr__}
    (L{inspect.getattr_static}): a buffer count that became a computed
    property would no longer be something this module may read and reset.
    """
    cls = type(probe)
    for name, kind in _TCP_STATE.items():
        value = inspect.getattr_static(probe, name, _MISSING)
        if value is _MISSING:
            return f"{cls.__module__}.{cls.__qualname__} has no {name}"
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            return (f"{cls.__module__}.{cls.__qualname__}.{name} is a"
                    f" {type(value).__name__}, not {_kind_name(kind)}")
    for name in _TCP_METHODS:
        if not isinstance(inspect.getattr_static(probe, name, None), types.FunctionType):
            return f"{cls.__module__}.{cls.__qualname__}.{name} is not a method"
    for sub in (tcp.Server, tcp.Client):
        if not issubclass(sub, tcp.Connection):
            return f"tcp.{sub.__name__} is not a tcp.Connection"
    try:
        probe.__class__ = _subclass(_WriteThrough, cls)
    except TypeError as e:
        return f"a {cls.__qualname__} cannot be given a subclass: {e}"
    finally:
        probe.__class__ = cls
    return None


def _check_ssl(connection):
    """Why a pyOpenSSL connection lacks what the TLS subclass drives, or None."""
    for name in _SSL_METHODS:
        if not callable(getattr(connection, name, None)):
            return f"pyOpenSSL's Connection has no {name}"
    for name in ("WantReadError", "ZeroReturnError", "Error", "NO_OVERLAPPING_PROTOCOLS"):
        if not hasattr(SSL, name):
            return f"pyOpenSSL has no SSL.{name}"
    if not callable(getattr(SSL.Context, "set_alpn_select_callback", None)):
        return "pyOpenSSL's Context has no set_alpn_select_callback"
    return None


_MISSING = object()
_verdicts = {}  # "fast" / "early" -> the reason it is unavailable, or None


def supported():
    """
    Whether this process's Twisted and pyOpenSSL have everything the fast
    data path relies on, each with the expected kind (checked once, on a
    probe connection: see L{_TCP_STATE}, L{_TCP_METHODS}, L{_SSL_METHODS}).

    @return: None when they do, else a one-line reason naming what is
        missing.
    """
    if "fast" not in _verdicts:
        _verdicts["fast"] = _check_fast()
    return _verdicts["fast"]


def _check_fast():
    probe = _probe_connection()
    try:
        reason = _check_tcp(probe)
    finally:
        probe.socket.close()
    if reason is None:
        reason = _check_ssl(SSL.Connection(SSL.Context(SSL.TLS_METHOD), None))
    return reason


def early_data_supported():
    """
    Whether servers can answer a resumed ClientHello with 0.5-RTT data
    (the fast path, plus L{_EARLY_FUNCTIONS} in cryptography's OpenSSL
    bindings, callable on a pyOpenSSL connection).

    @return: None when they can, else a one-line reason.
    """
    if "early" not in _verdicts:
        _verdicts["early"] = supported() or _EarlyData.check()
    return _verdicts["early"]


class _Policy:
    """The process's choice (``tls.fast_path``), and what was already logged."""

    wanted = True
    told = frozenset()


def configure(fast_path):
    """
    Set whether this process uses the fast path (the daemons'
    ``tls.fast_path``) and log, once, the one line saying why it or 0.5-RTT
    data is off when it is.  Factories and L{write_through} follow the
    choice from then on; connections already made keep their path.

    @return: whether the fast path is on.
    """
    _Policy.wanted = bool(fast_path)
    return active()


def active():
    """Whether new connections take the fast path (wanted and L{supported})."""
    if not _Policy.wanted:
        _tell("off", "TLS fast path off (tls.fast_path = false): Twisted's stock TLS and"
              " transports")
        return False
    return _available(supported(), "unsupported", "TLS fast path unavailable ({reason}):"
                      " using Twisted's stock TLS and transports")


def half_rtt_active():
    """Whether servers asking for C{half_rtt} get it (L{active}, and the OpenSSL functions)."""
    return active() and _available(
        early_data_supported(), "early", "TLS 0.5-RTT data unavailable ({reason}): resumed"
        " tunnels are bound after the device's hello")


def _available(reason, key, fmt):
    """
    Whether a feature is available: C{reason} (why not) is None.  If not,
    log C{fmt} with the reason, once per process (under C{key}).
    """
    if reason is None:
        return True
    _tell(key, fmt, reason=reason)
    return False


def _tell(key, fmt, **kw):
    if key not in _Policy.told:
        _Policy.told |= {key}
        if key == "off":
            _log.info(fmt, **kw)
        else:
            _log.warn(fmt, **kw)


def _reset():
    """Forget the verdicts and what was logged (for tests that change the libraries)."""
    _verdicts.clear()
    _Policy.told = frozenset()
    _Policy.wanted = True


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
    (see the module docstring), if the fast path is L{active}.  Anything
    else is left as it is.

    @return: whether the transport sends at once now.
    """
    if isinstance(transport, _WriteThrough):
        return True
    if not _plain_tcp(transport) or not active():
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
        L{_EarlyData.read_hello}, so that the server may write before the
        client's Finished.  That window is opened to the protocol
        (C{tlsResumed}) only when the ClientHello resumed a session: its PSK
        binder proves the client's key, and the session holds the client's
        certificate.  After a full handshake the client is unauthenticated
        until its Finished, and nothing is written early.
        """
        self._tls_half = False
        outcome = _EarlyData.read_hello(self._tls)
        if outcome == "again":
            self._tls_half = True  # the ClientHello is not all here yet
            self._tls_out()
            return True
        if outcome == "error":
            return self._tls_handshake()  # meets the error and reports it the usual way
        if outcome == "offered":
            self._tls_reason = Failure(SSL.Error("early data offered, none accepted"))
            return False
        if outcome == "resumed":
            hook = getattr(self.protocol, "tlsResumed", None)
            if hook is not None:
                self._tls_half_open = True
                hook(self.tls_alpn_offer)
        self._tls_out()
        return True

    def _tls_write_half(self, data):
        """0.5-RTT data: written before the client's Finished."""
        rest = _EarlyData.write(self._tls, data)
        if rest:
            self._tls_early.append(rest)  # sent after the handshake instead
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


class _EarlyData:
    """
    The OpenSSL calls behind 0.5-RTT data, which neither pyOpenSSL nor
    cryptography offer as API: C{SSL_read_early_data} (to let a server
    write after the ClientHello), C{SSL_write_early_data} and
    C{SSL_session_reused}.  They are called through cryptography's
    documented OpenSSL bindings (C{Binding().lib}), which carry them only
    on some builds, on pyOpenSSL's private C{Connection._ssl} pointer.
    L{check} says whether both are there; nothing else in this module
    touches them.
    """

    @staticmethod
    def _binding():
        from cryptography.hazmat.bindings.openssl.binding import Binding

        return Binding.ffi, Binding.lib

    @classmethod
    def check(cls):
        """Why 0.5-RTT data cannot be used here, or None."""
        try:
            ffi, lib = cls._binding()
        except (ImportError, AttributeError) as e:
            return f"no OpenSSL bindings in cryptography ({e})"
        for name in _EARLY_FUNCTIONS + ("SSL_ERROR_WANT_READ",):
            if not hasattr(lib, name):
                return f"cryptography's OpenSSL bindings have no {name}"
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        ssl = getattr(connection, "_ssl", None)
        if ssl is None:
            return "pyOpenSSL's Connection has no _ssl"
        try:
            lib.SSL_session_reused(ssl)
            ffi.new("size_t *")
        except (TypeError, AttributeError) as e:
            return f"pyOpenSSL's connection does not fit cryptography's bindings ({e})"
        return None

    @classmethod
    def read_hello(cls, connection):
        """
        Take the ClientHello in through C{SSL_read_early_data} (the context
        accepts no early data, so none is read).

        @return: ``"again"`` (more of the ClientHello is needed),
            ``"error"``, ``"offered"`` (the client sent early data anyway),
            ``"resumed"`` (a session was resumed: the server may write) or
            ``"full"`` (a full handshake: it may not).
        """
        ffi, lib = cls._binding()
        ssl = connection._ssl
        buf = ffi.new("char[]", 1)
        got = ffi.new("size_t *")
        result = lib.SSL_read_early_data(ssl, buf, 1, got)
        if result == _READ_EARLY_DATA_ERROR:
            if lib.SSL_get_error(ssl, result) == lib.SSL_ERROR_WANT_READ:
                return "again"
            return "error"
        if result != _READ_EARLY_DATA_FINISH:
            return "offered"
        return "resumed" if lib.SSL_session_reused(ssl) else "full"

    @classmethod
    def write(cls, connection, data):
        """Write C{data} as 0.5-RTT data; return what OpenSSL would not take."""
        ffi, lib = cls._binding()
        written = ffi.new("size_t *")
        view = memoryview(data)
        while view:
            if not lib.SSL_write_early_data(connection._ssl, ffi.from_buffer(view), len(view),
                                            written):
                return bytes(view)
            view = view[written[0]:]
        return b""

    @classmethod
    def resumed(cls, connection):
        """Whether C{connection}'s handshake resumed a session (for tests and logs)."""
        lib = cls._binding()[1]
        return bool(lib.SSL_session_reused(connection._ssl))


def _tls_connection(options, is_client, transport):
    """
    The pyOpenSSL connection for C{transport}, made by the TLS options
    through Twisted's public connection-creator interfaces, exactly as
    C{TLSMemoryBIOFactory} makes it for its own protocol (which the options
    may call back: C{failVerification}, C{factory.wrappedFactory} for ALPN).
    """
    if is_client and interfaces.IOpenSSLClientConnectionCreator.providedBy(options):
        connection = options.clientConnectionForTLS(transport)
    elif not is_client and interfaces.IOpenSSLServerConnectionCreator.providedBy(options):
        connection = options.serverConnectionForTLS(transport)
    else:
        connection = SSL.Connection(options.getContext(), None)
    if is_client:
        connection.set_connect_state()
    else:
        connection.set_accept_state()
    connection.set_app_data(transport)
    return connection


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
        connection = _tls_connection(self.factory.options, self.factory.is_client, transport)
        sessions = self.factory.sessions
        if sessions is not None and sessions.session is not None:
            try:
                connection.set_session(sessions.session)
            except ValueError:
                # pyOpenSSL refuses a session made under another context
                # (the TLS options were made again): a full handshake.
                sessions.session = None
            else:
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
    this is the client side, the wrapped factory), with the lean data path
    when it is L{active} (decided when the factory is made); otherwise it
    is Twisted's own factory, and C{sessions}, C{alpn} and C{half_rtt} do
    nothing.
    """

    noisy = False

    def __init__(self, options, is_client, wrapped, clock=None, sessions=None, alpn=None,
                 half_rtt=False):
        super().__init__(options, is_client, wrapped, clock)
        self.fast = active()
        self.options = options
        self.is_client = is_client
        self.sessions = sessions if is_client and self.fast else None
        self.alpn = alpn if is_client else None  # offered when resuming a session
        half_rtt = half_rtt and not is_client and self.fast
        if half_rtt:
            # Also without 0.5-RTT data: clients that resume offer ALPN
            # names, and Twisted's own selection callback fails the
            # handshake (an internal error alert) when none of them is one
            # the options accept.
            _record_alpn_offers(options.getContext())
        self.half_rtt = half_rtt and half_rtt_active()

    def buildProtocol(self, addr):
        if not self.fast:
            return super().buildProtocol(addr)
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
    Only the fast path resumes sessions.
    """

    session = None


class SessionCaches:
    """
    One L{SessionCache} per server (a tunnel host and port), the
    C{limit} most recently used: a client that reaches several servers
    (the nodes of a relay cluster) resumes with each its own session,
    instead of offering one server's ticket to another.
    """

    def __init__(self, limit=16):
        self.limit = limit
        self._caches = {}

    def __len__(self):
        return len(self._caches)

    def for_server(self, host, port):
        """The L{SessionCache} of the server at C{host}:C{port}."""
        key = (host.lower(), port)
        cache = self._caches.pop(key, None) or SessionCache()
        self._caches[key] = cache  # the most recently used last
        while len(self._caches) > self.limit:
            del self._caches[next(iter(self._caches))]
        return cache


def wrap_client(options, endpoint, sessions=None, alpn=None):
    """
    Like C{endpoints.wrapClientTLS}, with the lean data path when it is
    L{active}; with a L{SessionCache}, connections resume the last session,
    and then offer the ALPN names C{alpn}.  Otherwise it is
    C{endpoints.wrapClientTLS} itself.
    """
    if not active():
        return endpoints.wrapClientTLS(options, endpoint)
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
            lambda proto: proto.app if isinstance(proto, _Starter) else
            proto.wrappedProtocol if isinstance(proto, TLSMemoryBIOProtocol) else proto)
