# -*- test-case-name: tests.unit.test_admin_view -*-
"""
What the admin page shows, as plain data (L{Overview}), and its HTML.

Pure: no I/O, times passed in.  Every piece of text that comes from
outside (device IDs, addresses, node names, all of which devices, nodes or
Redis's contents may influence) goes through L{esc} or L{quote_param}; the
pages load nothing but their own stylesheet (L{STYLE}), so the
Content-Security-Policy (L{CSP}) can forbid everything else, scripts
included.
"""

import datetime
import html
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["CSP", "STYLE", "DeviceRow", "NodeRow", "Overview", "device_rows", "esc",
           "render_overview", "render_login", "render_confirm", "render_message"]

#: No script, no frame, no other origin; the stylesheet is the page's own file.
CSP = ("default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none';"
       " base-uri 'none'")

#: Devices listed on the page at most (the rest: ``p2pnat cluster status --devices``).
MAX_DEVICES = 2000

STYLE = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; }
header { display: flex; align-items: baseline; gap: 1.5em; flex-wrap: wrap; }
h1 { font-size: 1.4em; margin: 0; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; min-width: 60%; }
th, td { text-align: left; padding: .3em .8em; border-bottom: 1px solid #dde2ea;
         white-space: nowrap; }
th { background: #eef1f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.online { color: #116b2e; font-weight: 600; } .revoked { color: #9b1c1c; }
.stale, .offline, .gone { color: #6b7280; }
.notice { padding: .6em 1em; background: #e8f3ec; border-left: 4px solid #116b2e; }
.problem { padding: .6em 1em; background: #fdecec; border-left: 4px solid #9b1c1c; }
button { font: inherit; padding: .25em .9em; cursor: pointer; }
button.danger { background: #9b1c1c; color: #fff; border: 0; border-radius: 3px; }
form.inline { display: inline; } .muted { color: #6b7280; }
"""


def esc(value):
    """Text for HTML (element content or a quoted attribute); None as a dash."""
    return "\u2014" if value is None else html.escape(str(value), quote=True)


def quote_param(value):
    """A value for a URL's query string (then escaped for HTML by the caller)."""
    return quote(str(value), safe="")


@dataclass(frozen=True)
class DeviceRow:
    """
    One device as the page lists it: C{state} is ``online``, ``stale`` (its
    last notify A is older than the access-check period), ``offline`` (no
    node has it live) or ``revoked``; C{node} the node its notifies reach,
    C{nat} its NAT mapping (``host:port``), C{tunnels} its tunnels open on
    this node.
    """

    id: str
    state: str
    node: str | None
    nat: str | None
    last_access: float | None
    tunnels: int = 0


@dataclass(frozen=True)
class NodeRow:
    """
    A node: C{seen} is its last heartbeat (POSIX seconds, None on a single
    node), C{devices} how many devices it owns (live entries naming it),
    C{stats} its L{p2pnat.cluster.stats.NodeStats} or None.
    """

    name: str
    addresses: tuple
    tunnel: str | None
    seen: float | None
    devices: int
    stats: object = None
    this: bool = False


@dataclass(frozen=True)
class Overview:
    """
    Everything on the main page.  C{problem}: why part of it is missing
    (the shared state unreachable), or None.
    """

    hostname: str
    node: str
    shared: bool
    now: float
    nodes: list
    devices: list
    problem: str | None = None


def _format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def device_rows(devices, entries, tunnels, period, now):
    """
    The page's device rows.

    @param devices: C{(device_id, revoked, last_access)} of every device in
        the registry.
    @param entries: L{p2pnat.cluster.state.LiveEntry} by device ID.
    @param tunnels: device ID -> tunnels open on this node.
    @param period: the access-check period, seconds.
    """
    rows = []
    for device_id, revoked, last_access in sorted(devices):
        # A revoked device's live entry may outlive it (until it expires): not shown.
        entry = None if revoked else entries.get(device_id)
        if revoked:
            state = "revoked"
        elif entry is None:
            state = "offline"
        else:
            state = "stale" if entry.stale(now, period) else "online"
        if entry is not None:
            last_access = entry.last_access if entry.last_access is not None else last_access
        rows.append(DeviceRow(
            device_id, state, entry.node if entry else None,
            _format_addr(entry.host, entry.port) if entry else None, last_access,
            tunnels.get(device_id, 0)))
    return rows


def format_time(t, now):
    """C{t} as UTC and how long ago, e.g. ``2026-01-02 03:04:05Z (12 s ago)``."""
    if t is None:
        return None
    when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return f"{when:%Y-%m-%d %H:%M:%S}Z ({format_age(now - t)})"


def format_age(seconds):
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _page(title, body):
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width\">"
            f"<title>{esc(title)}</title><link rel=\"stylesheet\" href=\"/admin.css\">"
            f"</head><body>{body}</body></html>\n").encode("utf-8")


def _row(cells, **attrs):
    a = "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    return f"<tr{a}>" + "".join(cells) + "</tr>"


def _td(value, cls=None):
    return f'<td class="{cls}">{esc(value)}</td>' if cls else f"<td>{esc(value)}</td>"


def _nodes_table(overview):
    head = ("<tr><th>Node</th><th>Addresses</th><th>Tunnels to</th><th>Heartbeat</th>"
            "<th>Devices</th><th>Sessions</th><th>Tunnels</th><th>Streams</th>"
            "<th>Terminals</th><th>From devices</th><th>To devices</th></tr>")
    rows = []
    for n in overview.nodes:
        s = n.stats
        name = n.name + (" (this node)" if n.this else "")
        traffic = ([_td(s.sessions, "n"), _td(s.tunnels, "n"), _td(s.streams, "n"),
                    _td(s.terminals, "n"), _td(format_bytes(s.bytes_from_devices), "n"),
                    _td(format_bytes(s.bytes_to_devices), "n")] if s is not None
                   else [_td(None)] * 6)
        rows.append(_row([_td(name), _td(", ".join(n.addresses) or None), _td(n.tunnel),
                          _td(format_time(n.seen, overview.now) if n.seen else "single node"),
                          _td(n.devices, "n")] + traffic, data_node=n.name))
    return f'<table id="nodes">{head}{"".join(rows)}</table>'


def _devices_table(overview, csrf):
    head = ("<tr><th>Device</th><th>State</th><th>Owning node</th><th>NAT address</th>"
            "<th>Last access</th><th>Tunnels here</th><th></th></tr>")
    rows = []
    for d in overview.devices[:MAX_DEVICES]:
        action = "" if d.state == "revoked" else (
            f'<a href="/revoke?device={esc(quote_param(d.id))}">Revoke\u2026</a>')
        rows.append(_row([_td(d.id), _td(d.state, d.state), _td(d.node), _td(d.nat),
                          _td(format_time(d.last_access, overview.now)),
                          _td(d.tunnels, "n"), f"<td>{action}</td>"], data_device=d.id))
    more = len(overview.devices) - MAX_DEVICES
    note = (f'<p class="muted">{more} more devices not listed: <code>p2pnat cluster status'
            " --devices</code> lists them all.</p>") if more > 0 else ""
    return f'<table id="devices">{head}{"".join(rows)}</table>{note}'


def render_overview(overview, csrf, notice=None):
    """The main page (bytes, UTF-8)."""
    online = sum(1 for d in overview.devices if d.state == "online")
    kind = (f"cluster of {len(overview.nodes)} live nodes" if overview.shared
            else "single node")
    parts = [
        "<header>",
        f"<h1>Relay {esc(overview.hostname)}</h1>",
        f'<p>node <b id="this-node">{esc(overview.node)}</b> \u00b7 {esc(kind)} \u00b7 '
        f'<span id="online-count">{online}</span> of {len(overview.devices)} devices online'
        f" \u00b7 {esc(format_time(overview.now, overview.now)[:20])}</p>",
        '<form class="inline" method="post" action="/logout">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit" id="sign-out">Sign out</button></form>',
        "</header>",
    ]
    if notice:
        parts.append(f'<p class="notice" id="notice">{esc(notice)}</p>')
    if overview.problem:
        parts.append(f'<p class="problem" id="problem">{esc(overview.problem)}</p>')
    parts += ["<h2>Nodes and traffic</h2>", _nodes_table(overview),
              '<p class="muted">Sessions: terminals waiting for a new tunnel. Streams:'
              " tunnels carrying a terminal's traffic now. Bytes since each node"
              " started.</p>",
              "<h2>Devices</h2>", _devices_table(overview, csrf)]
    return _page(f"p2pnat relay admin \u2014 {overview.hostname}", "".join(parts))


def render_login(hostname, error=None):
    """The sign-in page."""
    message = f'<p class="problem" id="error">{esc(error)}</p>' if error else ""
    return _page(f"Sign in \u2014 p2pnat relay admin \u2014 {hostname}", (
        f"<h1>Relay {esc(hostname)}: admin</h1>{message}"
        '<form method="post" action="/login">'
        '<label for="password">Admin password</label> '
        '<input type="password" id="password" name="password" autocomplete="current-password"'
        ' required autofocus> <button type="submit" id="sign-in">Sign in</button></form>'))


def render_confirm(hostname, device_id, state, csrf):
    """The page that asks before a device is revoked."""
    return _page(f"Revoke {device_id}? \u2014 p2pnat relay admin", (
        f"<h1>Revoke device {esc(device_id)}?</h1>"
        f"<p>It is {esc(state)} now. Revoking it closes its tunnels on every node and"
        " refuses it from then on; only provisioning it again"
        " (<code>p2pnat device add ID --replace</code>) undoes that.</p>"
        '<form method="post" action="/revoke">'
        f'<input type="hidden" name="device" value="{esc(device_id)}">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<button type="submit" class="danger" id="confirm">Revoke {esc(device_id)}</button>'
        ' <a href="/">Cancel</a></form>'))


def render_message(title, text, back=True):
    """A page with one message (errors, refusals)."""
    link = '<p><a href="/">Back</a></p>' if back else ""
    return _page(title, f"<h1>{esc(title)}</h1><p id=\"message\">{esc(text)}</p>{link}")
