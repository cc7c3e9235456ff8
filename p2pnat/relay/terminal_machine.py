# -*- test-case-name: tests.unit.test_relay_machines,tests.unit.test_relay_terminal -*-
"""
The rules of one terminal connection, as a state machine with no transport
(L{p2pnat.relay.terminal.Terminal} drives it).

States::

    head ──► body ──► auth ──► waiting ──► stream ──► done
      │        │        ▲          ▲  │        │
      │        └────────┘          │  └─ retry ┘   (and from any state,
      └────────────────────────────┘               reply / loss ──► done)

- ``head``: reading the first request head (bounded by the head timeout);
- ``body``: reading a login form;
- ``auth``: a credential is being checked (off the reactor thread);
- ``waiting``: for the device's tunnel; what the terminal sends meanwhile
  is kept (up to L{MAX_PENDING}, then reading pauses);
- ``stream``: the connection's bytes go to the tunnel as they are;
- ``done``: answered, or closed.

The routing decision (which page, which device) is plain logic on the
parsed L{Request}; it ends by giving the machine one decision input
(C{reply}, C{read_login}, C{authorize} or C{open}).
"""

import base64
import html
from typing import Protocol
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import succeed
from twisted.python.failure import Failure

from p2pnat.daemon.logs import Logger
from p2pnat.protocol import wire
from p2pnat.protocol.tunnel import MAX_CONTROL
from p2pnat.relay.devices import REVOKED, Refusal
from p2pnat.relay.http import (
    COOKIE,
    LOGIN_PATH,
    MAX_HEAD,
    MAX_LOGIN_BODY,
    MAX_PENDING,
    BadRequest,
    page,
    parse_head,
)
from p2pnat.relay.limits import TooManyStreams
from p2pnat.relay.machine import MachineBuilder
from p2pnat.relay.sessions import DeviceRevoked, SessionTimeout, TooBusy

#: Seconds a terminal told "relay busy" (503) is asked to wait.
RETRY_AFTER = 5


def valid_service(name):
    """
    Whether C{name} can be a device's service name: printable ASCII
    without spaces, short enough for the OPEN frame that carries it.
    """
    return len(name) <= MAX_CONTROL and name.isascii() and name.isprintable() \
        and " " not in name


class TerminalInputs(Protocol):
    """What can happen to a terminal connection."""

    def data(self, data: bytes) -> None:
        "Bytes from the terminal (in ``stream``, only until the direct path is set)."

    def head_late(self) -> None:
        "The head timeout passed."

    def reply(self, status: int, title: str, message: str, extra_headers: tuple = (),
              body_extra: str = "") -> None:
        "Answer from the relay itself and close."

    def read_login(self, length: int) -> None:
        "A login form of C{length} bytes follows the head."

    def login(self, given: str, next_path: str) -> None:
        "The login form is read: check C{given}."

    def authorize(self) -> None:
        "Check the credential the request head carries."

    def authorized(self, ok: bool) -> None:
        "The head's credential check ended."

    def login_checked(self, ok: bool, next_path: str) -> None:
        "The login form's credential check ended."

    def check_failed(self, failure: object) -> None:
        "A credential check failed with an error."

    def open(self) -> None:
        "Ask the relay for a tunnel to the device."

    def tunnel_ready(self, tunnel: object, reused: bool) -> None:
        "The relay's tunnel for this terminal."

    def tunnel_failed(self, failure: object) -> None:
        "No tunnel: the device did not answer, was revoked, or the relay is full."

    def tunnel_ended(self) -> None:
        "The device finished the stream."

    def tunnel_lost(self, abort: bool) -> None:
        "The tunnel died under the stream (C{abort}: the device was revoked)."

    def retry(self, pending: bytes) -> None:
        "The reused tunnel was dead: send C{pending} again on a new one."

    def connection_lost(self) -> None:
        "The terminal's connection is gone."

    def state(self) -> str:
        "The current state's name."


class TerminalCore:
    """
    What a terminal connection knows, and the logic its outputs run.

    @param relay: the L{p2pnat.relay.core.IRelay}.
    @param io: the connection: C{write}, C{close_connection} (after what was
        written), C{abort_connection}, C{pause_reading}, C{resume_reading},
        C{peer()} and C{stream_to(send)} (bytes read go straight to
        C{send}, or to the machine when None).
    @param secure: whether the terminal came over TLS.
    """

    log = Logger(namespace="p2pnat.relay.terminal")

    def __init__(self, relay, io, secure):
        self.relay = relay
        self.io = io
        self.secure = secure
        self.buf = bytearray()
        self.request = None
        self.device_id = None
        self.service = ""
        self.tcp = False
        self.body_length = 0
        self.tunnel = None
        self.pending = None  # the relay's TunnelRequest while waiting
        self.answered = False  # "200 Connection established" sent (CONNECT)
        # A connection that sends nothing gets the short first-byte timeout;
        # one that does has the head timeout in all, from its start (a slow
        # head cannot hold a descriptor longer).
        timeouts = relay.timeouts
        self.started = relay.clock.seconds()
        self.heard = False
        self.head_timer = relay.clock.callLater(min(timeouts.first_byte, timeouts.head),
                                                self._head_late)
        self.machine = None

    def _head_late(self):
        self.head_timer = None
        self.machine.head_late()

    def first_bytes(self):
        """The terminal sent its first bytes: it now has the whole head timeout."""
        self.heard = True
        if self.head_timer is not None and self.head_timer.active():
            left = self.started + self.relay.timeouts.head - self.relay.clock.seconds()
            self.head_timer.reset(max(0.0, left))

    def cancel_head_timer(self):
        if self.head_timer is not None and self.head_timer.active():
            self.head_timer.cancel()
        self.head_timer = None

    # -- routing --------------------------------------------------------------

    def route(self, m):
        """Decide what the parsed head asks for; give C{m} the decision."""
        req = self.request
        relay_host = self.relay.hostname
        if req.method == "CONNECT":
            device_id, _, service = req.target.partition(":")
            if not valid_service(service):
                return m.reply(400, "Bad request", "That is not a service name.")
            return self._device(m, device_id, service, tcp=True)
        host = req.host
        if host.endswith("." + relay_host):
            return self._device(m, host[:-len(relay_host) - 1], "", tcp=False)
        if host != relay_host:
            return m.reply(421, "Unknown host",
                           f"This relay serves {relay_host} and its devices only.")
        url = urlsplit(req.target)
        if url.path == "/connect":
            ids = parse_qs(url.query).get("ID") or parse_qs(url.query).get("id") or [""]
            return self._connect_redirect(m, ids[0])
        if url.path == "/":
            return m.reply(200, "p2pnat relay",
                           "Open a device at https://DEVICE." + relay_host + "/ or "
                           "/connect?ID=DEVICE.")
        return m.reply(404, "Not found", "No such page on the relay.")

    def _reachable(self, m, device_id):
        """
        The device if a terminal may reach it now; otherwise answer at once
        (not a device ID, unknown, revoked, stale) and return None.
        """
        self.device_id = device_id
        if not wire.valid_key_id(device_id):
            m.reply(404, "Device unavailable", "That is not a device ID.")
            return None
        found = self.relay.reachable(device_id)
        if isinstance(found, Refusal):
            self.refuse(m, found)
            return None
        return found

    def refuse(self, m, refusal):
        self.log.info("terminal {peer} refused for {device_id}: {reason}", peer=self.io.peer(),
                      device_id=self.device_id, reason=refusal.reason)
        m.reply(refusal.status, "Device unavailable", refusal.message)

    def _connect_redirect(self, m, device_id):
        """The seed's flow: /connect?ID=DEVICE, answered by a redirect."""
        if self._reachable(m, device_id) is None:
            return
        location = self.relay.device_url(device_id, self.secure)
        m.reply(302, "Redirecting", f"Go to {location}", (f"Location: {location}",))

    def _device(self, m, device_id, service, tcp):
        found = self._reachable(m, device_id)
        if found is None:
            return
        self.service = service
        self.tcp = tcp
        if found.access_mode != "relay":
            return m.open()
        if not tcp and urlsplit(self.request.target).path == LOGIN_PATH:
            return self._login_start(m)
        m.authorize()

    # -- access credential (devices whose access mode is "relay") ---------------

    def credential_hash(self):
        record = self.relay.registry_record(self.device_id)
        return record.access_credential_hash if record is not None else None

    def authorization(self):
        """
        Whether the terminal proved it knows the device's credential: a
        login cookie, or the credential itself in an Authorization (or,
        for CONNECT, Proxy-Authorization) header, Basic or Bearer.

        @return: Deferred firing with a bool (checking a credential is slow
            on purpose and runs off the reactor thread).
        """
        req = self.request
        cred_hash = self.credential_hash()
        if not cred_hash:
            return succeed(False)
        if self.relay.tokens.check(req.cookie(COOKIE), self.device_id, cred_hash):
            return succeed(True)
        auth = req.headers.get("authorization") or req.headers.get("proxy-authorization") or ""
        scheme, _, value = auth.partition(" ")
        given = None
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = None
        elif scheme.lower() == "bearer":
            given = value.strip()
        if not given:
            return succeed(False)
        return self.relay.check_credential(self.device_id, given).addCallback(self._warn_wrong)

    def _warn_wrong(self, ok):
        if not ok:
            self.log.warn("terminal {peer}: wrong credential for {device_id}",
                          peer=self.io.peer(), device_id=self.device_id)
        return ok

    def login_form(self, m, status, error):
        target = urlsplit(self.request.target)
        nxt = target.path if target.path != LOGIN_PATH else "/"
        if target.query and target.path != LOGIN_PATH:
            nxt += "?" + target.query
        form = (f"<form method='post' action='{LOGIN_PATH}'>"
                f"<input type='hidden' name='next' value='{html.escape(nxt, quote=True)}'>"
                "<label>Access credential <input type='password' name='credential'"
                " autofocus></label> <button>Open</button></form>")
        if error:
            form = f"<p style='color:#b00'>{html.escape(error)}</p>" + form
        m.reply(status, f"{self.device_id}", "This device asks for its access credential.",
                ('WWW-Authenticate: Basic realm="p2pnat"',), form)

    def _login_start(self, m):
        if self.request.method != "POST":
            return self.login_form(m, 401, "")
        try:
            length = int(self.request.headers.get("content-length", "-1"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_LOGIN_BODY:
            return m.reply(413, "Bad login", "The login form is too large or has no length.")
        m.read_login(length)

    def login_body(self, m):
        """The login form, once all of it is here: check its credential."""
        if len(self.buf) < self.body_length:
            return
        form = parse_qs(bytes(self.buf[:self.body_length]).decode("utf-8", "replace"))
        given = (form.get("credential") or [""])[0]
        nxt = (form.get("next") or ["/"])[0]
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        if self.relay.device(self.device_id) is None:
            return m.reply(404, "Device unavailable", "No such device.")
        m.login(given, nxt)

    # -- the tunnel -------------------------------------------------------------

    def request_tunnel(self, m, reuse):
        refused = self.relay.terminal_opening(self.io, self.device_id)
        if refused is not None:
            return m.tunnel_failed(Failure(refused))
        self.pending = self.relay.request_tunnel(self.device_id, reuse=reuse)
        self.pending.ready.addCallbacks(lambda got: m.tunnel_ready(*got), m.tunnel_failed)

    def why_no_tunnel(self, m, failure):
        if failure.check(DeviceRevoked):
            return self.refuse(m, REVOKED)
        if failure.check(TooManyStreams):  # logged (rate-limited) by the relay
            return m.reply(503, "Too many connections",
                           "Your address holds as many connections to this device as one"
                           f" may. Try again in {RETRY_AFTER} seconds.",
                           (f"Retry-After: {RETRY_AFTER}",))
        if failure.check(TooBusy):
            self.log.warn("terminal {peer}: relay busy for {device_id}: {why}",
                          peer=self.io.peer(), device_id=self.device_id,
                          why=failure.getErrorMessage())
            return m.reply(503, "Relay busy",
                           "The relay has too many requests waiting for devices right now."
                           f" Try again in {RETRY_AFTER} seconds.",
                           (f"Retry-After: {RETRY_AFTER}",))
        if failure.check(SessionTimeout):
            self.log.info("terminal {peer}: no tunnel from {device_id}: {why}",
                          peer=self.io.peer(), device_id=self.device_id,
                          why=failure.getErrorMessage())
            return m.reply(504, "Device did not answer",
                           "The device did not connect back to the relay in time.")
        self.log.failure("terminal {peer}: tunnel failed", failure, peer=self.io.peer())
        m.reply(502, "Relay error", "The relay could not reach the device.")


def _unexpected(core, state, input):
    core.log.warn("terminal {peer}: {input} unexpected in state {state}; ignored",
                  peer=core.io.peer(), input=input, state=state)


I = TerminalInputs
_b = MachineBuilder(I, TerminalCore)
head = _b.state("head")
body = _b.state("body")
auth = _b.state("auth")
waiting = _b.state("waiting")
stream = _b.state("stream")
done = _b.state("done")


@_b.on(head, I.data)
def _read_head(m, c, data):
    if not c.heard:
        c.first_bytes()
    c.buf += data
    end = c.buf.find(b"\r\n\r\n")
    if end < 0:
        if len(c.buf) > MAX_HEAD:
            m.reply(431, "Request too large", "The request head is too large.")
        return
    if end + 4 > MAX_HEAD:
        return m.reply(431, "Request too large", "The request head is too large.")
    try:
        c.request = parse_head(bytes(c.buf[:end + 4]))
    except BadRequest as e:
        return m.reply(e.status, "Bad request", str(e))
    c.route(m)


@_b.on([head, body], I.head_late, to=done)
def _abort_slow(m, c):
    c.io.abort_connection()


@_b.on([head, body, auth, waiting], I.reply, to=done)
def _reply(m, c, status, title, message, extra_headers=(), body_extra=""):
    c.cancel_head_timer()
    c.relay.count(f"http-{status}")
    c.io.write(page(status, title, message, extra_headers, body_extra))
    c.io.close_connection()


@_b.on(head, I.read_login, to=body)
def _start_login(m, c, length):
    c.body_length = length
    c.buf = c.buf[c.request.head_size:]
    c.login_body(m)


@_b.on(body, I.data)
def _read_login(m, c, data):
    c.buf += data
    c.login_body(m)


@_b.on(body, I.login, to=auth)
def _check_login(m, c, given, next_path):
    d = c.relay.check_credential(c.device_id, given)
    d.addCallbacks(lambda ok: m.login_checked(ok, next_path), m.check_failed)


@_b.on(head, I.authorize, to=auth)
def _check_head(m, c):
    c.cancel_head_timer()
    c.authorization().addCallbacks(m.authorized, m.check_failed)


@_b.on(auth, I.authorized)
def _authorized(m, c, ok):
    if ok:
        return m.open()
    if c.tcp:
        return m.reply(401, "Credential required", "This device needs its access credential.",
                       ('WWW-Authenticate: Basic realm="p2pnat"',))
    c.login_form(m, 401, "")


@_b.on(auth, I.login_checked)
def _login_checked(m, c, ok, next_path):
    if not ok:
        c.log.warn("terminal {peer}: wrong credential for {device_id}", peer=c.io.peer(),
                   device_id=c.device_id)
        return c.login_form(m, 403, "Wrong credential.")
    token = c.relay.tokens.make(c.device_id, c.credential_hash())
    secure = "; Secure" if c.secure else ""
    m.reply(303, "Signed in", "Opening the device…",
            (f"Location: {quote(next_path, safe='/?=&%:;,+@')}",
             f"Set-Cookie: {COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax{secure}"))


@_b.on(auth, I.check_failed)
def _check_failed(m, c, failure):
    c.log.failure("credential check failed", failure)
    m.reply(502, "Relay error", "The relay could not check the credential.")


@_b.on([auth, waiting], I.data)
def _keep(m, c, data):
    c.buf += data
    if len(c.buf) > MAX_PENDING:
        c.io.pause_reading()


@_b.on([head, auth], I.open, to=waiting)
def _open(m, c):
    c.cancel_head_timer()
    if c.tcp:
        c.buf = c.buf[c.request.head_size:]
    c.request_tunnel(m, reuse=True)


@_b.on(waiting, I.tunnel_ready, to=stream)
def _stream(m, c, tunnel, reused):
    c.pending = None
    c.tunnel = tunnel
    c.relay.terminal_streaming(c.io, c.device_id)
    tunnel.start_stream(c.io, c.service, reused)
    if c.tcp and not c.answered:
        c.answered = True
        c.io.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    pending, c.buf = bytes(c.buf), bytearray()
    if pending:
        tunnel.send_data(pending)
    c.io.stream_to(tunnel.send_data)
    c.io.resume_reading()


@_b.on([head, body, auth, stream, done], I.tunnel_ready)
def _give_back(m, c, tunnel, reused):
    # Nobody here waits for it any more: the relay may give it to another.
    tunnel.give_back()


@_b.on(waiting, I.tunnel_failed)
def _no_tunnel(m, c, failure):
    c.pending = None
    c.why_no_tunnel(m, failure)


@_b.on(stream, I.data)
def _forward(m, c, data):
    c.tunnel.send_data(data)


@_b.on(stream, I.tunnel_ended, to=done)
def _ended(m, c):
    c.io.stream_to(None)
    c.tunnel = None
    c.io.close_connection()


@_b.on(stream, I.tunnel_lost, to=done)
def _lost_tunnel(m, c, abort):
    c.io.stream_to(None)
    c.tunnel = None
    if abort:
        c.io.abort_connection()
    else:
        c.io.close_connection()


@_b.on(stream, I.retry, to=waiting)
def _retry(m, c, pending):
    c.io.stream_to(None)
    c.tunnel = None
    c.buf = bytearray(pending)
    c.request_tunnel(m, reuse=False)


@_b.on(stream, I.connection_lost, to=done)
def _lost_streaming(m, c):
    c.io.stream_to(None)
    tunnel, c.tunnel = c.tunnel, None
    tunnel.send_end()
    c.relay.terminal_closed(c.io)


@_b.on(waiting, I.connection_lost, to=done)
def _lost_waiting(m, c):
    pending, c.pending = c.pending, None
    pending.cancel()
    c.relay.terminal_closed(c.io)


@_b.on([head, body, auth, done], I.connection_lost, to=done)
def _lost(m, c):
    c.cancel_head_timer()
    c.relay.terminal_closed(c.io)


# Races, not errors: a timer or a check ending after the connection moved on.
_b.ignore([auth, waiting, stream, done], I.head_late)
_b.ignore(done, I.data, I.reply, I.authorized, I.login_checked, I.check_failed,
          I.tunnel_failed, I.tunnel_ended, I.tunnel_lost, I.retry)
_b.ignore([head, body, auth, waiting], I.tunnel_ended, I.tunnel_lost)

TerminalMachine = _b.build(_unexpected)
del _b
