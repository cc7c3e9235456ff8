# -*- test-case-name: tests.unit.test_admin_auth -*-
"""
Who may use the admin page, and that a revoke is what the admin meant.

- The admin signs in with the page's own credential (a scrypt hash in
  ``admin.credential_file``, made by ``p2pnat cluster admin-password``);
  guesses are limited before any hashing, as for devices' credentials
  (L{p2pnat.relay.credentials.CredentialChecker}, its own instance).
- A signed-in browser holds a random session token in the cookie
  L{COOKIE} (``__Host-``: Secure, Path=/, no Domain; HttpOnly;
  SameSite=Strict), kept in memory (L{AdminSessions}): a restart signs
  everyone out.
- Every POST but sign-in carries a CSRF token tied to the session
  (L{AdminSessions.csrf}), and every POST must come from the page's own
  origin (L{same_origin}); SameSite=Strict already keeps the cookie off
  other sites' requests: three guards, any one of which stops a forged
  revoke.

Pure, on an injected clock.
"""

import base64
import hashlib
import hmac
import os
from collections import OrderedDict
from urllib.parse import urlsplit

__all__ = ["COOKIE", "AdminSessions", "same_origin", "cookie_header"]

#: The admin session cookie: its own name, apart from terminals' login cookie.
COOKIE = "__Host-p2pnat_admin"


class AdminSessions:
    """
    Signed-in admin browsers: random tokens, each valid for C{lifetime}
    seconds after sign-in; at most C{limit} at once (the oldest is signed
    out first).

    @param clock: IReactorTime.
    """

    def __init__(self, clock, lifetime=3600.0, limit=64, random=os.urandom):
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit
        self._random = random
        self._key = random(32)  # CSRF tokens' key: new with every start
        self._sessions = OrderedDict()  # token -> expiry

    def __len__(self):
        return len(self._sessions)

    def open(self):
        """Sign a browser in: its new session token."""
        token = base64.urlsafe_b64encode(self._random(32)).decode().rstrip("=")
        self._sessions[token] = self.clock.seconds() + self.lifetime
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return token

    def valid(self, token):
        """Whether C{token} (None or str) is a signed-in session now."""
        if not token:
            return False
        expiry = self._sessions.get(token)
        if expiry is None:
            return False
        if expiry <= self.clock.seconds():
            del self._sessions[token]
            return False
        return True

    def close(self, token):
        """Sign out."""
        self._sessions.pop(token, None)

    def csrf(self, token):
        """The CSRF token of session C{token}, for the page's forms."""
        return hmac.new(self._key, b"csrf\0" + token.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, token, given):
        """Whether C{given} is the CSRF token of C{token}, a valid session."""
        if not self.valid(token) or not isinstance(given, str):
            return False
        return hmac.compare_digest(self.csrf(token).encode(), given.encode("utf-8", "replace"))


def cookie_header(token, max_age):
    """The Set-Cookie value for session C{token} (None: delete the cookie)."""
    if token is None:
        return f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
    return f"{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={int(max_age)}"


def _origin_of(url):
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return None
    try:
        port = parts.port or 443
    except ValueError:
        return None
    return parts.hostname.lower(), port


def same_origin(origin, referer, host):
    """
    Whether a POST comes from the admin page's own origin,
    ``https://HOST``: by its ``Origin`` header (every current browser
    sends it on a POST), else by its ``Referer``; a request with neither,
    or with ``Origin: null``, is refused.

    @param host: the request's ``Host`` header (the page's own name and port).
    """
    if not host:
        return False
    want = _origin_of("https://" + host)
    if want is None:
        return False
    given = origin if origin is not None else referer
    return bool(given) and _origin_of(given) == want
