# -*- test-case-name: tests.unit.test_admin_web,tests.process.test_admin -*-
"""
The admin page's twisted.web side: one resource that signs the admin in,
shows the overview, and revokes a device; and L{RelayView}, which reads
what the overview shows from a running relay.

Routes (all HTTPS; every answer has L{view.CSP}, no-store, nosniff, no
framing):

- ``GET /admin.css``: the stylesheet (the one asset);
- ``GET /login``, ``POST /login`` (``password``): sign in;
- ``GET /``: the overview;
- ``GET /revoke?device=ID``: asks before revoking;
- ``POST /revoke`` (``device``, ``csrf``): revokes, then back to ``/``;
- ``POST /logout`` (``csrf``): sign out.

A request body larger than L{MAX_BODY} bytes closes the connection.
"""

from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource

from p2pnat.cluster.state import ClusterUnavailable, NodeInfo
from p2pnat.cluster.stats import read_stats
from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.relay.admin import view
from p2pnat.relay.admin.auth import COOKIE, cookie_header, same_origin
from p2pnat.relay.credentials import NotChecked, source_of

__all__ = ["AdminResource", "AdminSite", "RelayView", "MAX_BODY"]

#: Largest request body the admin page reads (its forms are a few dozen bytes).
MAX_BODY = 8192
#: The guess limits' "device" for the admin credential.
ADMIN = "admin"


class RelayView:
    """
    What the admin page reads from, and does to, a running relay node.

    @param service: the L{p2pnat.relay.tap.RelayService}.
    """

    def __init__(self, service):
        self.service = service
        self.hostname = service.hostname

    def overview(self):
        """Deferred firing with the L{view.Overview} of now."""
        return Deferred.fromCoroutine(self._overview())

    async def _overview(self):
        s = self.service
        cluster = s.cluster
        now = s.reactor.seconds()
        problem = None
        here = s.stats(now)
        try:
            nodes = await cluster.nodes()
            entries = await cluster.live_entries()
            stats = await read_stats(cluster.link.command) if cluster.shared else {}
        except ClusterUnavailable as e:
            problem = (f"The cluster's shared state is unreachable ({e}): only this node's"
                       " devices and traffic are shown.")
            nodes, entries, stats = [], s.own_live(), {}
        stats[cluster.node] = here
        # This node as it is now (Redis may not list it at the moment).
        host, port = s.tunnel_address()
        nodes = [NodeInfo(cluster.node, tuple(cluster.addresses), host, port, now)] + [
            n for n in nodes if n.name != cluster.node]
        owned = {}
        for e in entries:
            owned[e.node] = owned.get(e.node, 0) + 1
        rows = [view.NodeRow(n.name, tuple(n.addresses),
                             f"{n.tunnel_host}:{n.tunnel_port}" if n.tunnel_port else None,
                             n.seen if cluster.shared else None, owned.get(n.name, 0),
                             stats.get(n.name), n.name == cluster.node) for n in nodes]
        devices = [(d.id, d.revoked, d.last_access) for d in s.table]
        tunnels = {device_id: len(t) for device_id, t in s.relay.tunnels.items()}
        return view.Overview(
            s.hostname, cluster.node, cluster.shared, now, rows,
            view.device_rows(devices, {e.device_id: e for e in entries}, tunnels,
                             s.table.period, now), problem)

    def device_state(self, device_id):
        """``"active"``, ``"revoked"``, or None for a device the node does not know."""
        d = self.service.table.get(device_id)
        if d is None:
            return None
        return "revoked" if d.revoked else "active"

    def revoke(self, device_id):
        """Revoke C{device_id} cluster-wide (L{p2pnat.relay.tap.RelayService.revoke})."""
        return self.service.revoke(device_id)


class _Request(server.Request):
    """A request whose body may not exceed L{MAX_BODY} bytes."""

    _received = 0

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        super().handleContentChunk(data)


class AdminSite(server.Site):
    """The admin page's site: no access log of its own (the resource logs what matters)."""

    requestFactory = _Request
    displayTracebacks = False

    def log(self, request):
        pass


class AdminResource(Resource):
    """
    The whole admin page.

    @param source: a L{RelayView} (or an object with its methods).
    @param sessions: the L{p2pnat.relay.admin.auth.AdminSessions}.
    @param checker: a L{p2pnat.relay.credentials.CredentialChecker} of the
        page's own (its guess limits are the page's).
    @param stored: the admin credential's scrypt hash.
    """

    isLeaf = True
    log = Logger(namespace="p2pnat.relay.admin")

    def __init__(self, source, sessions, checker, stored):
        super().__init__()
        self.source = source
        self.sessions = sessions
        self.checker = checker
        self._stored = stored
        self._throttle = Throttle(sessions.clock, interval=60.0)

    # -- helpers ----------------------------------------------------------------

    def _headers(self, request):
        for name, value in (("Content-Security-Policy", view.CSP),
                            ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff"),
                            ("X-Frame-Options", "DENY"),
                            ("Referrer-Policy", "same-origin"),
                            ("Strict-Transport-Security", "max-age=31536000")):
            request.setHeader(name, value)

    def _html(self, request, body, status=200):
        request.setResponseCode(status)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        return body

    def _redirect(self, request, location):
        request.setResponseCode(303)
        request.setHeader("Location", location)
        return b""

    def _arg(self, request, name):
        values = request.args.get(name.encode())
        if not values or len(values) != 1:
            return None
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _token(self, request):
        token = request.getCookie(COOKIE.encode())
        try:
            return token.decode("ascii") if token else None
        except UnicodeDecodeError:
            return None

    def _source(self, request):
        peer = request.getClientAddress()
        return source_of(f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', 0)}")

    def _refuse(self, request, why, **fields):
        held = self._throttle(("refused", why))
        if held is not None:
            self.log.warn("admin page refused a request from {source}: {why} ({held} more"
                          " since the last such line)", source=self._source(request), why=why,
                          held=held, **fields)
        return self._html(request, view.render_message(
            "Refused", "This request did not come from a signed-in admin page; go back,"
            " reload the page and try again."), 403)

    def _post_allowed(self, request, token, csrf=True):
        """Whether a POST is from this page's origin (and, with C{csrf}, its session)."""
        header = request.getHeader
        if not same_origin(header("origin"), header("referer"), header("host")):
            return False
        return not csrf or self.sessions.check_csrf(token, self._arg(request, "csrf"))

    # -- routes -------------------------------------------------------------------

    def render(self, request):
        self._headers(request)
        path, method = request.path, request.method
        if path == b"/admin.css" and method in (b"GET", b"HEAD"):
            request.setHeader("Content-Type", "text/css; charset=utf-8")
            return view.STYLE.encode()
        token = self._token(request)
        signed_in = self.sessions.valid(token)
        if path == b"/login":
            if method == b"POST":
                return self._login(request)
            if method in (b"GET", b"HEAD"):
                return (self._redirect(request, "/") if signed_in else
                        self._html(request, view.render_login(self.source.hostname)))
        elif not signed_in:
            if method in (b"GET", b"HEAD"):
                return self._redirect(request, "/login")
            return self._refuse(request, "not signed in")
        elif path == b"/" and method in (b"GET", b"HEAD"):
            return self._overview(request, token)
        elif path == b"/revoke" and method in (b"GET", b"HEAD"):
            return self._confirm(request, token)
        elif path == b"/revoke" and method == b"POST":
            return self._revoke(request, token)
        elif path == b"/logout" and method == b"POST":
            if not self._post_allowed(request, token):
                return self._refuse(request, "sign-out without this page's origin and token")
            self.sessions.close(token)
            request.setHeader("Set-Cookie", cookie_header(None, 0))
            return self._redirect(request, "/login")
        return self._html(request, view.render_message("Not found", "No such page."), 404)

    def _login(self, request):
        if not self._post_allowed(request, None, csrf=False):
            return self._refuse(request, "sign-in from another origin")
        source = self._source(request)
        given = self._arg(request, "password") or ""
        d = self.checker.check(ADMIN, self._stored, given, source)

        def checked(ok):
            if not ok:
                self.log.info("admin sign-in failed from {source}", source=source)
                request.write(self._html(request, view.render_login(
                    self.source.hostname, "Wrong password."), 401))
            else:
                self.log.info("admin signed in from {source}", source=source)
                request.setHeader("Set-Cookie", cookie_header(self.sessions.open(),
                                                              self.sessions.lifetime))
                request.write(self._redirect(request, "/"))

        def refused(failure):
            failure.trap(NotChecked)
            e = failure.value
            request.setHeader("Retry-After", str(e.retry_after))
            request.write(self._html(request, view.render_login(self.source.hostname, str(e)),
                                     e.status))

        self._finish(request, d.addCallbacks(checked, refused))
        return server.NOT_DONE_YET

    def _finish(self, request, d):
        def failed(failure):
            self.log.failure("admin page failed", failure)
            if not request.startedWriting:
                request.write(self._html(request, view.render_message(
                    "Error", "The page could not be made; see the relay's log."), 500))

        def done(_):
            if not request._disconnected and not request.finished:
                request.finish()

        d.addErrback(failed).addBoth(done)

    def _overview(self, request, token):
        revoked = self._arg(request, "revoked")
        notice = f"Device {revoked} revoked." if revoked else None

        def show(overview):
            request.write(self._html(request, view.render_overview(
                overview, self.sessions.csrf(token), notice)))

        self._finish(request, self.source.overview().addCallback(show))
        return server.NOT_DONE_YET

    def _confirm(self, request, token):
        device_id = self._arg(request, "device")
        state = device_id and self.source.device_state(device_id)
        if state is None:
            return self._html(request, view.render_message("Not found", "No such device."), 404)
        return self._html(request, view.render_confirm(
            self.source.hostname, device_id, state, self.sessions.csrf(token)))

    def _revoke(self, request, token):
        if not self._post_allowed(request, token):
            return self._refuse(request, "revoke without this page's origin and token")
        device_id = self._arg(request, "device")
        if not device_id or self.source.device_state(device_id) is None:
            return self._html(request, view.render_message("Not found", "No such device."), 404)
        self.source.revoke(device_id)
        self.log.info("device {device_id} revoked from the admin page by {source}",
                      device_id=device_id, source=self._source(request))
        return self._redirect(request, "/?revoked=" + quote(device_id, safe=""))
