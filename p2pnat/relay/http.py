# -*- test-case-name: tests.unit.test_relay_terminal -*-
"""
HTTP as the relay's terminal side speaks it, with no I/O: request heads
parsed (L{parse_head}, with the framing checks an HTTP/1.1 proxy needs
against request smuggling), the request boundaries in what a terminal
sends (L{RequestFramer}), the relay's own small pages (L{page}), and the
signed login cookies (L{Tokens}).
"""

import base64
import hashlib
import hmac
import html
from dataclasses import dataclass, field

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_LOGIN_BODY = 4096
MAX_PENDING = 256 * 1024  # terminal bytes buffered while the tunnel is coming
#: The login cookie over HTTPS: the ``__Host-`` prefix makes the browser
#: keep it host-only and Secure, so no sibling device's page can set it.
COOKIE = "__Host-p2pnat_auth"
#: The login cookie over plain HTTP, where browsers refuse ``__Host-``:
#: host-only all the same.  (Cookies of this name from before the
#: ``__Host-`` one fail the check: their MAC does not name the cookie.)
PLAIN_COOKIE = "p2pnat_auth"
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
#: Methods the relay may send to a device twice (RFC 9110 9.2.1, safe
#: methods): any other request, and a CONNECT stream, waits for a reused
#: tunnel's OPENED before it is sent, so a dead tunnel's retry never
#: repeats it.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
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
    #: How the request's body is framed: "none", "length" (C{length}
    #: bytes), "chunked", or "opaque" (CONNECT, or an Upgrade: whatever
    #: follows the head is another protocol's).
    framing: str = "none"
    length: int = 0

    @property
    def resendable(self):
        """Whether sending this request twice is harmless (a safe method, no body)."""
        return self.method in SAFE_METHODS and self.framing == "none"

    @property
    def host(self):
        host = self.headers.get("host", "").strip().lower()
        if host.startswith("["):
            return host.split("]")[0] + "]"
        return host.rsplit(":", 1)[0] if ":" in host else host

    def cookie(self, name):
        """The first cookie called C{name}, or None (see L{cookies})."""
        return next(iter(self.cookies(name)), None)

    def cookies(self, name):
        """
        Every value of the cookies called C{name}, in the order sent.  A
        browser sends several of one name when pages set them for several
        domains or paths (a sibling device's page can set one for the
        whole relay domain): whoever checks them must try each.
        """
        values = []
        for part in self.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                values.append(v)
        return values


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
    for line in lines:
        # A lone CR or LF is a line end to some parsers and not to others.
        if "\r" in line or "\n" in line:
            raise BadRequest(400, "bare CR or LF in the request head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "not an HTTP/1.x request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper() or not target:
        raise BadRequest(400, "bad request line")
    headers = {}
    repeated = {"host": [], "content-length": [], "transfer-encoding": []}
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise BadRequest(400, "obsolete line folding")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "bad header line")
        count += 1
        if count > MAX_HEADERS:
            raise BadRequest(431, "too many header fields")
        name = name.lower()
        headers[name] = value.strip()
        if name in repeated:
            repeated[name].append(value.strip())
    if len(repeated["host"]) > 1:
        raise BadRequest(400, "more than one Host field")
    request = Request(method, target, version, headers, len(data))
    _framing(request, repeated["content-length"], repeated["transfer-encoding"])
    return request


def _framing(request, lengths, encodings):
    """
    Set how C{request}'s body is framed (RFC 9112 6), refusing what
    proxies and servers could read differently (request smuggling).
    """
    if request.method == "CONNECT":
        request.framing = "opaque"
        return
    if encodings:
        if lengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if request.version == "HTTP/1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for v in encodings for c in v.split(",")]
        if codings[-1] != "chunked" or codings.count("chunked") != 1 or "" in codings:
            raise BadRequest(400, "a Transfer-Encoding must end with chunked, once")
        request.framing = "chunked"
    elif lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1:
            raise BadRequest(400, "differing Content-Length values")
        value = values.pop()
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise BadRequest(400, "bad Content-Length")
        request.length = int(value)
        request.framing = "length" if request.length else "none"
    if "upgrade" in request.headers and "upgrade" in _tokens(request.headers.get("connection")):
        # An upgrade the device accepts makes the rest of the connection
        # its protocol's (WebSocket frames), which no head parser can read.
        request.framing = "opaque"


def _tokens(value):
    return {t.strip().lower() for t in (value or "").split(",")}


class RequestFramer:
    """
    Finds the request boundaries in what a terminal sends on one
    connection, with no I/O: each request's head, then its body by
    Content-Length or chunked coding (chunk sizes and trailers parsed,
    chunk data only counted), then the next head.  After an opaque request
    (CONNECT, Upgrade) it reads nothing any more.

    The caller feeds bytes with L{feed}; at each complete head it stops,
    the caller decides (route, authorize) and parses it with L{begin},
    which reads its framing, then feeds the rest.  Body bytes cost a length
    comparison per read, never a scan.
    """

    HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, OPAQUE = range(7)

    def __init__(self):
        self.mode = self.HEAD
        self.left = 0  # body or chunk bytes still to come
        self.line = bytearray()  # a head, chunk-size line or trailer being read

    def feed(self, data):
        """
        Read C{data} up to the next complete head.

        @return: C{(body, stop, rest)}: C{body} the bytes before the stop,
            which belong to requests already begun (forward them); C{stop}
            None (all of C{data} read), the next head's bytes, or a
            L{BadRequest} (the framing is broken: forward nothing more);
            C{rest} the bytes after the stop, not read yet.
        """
        mode = self.mode
        if mode == self.BODY and len(data) < self.left:
            self.left -= len(data)
            return data, None, b""
        if mode == self.OPAQUE:
            return data, None, b""
        data = memoryview(data)
        at = 0
        size = len(data)
        while at < size:
            mode = self.mode
            if mode == self.BODY or mode == self.CHUNK_DATA:
                n = min(self.left, size - at)
                self.left -= n
                at += n
                if not self.left:
                    self.mode = self.HEAD if mode == self.BODY else self.CHUNK_END
            elif mode == self.OPAQUE:
                at = size
            elif mode == self.HEAD:
                body = bytes(data[:at])
                start = max(0, len(self.line) - 3)
                self.line += data[at:]
                # RFC 9112 2.2: empty lines before a request line are
                # ignored (old clients send one after a POST body):
                # dropped, they belong to no request.
                while self.line[:2] == b"\r\n":
                    del self.line[:2]
                    start = 0
                end = self.line.find(b"\r\n\r\n", start)
                if end < 0 or end + 4 > MAX_HEAD:
                    if len(self.line) > MAX_HEAD or end >= 0:
                        self.line = bytearray()
                        return body, BadRequest(431, "The request head is too large."), b""
                    return body, None, b""
                head, rest = bytes(self.line[:end + 4]), bytes(self.line[end + 4:])
                self.line = bytearray()
                return body, head, rest
            else:
                line_at = at
                error, at = self._chunk_line(data, at)
                if error is not None:
                    return bytes(data[:line_at]), error, b""
        return bytes(data), None, b""

    def _chunk_line(self, data, at):
        """Read a chunk-size line, a chunk's CRLF or a trailer line."""
        end = bytes(data[at:at + MAX_CHUNK_LINE + 2]).find(b"\n")
        if end < 0:
            self.line += data[at:]
            if len(self.line) > MAX_CHUNK_LINE:
                return BadRequest(400, "chunk line too long"), at
            if self.mode == self.CHUNK_END and not b"\r\n".startswith(self.line):
                return BadRequest(400, "chunk data longer than its size"), at
            return None, len(data)
        self.line += data[at:at + end + 1]
        at += end + 1
        line, self.line = bytes(self.line), bytearray()
        if len(line) > MAX_CHUNK_LINE + 2 or not line.endswith(b"\r\n") \
                or b"\r" in line[:-2]:
            return BadRequest(400, "bad chunk line"), at
        line = line[:-2]
        if self.mode == self.CHUNK_END:
            if line:
                return BadRequest(400, "chunk data longer than its size"), at
            self.mode = self.CHUNK_SIZE
        elif self.mode == self.CHUNK_SIZE:
            digits = line.partition(b";")[0].strip(b" \t")
            if not digits or len(digits) > 15 or digits.strip(b"0123456789abcdefABCDEF"):
                return BadRequest(400, "bad chunk size"), at
            self.left = int(digits, 16)
            self.mode = self.CHUNK_DATA if self.left else self.TRAILER
            self.trailer = 0
        else:  # TRAILER: field lines up to an empty line
            self.trailer += len(line) + 2
            if self.trailer > MAX_HEAD:
                return BadRequest(431, "trailer section too large"), at
            if not line:
                self.mode = self.HEAD
        return None, at

    def begin(self, request):
        """Read C{request}'s body next (its head was the last stop)."""
        self.line = bytearray()
        if request.framing == "length":
            self.mode, self.left = self.BODY, request.length
        elif request.framing == "chunked":
            self.mode = self.CHUNK_SIZE
        elif request.framing == "opaque":
            self.mode = self.OPAQUE
        else:
            self.mode = self.HEAD


def page(status, title, message, extra_headers=(), body_extra=""):
    """A complete small HTML response that closes the connection."""
    reason = {200: "OK", 302: "Found", 303: "See Other", 400: "Bad Request",
              401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              413: "Content Too Large", 421: "Misdirected Request", 429: "Too Many Requests",
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


#: Longer cookie values are not tokens (one is about 35 characters).
_MAX_TOKEN = 128


class Tokens:
    """
    Signed cookies proving a terminal gave a device's access credential:
    ``expiry.mac``, the MAC over the cookie's name, the device ID, the
    expiry and the credential's stored hash (so a new credential voids old
    cookies, and a token got over plain HTTP is no HTTPS cookie).
    """

    def __init__(self, secret, clock, lifetime=12 * 3600):
        self.secret = secret
        self.clock = clock
        self.lifetime = lifetime

    def _mac(self, cookie, device_id, expiry, credential_hash):
        msg = f"{cookie}|{device_id}|{expiry}|{credential_hash}".encode()
        return base64.urlsafe_b64encode(hmac.new(self.secret, msg, hashlib.sha256).digest()[:18]
                                        ).decode()

    def make(self, device_id, credential_hash, cookie=COOKIE):
        """A token for cookie C{cookie} of this device and credential."""
        expiry = int(self.clock.seconds() + self.lifetime)
        return f"{expiry}.{self._mac(cookie, device_id, expiry, credential_hash)}"

    def check(self, token, device_id, credential_hash, cookie=COOKIE):
        """
        Whether C{token} (any cookie value a terminal sent) is one L{make}
        gave for this cookie name, device and credential, and has not
        expired.  Never raises.
        """
        if not token or len(token) > _MAX_TOKEN or not token.isascii():
            return False
        expiry, _, mac = token.partition(".")
        # isdigit() alone passes "²", which int() refuses.
        if not (expiry.isascii() and expiry.isdigit()) or int(expiry) < self.clock.seconds():
            return False
        return hmac.compare_digest(mac, self._mac(cookie, device_id, int(expiry),
                                                  credential_hash))

    def check_any(self, tokens, device_id, credential_hash, cookie=COOKIE):
        """Whether any of C{tokens} (every cookie of the name sent) passes L{check}."""
        return any(self.check(t, device_id, credential_hash, cookie) for t in tokens)
