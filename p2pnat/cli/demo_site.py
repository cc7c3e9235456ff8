# -*- test-case-name: tests.process.test_demo -*-
"""
The sample device web UI of ``p2pnat demo``: what an appliance serves on
its LAN, used unchanged through the relay.

It has what real device UIs have and what a relay could break: absolute
links (``href="/style.css"``) that must resolve under the device's host
name, a stylesheet, a script that changes the page, an image, a form that
POSTs and is answered with a 303 redirect, and a cookie set by the server
and sent back by the browser.

Pages:

- ``/``: the device page (its name, the host it was reached under, the
  settings form, the cookie the browser sent);
- ``/style.css``, ``/app.js``, ``/logo.png`` (a PNG made in code);
- ``POST /settings`` (field ``name``): stores the name, sets the cookie
  ``demo_name`` and redirects (303) to ``/saved``;
- ``/saved``: shows the stored name and the cookie the browser sent back.
"""

import html
import struct
import zlib
from urllib.parse import quote, unquote

from twisted.web import resource, server

MAX_NAME = 64
COOKIE = b"demo_name"

STYLE = b"""\
body { font: 16px/1.45 system-ui, sans-serif; margin: 0; color: #1d2733; background: #f4f6f9; }
.banner { display: flex; align-items: center; gap: 14px; padding: 14px 24px;
          background: rgb(20, 90, 160); color: #fff; }
.banner h1 { margin: 0; font-size: 24px; }
main { max-width: 40em; margin: 24px auto; padding: 0 16px; }
section { background: #fff; border-radius: 8px; padding: 4px 20px 16px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
.status { padding: 8px 12px; border-radius: 6px; background: #fde2e1; color: #8a1c17; }
.status.ok { background: #dff3e4; color: #19692c; }
input, button { font: inherit; padding: 5px 10px; }
button { background: rgb(20, 90, 160); color: #fff; border: 0; border-radius: 5px; }
code { background: #e8edf3; padding: 1px 5px; border-radius: 4px; }
"""

SCRIPT = b"""\
// Runs in the browser: proves the script was fetched through the relay.
document.addEventListener("DOMContentLoaded", function () {
  var status = document.getElementById("script-status");
  status.textContent = "script ran";
  status.className = "status ok";
  var where = document.getElementById("location");
  if (where) where.textContent = window.location.origin;
});
"""


def png(width, height, pixel):
    """
    A PNG image (8-bit RGBA, no interlace) of C{pixel(x, y)} ->
    ``(r, g, b, a)``, written with zlib and struct only.
    """
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(pixel(x, y))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b""))


def _logo_pixel(x, y, size=64):
    """Two white nodes joined by a line on a rounded orange square: peer to peer."""
    r = 12
    cx, cy = min(max(x, r), size - 1 - r), min(max(y, r), size - 1 - r)
    if (x - cx) ** 2 + (y - cy) ** 2 > r * r:
        return (0, 0, 0, 0)
    for nx, ny in ((18, 44), (46, 20)):
        if (x - nx) ** 2 + (y - ny) ** 2 <= 49:
            return (255, 255, 255, 255)
    # The segment between the nodes, 4 px wide: distance to the line x + y = 64.
    if 18 <= x <= 46 and abs(x + y - 64) <= 3:
        return (255, 255, 255, 255)
    return (240, 140, 30, 255)


LOGO = png(64, 64, _logo_pixel)


def _layout(title, body):
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        "<link rel='stylesheet' href='/style.css'>"
        "<link rel='icon' href='/logo.png'>"
        "<script src='/app.js'></script></head><body>"
        "<header class='banner'><a href='/'><img id='logo' src='/logo.png' width='48'"
        " height='48' alt='logo'></a>"
        f"<h1>{html.escape(title)}</h1></header><main>"
        "<p id='script-status' class='status'>script did not run</p>"
        f"{body}</main></body></html>").encode()


def _cookie_value(request):
    raw = request.getCookie(COOKIE)
    if raw is None:
        return None
    return unquote(raw.decode("latin-1"))


def _cookie_text(request):
    value = _cookie_value(request)
    if value is None:
        return "<span id='cookie'>(none yet: save the form)</span>"
    return f"<code id='cookie'>{html.escape(value)}</code>"


class _Get(resource.Resource):
    """
    A leaf answering GET with C{render(request)}, of C{content_type}.
    Pages are C{no-store} (they show the current setting); assets are
    C{no-cache}: kept, but checked again on every use.
    """

    isLeaf = True

    def __init__(self, render, content_type=b"text/html; charset=utf-8", cache=b"no-store"):
        super().__init__()
        self._render = render
        self.content_type = content_type
        self.cache = cache

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", self.cache)
        return self._render(request)


def _static(body, content_type):
    return _Get(lambda request: body, content_type, b"no-cache")


class _Settings(resource.Resource):
    isLeaf = True

    def __init__(self, device):
        super().__init__()
        self.device = device

    def render_POST(self, request):
        values = request.args.get(b"name") or [b""]
        name = values[0].decode("utf-8", "replace").strip()
        if not name or len(name) > MAX_NAME:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return _layout("Not saved", f"<section><p>The name must be 1 to {MAX_NAME}"
                                        " characters.</p><p><a href='/'>Back</a></p></section>")
        self.device.name = name
        request.addCookie(COOKIE, quote(name, safe="").encode("ascii"), path=b"/",
                          httpOnly=True, sameSite="lax")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/saved")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Saved; see /saved\n"


class DeviceUI:
    """
    The sample device: its one setting (a name) and its web resources.
    """

    def __init__(self, name="demo device"):
        self.name = name

    def index(self, request):
        host = (request.getHeader(b"host") or b"?").decode("latin-1")
        return _layout("Demo device", f"""
<section><h2>Hello from the device</h2>
<p>This page comes from a small web server on the device, reached through the p2pnat
relay as <code id='host'>{html.escape(host)}</code> (browser origin
<code id='location'>?</code>). The stylesheet, script and logo above are separate
requests that took the same path.</p></section>
<section><h2>Settings</h2>
<p>Device name: <strong id='current-name'>{html.escape(self.name)}</strong></p>
<form method='post' action='/settings'>
<label>New name <input id='name-input' name='name' maxlength='{MAX_NAME}' required></label>
<button id='save' type='submit'>Save</button></form>
<p>Cookie your browser sent: {_cookie_text(request)}</p></section>""")

    def saved(self, request):
        return _layout("Settings saved", f"""
<section><h2>Saved</h2>
<p>The device's name is now <strong id='saved-name'>{html.escape(self.name)}</strong>.</p>
<p>Cookie your browser sent back: {_cookie_text(request)}</p>
<p><a id='back' href='/'>Back to the device page</a></p></section>""")

    def resource(self):
        """The site's root resource."""
        root = resource.Resource()
        root.putChild(b"", _Get(self.index))
        root.putChild(b"saved", _Get(self.saved))
        root.putChild(b"settings", _Settings(self))
        root.putChild(b"style.css", _static(STYLE, b"text/css; charset=utf-8"))
        root.putChild(b"app.js", _static(SCRIPT, b"text/javascript; charset=utf-8"))
        root.putChild(b"logo.png", _static(LOGO, b"image/png"))
        return root


def make_site(device=None):
    """A L{server.Site} serving the sample device UI."""
    site = server.Site((device or DeviceUI()).resource())
    site.displayTracebacks = False
    return site
