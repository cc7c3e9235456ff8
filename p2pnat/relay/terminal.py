# -*- test-case-name: tests.unit.test_relay_terminal -*-
"""
The relay's terminal side: browsers and the ``p2pnat`` CLI connect here.

The relay reads the first request head of a connection, and only that:
it names the device (``Host: DEVICE.RELAYHOST``, the seed's
``/connect?ID=DEVICE``, or ``CONNECT DEVICE[:SERVICE]`` from the CLI) and
carries the terminal's credential when the device asks the relay to check
it.  Routing and authorization both read that one parsed identity
(L{Request}).  Once the device's tunnel is there, the connection's bytes go
to the device as they are, both ways, as a TCP proxy moves them: the relay
never parses what follows, so an HTTP Upgrade (WebSocket) works once the
device answered 101, and nothing sent on the connection can reach another
device.  With ALPN ``http/1.1`` a browser keeps one origin per connection,
so routing per connection is sound.
"""

import base64
import hashlib
import hmac
import html
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol

from p2pnat.daemon.logs import Logger
from p2pnat.net import streams
from p2pnat.protocol import wire
from p2pnat.relay.devices import Refusal

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_LOGIN_BODY = 4096
MAX_PENDING = 256 * 1024  # terminal bytes buffered while the tunnel is coming
COOKIE = "p2pnat_auth"
LOGIN_PATH = "/.p2pnat/login"


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """The first request head of a terminal connection, parsed once."""

    method: str
    target: str
    version: str
    headers: dict = field(default_factory=dict)  # lower-case name -> last value
    head_size: int = 0

    @property
    def host(self):
        host = self.headers.get("host", "").strip().lower()
        if host.startswith("["):
            return host.split("]")[0] + "]"
        return host.rsplit(":", 1)[0] if ":" in host else host

    def cookie(self, name):
        for part in self.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return None


def parse_head(data):
    """
    Parse a request head (up to and including the blank line).

    @raise BadRequest: with the status to answer.
    """
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest(400, "undecodable request")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "not an HTTP/1.x request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper() or not target:
        raise BadRequest(400, "bad request line")
    headers = {}
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "bad header line")
        count += 1
        if count > MAX_HEADERS:
            raise BadRequest(431, "too many header fields")
        headers[name.lower()] = value.strip()
    return Request(method, target, version, headers, len(data))


def page(status, title, message, extra_headers=(), body_extra=""):
    """A complete small HTML response that closes the connection."""
    reason = {200: "OK", 302: "Found", 303: "See Other", 400: "Bad Request",
              401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              413: "Content Too Large", 421: "Misdirected Request",
              431: "Request Header Fields Too Large", 502: "Bad Gateway",
              503: "Service Unavailable", 504: "Gateway Timeout"}[status]
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em}"
        "input,button{font:inherit;padding:.3em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{body_extra}"
        "<hr><small>p2pnat relay</small></body></html>").encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/html; charset=utf-8",
            f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close",
            "X-Content-Type-Options: nosniff", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Tokens:
    """
    Signed cookies proving a terminal gave a device's access credential:
    ``device|expiry|mac``, the MAC over the device ID, the expiry and the
    credential's stored hash (so a new credential voids old cookies).
    """

    def __init__(self, secret, clock, lifetime=12 * 3600):
        self.secret = secret
        self.clock = clock
        self.lifetime = lifetime

    def _mac(self, device_id, expiry, credential_hash):
        msg = f"{device_id}|{expiry}|{credential_hash}".encode()
        return base64.urlsafe_b64encode(hmac.new(self.secret, msg, hashlib.sha256).digest()[:18]
                                        ).decode()

    def make(self, device_id, credential_hash):
        expiry = int(self.clock.seconds() + self.lifetime)
        return f"{expiry}.{self._mac(device_id, expiry, credential_hash)}"

    def check(self, token, device_id, credential_hash):
        if not token:
            return False
        expiry, _, mac = token.partition(".")
        if not expiry.isdigit() or int(expiry) < self.clock.seconds():
            return False
        return hmac.compare_digest(mac, self._mac(device_id, int(expiry), credential_hash))


class Terminal(Protocol):
    """
    One terminal connection.  States: ``head`` (reading the first request
    head), ``body`` (reading a login form), ``auth`` (checking a
    credential), ``waiting`` (for the device's tunnel), ``stream``, ``done``.
    """

    log = Logger(namespace="p2pnat.relay.terminal")

    def __init__(self, relay, secure):
        self.relay = relay
        self.secure = secure
        self.state = "head"
        self._buf = bytearray()
        self.tunnel = None
        self.session = None
        self.request = None
        self.device_id = None
        self.streamed = False  # carried a device's stream (revocation cuts it)
        self._head_timer = None

    def connectionMade(self):
        self.gate = streams.Gate(self.transport)
        streams.tune(self.transport)
        self.relay.terminals.add(self)
        self._head_timer = self.relay.clock.callLater(self.relay.head_timeout, self._head_late)

    def _head_late(self):
        self._head_timer = None
        if self.state in ("head", "body"):
            self.transport.abortConnection()

    def _cancel_head_timer(self):
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def dataReceived(self, data):
        if self.state == "stream":
            self.tunnel.send_data(data)
        elif self.state == "head":
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self.reply(431, "Request too large", "The request head is too large.")
                return
            if end + 4 > MAX_HEAD:
                return self.reply(431, "Request too large", "The request head is too large.")
            try:
                self.request = parse_head(bytes(self._buf[:end + 4]))
            except BadRequest as e:
                return self.reply(e.status, "Bad request", str(e))
            self._route()
        elif self.state == "body":
            self._buf += data
            self._login_body()
        elif self.state in ("waiting", "auth"):
            self._buf += data
            if len(self._buf) > MAX_PENDING:
                self.transport.pauseProducing()

    def reply(self, status, title, message, extra_headers=(), body_extra=""):
        """Answer from the relay itself and close."""
        self.state = "done"
        self._cancel_head_timer()
        self.relay.metrics.sessions.labels(f"http-{status}").inc()
        self.transport.write(page(status, title, message, extra_headers, body_extra))
        self.transport.loseConnection()

    def refuse(self, refusal: Refusal):
        self.log.info("terminal {peer} refused for {device_id}: {reason}", peer=self._peer(),
                      device_id=self.device_id, reason=refusal.reason)
        self.reply(refusal.status, "Device unavailable", refusal.message)

    def _peer(self):
        p = self.transport.getPeer()
        return f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"

    # -- routing --------------------------------------------------------------

    def _route(self):
        req = self.request
        relay_host = self.relay.hostname
        if req.method == "CONNECT":
            device_id, _, service = req.target.partition(":")
            return self._device(device_id, service, tcp=True)
        host = req.host
        if host.endswith("." + relay_host):
            return self._device(host[:-len(relay_host) - 1], "", tcp=False)
        if host != relay_host:
            return self.reply(421, "Unknown host",
                              f"This relay serves {relay_host} and its devices only.")
        url = urlsplit(req.target)
        if url.path == "/connect":
            ids = parse_qs(url.query).get("ID") or parse_qs(url.query).get("id") or [""]
            return self._connect_redirect(ids[0])
        if url.path == "/":
            return self.reply(200, "p2pnat relay",
                              "Open a device at https://DEVICE." + relay_host + "/ or "
                              "/connect?ID=DEVICE.")
        return self.reply(404, "Not found", "No such page on the relay.")

    def _reachable(self, device_id):
        """
        The device if a terminal may reach it now; otherwise answer at once
        (not a device ID, unknown, revoked, stale) and return None.
        """
        self.device_id = device_id
        if not wire.valid_key_id(device_id):
            self.reply(404, "Device unavailable", "That is not a device ID.")
            return None
        found = self.relay.devices.reachable(device_id, self.relay.clock.seconds())
        if isinstance(found, Refusal):
            self.refuse(found)
            return None
        return found

    def _connect_redirect(self, device_id):
        """The seed's flow: /connect?ID=DEVICE, answered by a redirect."""
        if self._reachable(device_id) is None:
            return
        location = self.relay.device_url(device_id, self.secure)
        self.reply(302, "Redirecting", f"Go to {location}", [f"Location: {location}"])

    def _device(self, device_id, service, tcp):
        found = self._reachable(device_id)
        if found is None:
            return
        self.service = service
        self.tcp = tcp
        if found.access_mode == "relay":
            if not tcp and urlsplit(self.request.target).path == LOGIN_PATH:
                return self._login_start()
            self._cancel_head_timer()
            self.state = "auth"
            d = self._authorize(found)
            d.addCallback(self._auth_done)
            d.addErrback(self._auth_failed)
            return
        self._open()

    def _auth_done(self, ok):
        if self.state != "auth":
            return
        if ok:
            return self._open()
        if self.tcp:
            return self.reply(401, "Credential required",
                              "This device needs its access credential.",
                              ['WWW-Authenticate: Basic realm="p2pnat"'])
        self._login_form(401, "")

    def _auth_failed(self, failure):
        self.log.failure("credential check failed", failure)
        if self.state == "auth":
            self.reply(502, "Relay error", "The relay could not check the credential.")

    # -- access credential (devices whose access mode is "relay") ---------------

    def _credential_hash(self, device):
        record = self.relay.registry_record(device.id)
        return record.access_credential_hash if record is not None else None

    def _authorize(self, device):
        """
        Whether the terminal proved it knows the device's credential: a
        login cookie, or the credential itself in an Authorization (or,
        for CONNECT, Proxy-Authorization) header, Basic or Bearer.

        @return: Deferred firing with a bool (checking a credential is slow
            on purpose and runs off the reactor thread).
        """
        req = self.request
        cred_hash = self._credential_hash(device)
        if not cred_hash:
            return succeed(False)
        if self.relay.tokens.check(req.cookie(COOKIE), device.id, cred_hash):
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

        def checked(ok):
            if not ok:
                self.log.warn("terminal {peer}: wrong credential for {device_id}",
                              peer=self._peer(), device_id=device.id)
            return ok

        return self.relay.check_credential(device.id, given).addCallback(checked)

    def _login_form(self, status, error):
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
        self.reply(status, f"{self.device_id}", "This device asks for its access credential.",
                   ['WWW-Authenticate: Basic realm="p2pnat"'], form)

    def _login_start(self):
        if self.request.method != "POST":
            return self._login_form(401, "")
        try:
            length = int(self.request.headers.get("content-length", "-1"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_LOGIN_BODY:
            return self.reply(413, "Bad login", "The login form is too large or has no length.")
        self._body_length = length
        self._buf = self._buf[self.request.head_size:]
        self.state = "body"
        self._login_body()

    def _login_body(self):
        if len(self._buf) < self._body_length:
            return
        form = parse_qs(bytes(self._buf[:self._body_length]).decode("utf-8", "replace"))
        given = (form.get("credential") or [""])[0]
        nxt = (form.get("next") or ["/"])[0]
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        device = self.relay.devices.get(self.device_id)
        if device is None:
            return self.reply(404, "Device unavailable", "No such device.")
        self.state = "auth"
        d = self.relay.check_credential(self.device_id, given)
        d.addCallback(self._login_checked, device, nxt)
        d.addErrback(self._auth_failed)

    def _login_checked(self, ok, device, nxt):
        if self.state != "auth":
            return
        if not ok:
            self.log.warn("terminal {peer}: wrong credential for {device_id}", peer=self._peer(),
                          device_id=self.device_id)
            return self._login_form(403, "Wrong credential.")
        token = self.relay.tokens.make(self.device_id, self._credential_hash(device))
        secure = "; Secure" if self.secure else ""
        self.reply(303, "Signed in", "Opening the device…",
                   [f"Location: {quote(nxt, safe='/?=&%:;,+@')}",
                    f"Set-Cookie: {COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax{secure}"])

    # -- the stream -------------------------------------------------------------

    def _open(self):
        self._cancel_head_timer()
        self.state = "waiting"
        if self.tcp:
            self._buf = self._buf[self.request.head_size:]
        d = self.relay.get_tunnel(self.device_id, self)
        d.addCallbacks(self._tunnel_ready, self._tunnel_failed)

    def _tunnel_ready(self, tunnel):
        if self.state != "waiting":
            # The terminal went away meanwhile: give the tunnel back.
            self.relay.tunnel_idle(tunnel)
            return
        self.tunnel = tunnel
        self.state = "stream"
        self.streamed = True
        tunnel.start_stream(self, self.service, reused=getattr(tunnel, "reused", False))
        tunnel.reused = False
        if self.tcp and not getattr(self, "tcp_answered", False):
            self.tcp_answered = True
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pending, self._buf = bytes(self._buf), None
        if pending:
            tunnel.send_data(pending)
        self.transport.resumeProducing()

    def _tunnel_failed(self, failure):
        if self.state != "waiting":
            return
        from p2pnat.relay.devices import REVOKED
        from p2pnat.relay.sessions import DeviceRevoked, SessionTimeout

        if failure.check(DeviceRevoked):
            return self.refuse(REVOKED)
        if failure.check(SessionTimeout):
            self.log.info("terminal {peer}: no tunnel from {device_id}: {why}", peer=self._peer(),
                          device_id=self.device_id, why=failure.getErrorMessage())
            return self.reply(504, "Device did not answer",
                              "The device did not connect back to the relay in time.")
        self.log.failure("terminal {peer}: tunnel failed", failure, peer=self._peer())
        self.reply(502, "Relay error", "The relay could not reach the device.")

    def tunnel_ended(self):
        """The device's side closed: close ours once written."""
        self.state = "done"
        streams.close_after_writes(self.transport)

    def tunnel_lost(self, abort=False):
        """The tunnel died under the stream (C{abort}: the device was revoked)."""
        self.state = "done"
        if abort:
            self.transport.abortConnection()
        else:
            streams.close_after_writes(self.transport)

    def retry(self, pending):
        """
        The reused tunnel this stream went to was dead: send what it was
        given again, on a new tunnel.
        """
        self.tunnel = None
        self.state = "waiting"
        self._buf = bytearray(pending)
        self.tcp_answered = getattr(self, "tcp_answered", False)
        d = self.relay.get_tunnel(self.device_id, self, reuse=False)
        d.addCallbacks(self._tunnel_ready, self._tunnel_failed)

    def connectionLost(self, reason):
        self._cancel_head_timer()
        self.relay.terminals.discard(self)
        state, self.state = self.state, "done"
        if state == "stream" and self.tunnel is not None:
            self.tunnel.send_end()
        elif state == "waiting":
            self.relay.cancel_wait(self)


class TerminalFactory(Factory):
    noisy = False

    def __init__(self, relay, secure):
        self.relay = relay
        self.secure = secure

    def buildProtocol(self, addr):
        return Terminal(self.relay, self.secure)


