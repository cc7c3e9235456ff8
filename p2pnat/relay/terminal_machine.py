# -*- test-case-name: tests.unit.test_relay_machines,tests.unit.test_relay_terminal -*-
"""
The rules of one terminal connection, as a state machine with no transport
(L{p2pnat.relay.terminal.Terminal} drives it).

States::

    head ──► body ──► auth ──► waiting ──► stream ──► done
      │▲       │        ▲          ▲  │      │ ▲
      ││       └────────┘          │  └retry─┘ │      (and from any state,
      │└──────── finishing ◄── check ◄─────────┘       reply / loss ──► done)
      └────────────────────────────┘

- ``head``: reading a request head that starts a stream (bounded by the
  head timeout);
- ``body``: reading a login form;
- ``auth``: a credential is being checked (off the reactor thread);
- ``waiting``: for the device's tunnel; what the terminal sends meanwhile
  is kept (up to L{MAX_PENDING}, then reading pauses);
- ``stream``: the requests' bytes go to the tunnel as they are, through a
  L{RequestFramer} that finds where the next request starts (an opaque
  stream, CONNECT or an accepted Upgrade, goes straight to the tunnel);
- ``check``: the next request head on the connection is routed and
  authorized like the first; what follows it is kept.  (The common case,
  the stream's own device and allowed at once, never gets here: see
  L{TerminalCore.fast_next}.)  Same device,
  authorized: back to ``stream``, and the head goes on to the device.
  Anything else (another device, no or a wrong credential, a relay page,
  a malformed head) is never given to this device:
- ``finishing``: the stream is ended from the terminal's side; the
  device's answers to the earlier requests still reach the terminal, and
  at the device's END the kept request is read again from ``head``, as on
  a new connection (another stream, or the relay's page and a close);
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
from p2pnat.relay import access
from p2pnat.relay.core import CLUSTER_DOWN, Unreachable
from p2pnat.relay.credentials import NotChecked
from p2pnat.relay.devices import REVOKED, Refusal
from p2pnat.relay.http import (
    LOGIN_PATH,
    MAX_HEAD,
    MAX_LOGIN_BODY,
    MAX_PENDING,
    BadRequest,
    RequestFramer,
    page,
    parse_head,
)
from p2pnat.relay.limits import TooManyStreams
from p2pnat.relay.machine import MachineBuilder
from p2pnat.relay.sessions import DeviceRevoked, SessionTimeout, TooBusy

#: Seconds a terminal told "relay busy" (503) is asked to wait.
RETRY_AFTER = 5


#: The header a terminal adds to CONNECT to ask for a direct session (its UDP
#: mapping, ``IP:PORT`` or ``[IPv6]:PORT``), and the 200 answer's header
#: giving the device's mapping and the session's secret (docs/relay.rst).
DIRECT_HEADER = "p2p-direct"


def parse_direct_address(value):
    """
    The (host, port) of a P2P-Direct request header: ``IP:PORT`` or
    ``[IPv6]:PORT``, the IP a literal that can be a host's (not
    unspecified, multicast or broadcast), the port 1..65535.

    @raise ValueError: saying what is wrong.
    """
    import ipaddress

    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets")
    if not sep or not port.isdigit() or len(port) > 5:
        raise ValueError("expected IP:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("not an IP address") from None
    if ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
        raise ValueError("not a host's address")
    if not 0 < int(port) < 65536:
        raise ValueError("port out of range")
    return (str(ip), int(port))


def direct_answer_header(offer):
    """The 200 answer's P2P-Direct header line for a L{p2pnat.relay.core.DirectOffer}."""
    return (f"P2P-Direct: {wire.format_addr(offer.device_addr)};"
            f" secret={offer.secret.hex()}\r\n").encode("ascii")


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

    def next_head(self, head: object, rest: bytes) -> None:
        "A stream's next request head (bytes, or the L{BadRequest} its framing is), and what follows."

    def resume(self) -> None:
        "The next request is for the stream's device and may reach it: forward it."

    def reroute(self) -> None:
        "The next request must not reach the stream's device: end the stream, then route it."

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
    @ivar https: whether the current request came over HTTPS: over TLS, or
        through a trusted proxy that says so (L{route} sets it).
    """

    log = Logger(namespace="p2pnat.relay.terminal")

    def __init__(self, relay, io, secure):
        self.relay = relay
        self.io = io
        self.secure = secure
        self.https = secure
        self.buf = bytearray()
        self.request = None
        self.device_id = None
        self.service = ""
        self.tcp = False
        self.body_length = 0
        self.tunnel = None
        self.pending = None  # the relay's TunnelRequest while waiting
        self.answered = False  # "200 Connection established" sent (CONNECT)
        self.framer = None  # the stream's request boundaries (HTTP streams)
        self.reused = False  # the stream's tunnel was idle before: OPEN unconfirmed
        self.resend = b""  # framed bytes to send again on a new tunnel (retry)
        self.then = None  # a finishing stream's answer, if not its next head
        self.streaming_device = None  # the device of the stream a next head came on
        self.parsed = None  # (head bytes, Request): the fast path's parse, for the machine
        self.prechecked = None  # (Request, Deferred): a check the fast path began
        self.direct_to = None  # the terminal's UDP mapping, if it asked for a direct session
        self.direct = None  # the relay's DirectOffer for this stream, if any
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
        # The relay's setting (p2pnat.relay.tap); relays made without it trust no proxy.
        proxies = self.relay.trusted_proxies
        self.https = proxies.https(req, self.secure, self.io.peer())
        relay_host = self.relay.hostname
        if req.method == "CONNECT":
            device_id, _, service = req.target.partition(":")
            device_id = device_id.lower()  # device IDs are host names: case-insensitive
            if not valid_service(service):
                return m.reply(400, "Bad request", "That is not a service name.")
            if not self._direct_asked(m, req):
                return
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
            return self._connect_redirect(m, ids[0].lower())
        if url.path == "/":
            return m.reply(200, "p2pnat relay",
                           "Open a device at https://DEVICE." + relay_host + "/ or "
                           "/connect?ID=DEVICE.")
        return m.reply(404, "Not found", "No such page on the relay.")

    def _direct_asked(self, m, req):
        """
        Read a CONNECT's P2P-Direct header, if any (C{direct_to}); a
        malformed one is answered 400 (and False returned).  An address
        that is not the terminal's own (another IP than its TCP source)
        is ignored: the relay would make the device send to someone else.
        """
        value = req.headers.get(DIRECT_HEADER)
        if value is None:
            return True
        try:
            addr = parse_direct_address(value)
        except ValueError as e:
            m.reply(400, "Bad request", f"P2P-Direct: {e}.")
            return False
        own = self.io.peer_host() if hasattr(self.io, "peer_host") else None
        if own is None or own.removeprefix("::ffff:") != addr[0]:
            self.log.info("terminal {peer}: P2P-Direct address {addr} is not its own; no"
                          " direct session", peer=self.io.peer(), addr=wire.format_addr(addr))
            return True
        self.direct_to = addr
        return True

    def offer_direct(self):
        """Ask the relay for a direct session, if the terminal asked for one."""
        if self.direct_to is None or self.direct is not None:
            return
        self.direct = self.relay.direct_offer(self.device_id, self.service, self.direct_to,
                                              self.io.source, on_later=self._offered_later)

    def _offered_later(self, offer):
        """
        The node that owns a device live elsewhere in the cluster sent it the
        direct request: offer it as for a device of this node (a 103 now,
        repeated by the 200), while the terminal waits for its tunnel.
        """
        if self.answered or self.direct is not None or self.pending is None:
            return  # the 200 is out, or the connection is gone
        self.direct = offer
        self.io.write(b"HTTP/1.1 103 Early Hints\r\n" + direct_answer_header(offer) + b"\r\n")

    def _valid_id(self, m, device_id):
        """Whether C{device_id} can name a device at all; if not, answer 404."""
        self.device_id = device_id
        if wire.valid_key_id(device_id):
            return True
        m.reply(404, "Device unavailable", "That is not a device ID.")
        return False

    def refuse(self, m, refusal):
        self.log.info("terminal {peer} refused for {device_id}: {reason}", peer=self.io.peer(),
                      device_id=self.device_id, reason=refusal.reason)
        m.reply(refusal.status, "Device unavailable", refusal.message)

    def _connect_redirect(self, m, device_id):
        """
        The seed's flow: /connect?ID=DEVICE, answered by a redirect for
        any ID that can be one (the device's own address says the rest,
        to whom may know it).
        """
        if not self._valid_id(m, device_id):
            return
        location = self.relay.device_url(device_id, self.https)
        m.reply(302, "Redirecting", f"Go to {location}", (f"Location: {location}",))

    def _device(self, m, device_id, service, tcp):
        """
        A request for a device.  One whose own web UI keeps its login
        (access mode "device") is refused at once if unreachable, else
        opened.  Any other ID (unknown included) is a device whose login
        the relay keeps, and tells nothing of itself before a credential:
        cross-origin changes are refused, the rest must sign in
        (L{open_authorized} then answers for its state).
        """
        if not self._valid_id(m, device_id):
            return
        self.service = service
        self.tcp = tcp
        found = self.relay.reachable(device_id)
        refused = isinstance(found, Refusal)
        if not access.hidden(self.relay.device(device_id) if refused else found):
            return self.refuse(m, found) if refused else m.open()
        why = access.cross_origin(self.request, self.https)
        if why is not None:
            self.log.info("terminal {peer}: cross-origin {method} to {device_id} refused: {why}",
                          peer=self.io.peer(), method=self.request.method,
                          device_id=device_id, why=why)
            return m.reply(403, "Cross-site request refused",
                           "This device takes changes only from its own pages. Open it at"
                           " its own address and try again.")
        if not tcp and urlsplit(self.request.target).path == LOGIN_PATH:
            return self._login_start(m)
        m.authorize()

    def open_authorized(self, m):
        """The terminal gave the device's credential: now it may learn the device's state."""
        found = self.relay.reachable(self.device_id)
        if isinstance(found, Refusal):
            return self.refuse(m, found)
        m.open()

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
        pre, self.prechecked = self.prechecked, None
        if pre is not None and pre[0] is self.request:
            # The fast path began this very check: one check (one guess) per request.
            return pre[1]
        return self._authorization(self.request, self.https)

    def _authorization(self, req, https):
        cred_hash = self.credential_hash()
        # Every cookie of the name: a sibling device's page may have set
        # one for the whole relay domain, sent along with (or before) ours.
        cookie = access.cookie_name(https)
        if self.relay.tokens.check_any(req.cookies(cookie), self.device_id, cred_hash or "-",
                                       cookie) and cred_hash:
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
        return self.check_given(given).addCallback(self._warn_wrong)

    def check_given(self, given):
        """
        Deferred firing with whether C{given} is the device's credential.
        For a device with none (an unknown ID, say) the relay checks it
        against a dummy hash, as slowly and under the same guess limits:
        neither the answer's timing nor a 429 tells whether the ID exists.
        """
        return self.relay.check_credential(self.device_id, given, self.io.peer())

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
        # A browser opening a page gets the form alone: with a Basic
        # challenge it would show its own password dialog instead (and
        # then send the credential with every request, cross-site ones
        # included).  curl and other clients get the challenge.
        navigate = self.request.headers.get("sec-fetch-mode", "").strip().lower() == "navigate"
        challenge = () if navigate else ('WWW-Authenticate: Basic realm="p2pnat"',)
        m.reply(status, f"{self.device_id}", "This device asks for its access credential.",
                challenge, form)

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
        m.login(given, nxt)

    # -- the stream's requests ---------------------------------------------------

    def start_requests(self, m, data):
        """
        The stream's first head is in C{data} (the current L{request}):
        send it, then what follows, request by request.
        """
        self.framer = RequestFramer()
        self.next_request(m, data)

    def next_request(self, m, data):
        """Send the current request's head at the start of C{data}, and pump the rest."""
        req = self.request
        self._send_head(req, data[:req.head_size])
        self.pump(m, data[req.head_size:])

    def _send_head(self, req, head):
        """Send request C{req}'s C{head} to the device; its body follows."""
        if self.reused and not req.resendable:
            self.tunnel.hold()
        self.tunnel.send_data(head)
        self.framer.begin(req)

    def pump(self, m, data):
        """
        Send C{data} on through the framer up to the next head the fast
        path does not take, which goes to the machine (C{next_head});
        otherwise read on, straight to L{forward} (or to the tunnel once
        the stream is opaque).
        """
        stop = self._frame(data)
        if stop is not None:
            return m.next_head(*stop)
        opaque = self.framer.mode == RequestFramer.OPAQUE
        self.io.stream_to(self.tunnel.send_data if opaque else self.forward)
        self.io.resume_reading()

    def forward(self, data):
        """
        The stream's data path (one call per read): the current request's
        bytes go to the tunnel; at the next head, L{fast_next} or else the
        machine decides.
        """
        stop = self._frame(data)
        if stop is not None:
            self.io.stream_to(None)
            self.machine.next_head(*stop)

    def _frame(self, data):
        """
        Send C{data} to the tunnel through the framer, each later head the
        fast path takes included (a loop, not a recursion: a read may hold
        thousands of pipelined requests).

        @return: None (all of C{data} sent), or C{(stop, rest)}: the framer's
            stop the fast path did not take, and the bytes after it.
        """
        framer, send = self.framer, self.tunnel.send_data
        while data:
            body, stop, rest = framer.feed(data)
            if body:
                send(body)
            if stop is None:
                return None
            if isinstance(stop, BadRequest) or not self.fast_next(stop):
                return stop, rest
            data = rest
        return None

    def fast_next(self, head):
        """
        The fast path of a later request head on a streaming connection:
        when the decision needs nothing slow and is "the stream's device,
        allowed", send the head on at once, with no machine input
        (Automat costs about 9 µs an input; the C{check} state's way
        takes four), and return True.

        It decides exactly as L{route} and the C{check} state would, and
        only ever says yes: another device, a relay page, CONNECT or an
        Upgrade, a refused or revoked device, a cross-origin change, the
        login page, a malformed head, a credential that must be hashed or
        is wrong all return False, with nothing logged or answered, and
        the machine decides as before (parsing the head, or checking its
        credential, only once: L{parsed}, L{prechecked}).
        """
        self.prechecked = None
        try:
            req = parse_head(head)
        except BadRequest:
            return False
        self.parsed = (head, req)
        if req.framing == "opaque" or req.method == "CONNECT" or self.tcp:
            return False
        relay = self.relay
        relay_host = relay.hostname
        host = req.host
        if host[:-len(relay_host) - 1] != self.device_id \
                or not host.endswith("." + relay_host):
            return False
        proxies = relay.trusted_proxies
        https = proxies.https(req, self.secure, self.io.peer()) if proxies else self.secure
        found = relay.reachable(self.device_id)
        if isinstance(found, Refusal):
            return False
        if access.hidden(found):
            if access.cross_origin(req, https) is not None \
                    or urlsplit(req.target).path == LOGIN_PATH:
                return False
            d = self._authorization(req, https)
            result = []
            d.addBoth(lambda r: result.append(r) or r)
            if result != [True]:
                # False, a failure, or a check under way: the machine's
                # check state takes this Deferred over (L{authorization}).
                self.prechecked = (req, d)
                return False
        self.request, self.https, self.parsed = req, https, None
        self._send_head(req, head)
        return True

    def parse(self, head):
        """The L{Request} of C{head}: L{fast_next}'s parse of it, or a new one."""
        parsed, self.parsed = self.parsed, None
        if parsed is not None and parsed[0] is head:
            return parsed[1]
        return parse_head(head)

    def end_stream(self, m):
        """End the stream from this side; its END comes back as C{tunnel_ended}."""
        if self.tunnel is None:
            m.tunnel_ended()
        else:
            self.tunnel.finish()

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
        if failure.check(Unreachable):  # a cluster looked the device up
            refusal = failure.value.refusal
            if refusal is CLUSTER_DOWN:
                # The cluster's own log says Redis is away (rate-limited).
                self.log.info("terminal {peer} refused for {device_id}: {reason}",
                              peer=self.io.peer(), device_id=self.device_id,
                              reason=refusal.reason)
                return m.reply(refusal.status, "Device unavailable", refusal.message,
                               (f"Retry-After: {RETRY_AFTER}",))
            return self.refuse(m, refusal)
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
check = _b.state("check")
finishing = _b.state("finishing")
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
    d = c.check_given(given)
    d.addCallbacks(lambda ok: m.login_checked(ok, next_path), m.check_failed)


@_b.on(head, I.authorize, to=auth)
def _check_head(m, c):
    c.cancel_head_timer()
    c.authorization().addCallbacks(m.authorized, m.check_failed)


@_b.on(auth, I.authorized)
def _authorized(m, c, ok):
    if ok:
        return c.open_authorized(m)
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
    token = c.relay.tokens.make(c.device_id, c.credential_hash(), access.cookie_name(c.https))
    m.reply(303, "Signed in", "Opening the device…",
            (f"Location: {quote(next_path, safe='/?=&%:;,+@')}",
             f"Set-Cookie: {access.set_cookie(token, c.https)}"))


@_b.on(auth, I.check_failed)
def _check_failed(m, c, failure):
    if failure.check(NotChecked):  # over a guess limit, or too many checks under way
        e = failure.value
        return m.reply(e.status, e.title, str(e), (f"Retry-After: {e.retry_after}",))
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
        # Before the tunnel: the device punches while its tunnel comes up,
        # and the terminal, told at once (an interim 103 whose hint the 200
        # repeats), tries QUIC meanwhile.
        c.offer_direct()
        if c.direct is not None:
            c.io.write(b"HTTP/1.1 103 Early Hints\r\n" + direct_answer_header(c.direct)
                       + b"\r\n")
    c.request_tunnel(m, reuse=True)


@_b.on(waiting, I.tunnel_ready, to=stream)
def _stream(m, c, tunnel, reused):
    c.pending = None
    c.tunnel = tunnel
    c.reused = reused
    c.relay.terminal_streaming(c.io, c.device_id)
    tunnel.start_stream(c.io, c.service, reused)
    if c.tcp and not c.answered:
        c.answered = True
        direct = direct_answer_header(c.direct) if c.direct is not None else b""
        c.io.write(b"HTTP/1.1 200 Connection established\r\n" + direct + b"\r\n")
    resend, c.resend = c.resend, b""
    pending, c.buf = bytes(c.buf), bytearray()
    if c.tcp:
        if reused:
            tunnel.hold()  # a TCP stream's bytes could mean anything twice
        for data in (resend, pending):
            if data:
                tunnel.send_data(data)
        c.io.stream_to(tunnel.send_data)
        c.io.resume_reading()
    elif resend:
        # A retry: the framer has read these already; it reads on after them.
        tunnel.send_data(resend)
        c.pump(m, pending)
    else:
        c.start_requests(m, pending)


@_b.on([head, body, auth, stream, check, finishing, done], I.tunnel_ready)
def _give_back(m, c, tunnel, reused):
    # Nobody here waits for it any more: the relay may give it to another.
    tunnel.give_back()


@_b.on(waiting, I.tunnel_failed)
def _no_tunnel(m, c, failure):
    c.pending = None
    c.why_no_tunnel(m, failure)


@_b.on(stream, I.data)
def _forward(m, c, data):
    c.pump(m, data)


@_b.on(stream, I.next_head, to=check)
def _next_head(m, c, head, rest):
    """Another request on the connection: routed and authorized like the first."""
    c.io.stream_to(None)
    if isinstance(head, BadRequest):
        c.then = (head.status, "Bad request", str(head))
        return m.reroute()
    c.buf = bytearray(head) + rest
    if len(c.buf) > MAX_PENDING:
        c.io.pause_reading()
    try:
        c.request = c.parse(head)
    except BadRequest as e:
        c.then = (e.status, "Bad request", str(e))
        return m.reroute()
    c.streaming_device = c.device_id
    c.route(m)


@_b.on(check, I.data)
def _keep_next(m, c, data):
    c.buf += data
    if len(c.buf) > MAX_PENDING:
        c.io.pause_reading()


@_b.on(check, I.open)
def _open_next(m, c):
    if c.device_id == c.streaming_device and not c.tcp and c.tunnel is not None:
        return m.resume()
    m.reroute()


@_b.on(check, I.authorize)
def _check_next(m, c):
    if c.device_id != c.streaming_device or c.tcp:
        return m.reroute()  # never checked here: routed afresh after the END
    c.authorization().addCallbacks(m.authorized, m.check_failed)


@_b.on(check, I.authorized)
def _authorized_next(m, c, ok):
    # Authorized, and the device still reachable (it may have been revoked
    # or gone stale since the stream began): on the same stream.  Else the
    # held head is answered afresh once the device's answers are written.
    if ok and not isinstance(c.relay.reachable(c.device_id), Refusal):
        return m.open()
    m.reroute()


@_b.on(check, I.resume, to=stream)
def _resume(m, c):
    held, c.buf = bytes(c.buf), bytearray()
    c.next_request(m, held)


@_b.on(check, I.reroute, to=finishing)
@_b.on(check, I.reply, to=finishing)
@_b.on(check, I.read_login, to=finishing)
@_b.on(check, I.check_failed, to=finishing)
def _finish(m, c, *args, **kwargs):
    # A page, a login form, another device: answered once this stream is
    # over, as on a new connection.  A failed check is retried then.
    c.end_stream(m)


@_b.on(check, I.tunnel_ended)
def _ended_checking(m, c):
    # The device closed its side first: the kept request gets a new stream.
    c.io.stream_to(None)
    c.tunnel = None


@_b.on(finishing, I.data)
def _keep_finishing(m, c, data):
    c.buf += data
    if len(c.buf) > MAX_PENDING:
        c.io.pause_reading()


@_b.on(finishing, I.tunnel_ended, to=head)
def _finished(m, c):
    """The device's answers are all written: read the kept request afresh."""
    c.tunnel = None
    c.framer = None
    c.reused = False
    c.resend = b""
    c.io.resume_reading()
    then, c.then = c.then, None
    if then is not None:
        return m.reply(*then)
    m.data(b"")


@_b.on([check, stream], I.tunnel_lost, to=done)
@_b.on(finishing, I.tunnel_lost, to=done)
def _lost_tunnel(m, c, abort):
    c.io.stream_to(None)
    c.tunnel = None
    if abort:
        c.io.abort_connection()
    else:
        c.io.close_connection()


@_b.on(check, I.retry, to=done)
def _retry_checking(m, c, pending):
    # The reused tunnel was dead while the next head was being decided:
    # resending here would mix a decided and an undecided request.  Close;
    # the terminal sends both again on a new connection.
    c.io.stream_to(None)
    c.tunnel = None
    c.io.close_connection()


@_b.on(stream, I.tunnel_ended, to=done)
def _ended(m, c):
    c.io.stream_to(None)
    c.tunnel = None
    c.io.close_connection()


@_b.on(stream, I.retry, to=waiting)
def _retry(m, c, pending):
    c.io.stream_to(None)
    c.tunnel = None
    c.resend = pending
    c.request_tunnel(m, reuse=False)


@_b.on([stream, check, finishing], I.connection_lost, to=done)
def _lost_streaming(m, c):
    c.io.stream_to(None)
    tunnel, c.tunnel = c.tunnel, None
    if tunnel is not None:
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
_b.ignore([auth, waiting, stream, check, finishing, done], I.head_late)
_b.ignore(done, I.data, I.reply, I.authorized, I.login_checked, I.check_failed,
          I.tunnel_failed, I.tunnel_ended, I.tunnel_lost, I.retry, I.next_head)
# Gone with the stream they belonged to.
_b.ignore(finishing, I.retry)
_b.ignore([head, body, auth, waiting], I.tunnel_ended, I.tunnel_lost)

TerminalMachine = _b.build(_unexpected)
del _b
