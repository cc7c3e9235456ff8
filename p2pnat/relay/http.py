# -*- test-case-name: tests.unit.test_relay_terminal -*-
"""
HTTP as the relay's terminal side speaks it, with no I/O: the first
request head parsed once (L{Request}), the relay's own small pages
(L{page}), and the signed login cookies (L{Tokens}).
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
