"""
The admin page's HTML (p2pnat.relay.admin.view): attacker-influenced text
(device IDs, addresses, node names) is escaped everywhere it appears, and
the device rows say what state each device is in.
"""

import re

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster.state import LiveEntry
from p2pnat.cluster.stats import NodeStats
from p2pnat.relay.admin import view

NOW = 1_800_000_000.0
EVIL = '<script>alert("x")</script>&"\''


def overview(devices, nodes=None, problem=None):
    nodes = nodes or [view.NodeRow("n1", ("192.0.2.1:7478",), "192.0.2.1:7443", None, 1,
                                   NodeStats("n1", NOW, 1, 2, 1, 3, 2048, 1024), True)]
    return view.Overview("relay.test", "n1", False, NOW, nodes, devices, problem)


class EscapingTests(SynchronousTestCase):
    def assertNoMarkup(self, page):
        text = page.decode()
        self.assertNotIn("<script", text)
        self.assertNotIn('alert("x")', text)
        self.assertIn("&lt;script&gt;", text)

    def test_device_fields_are_escaped(self):
        rows = [view.DeviceRow(EVIL, "online", EVIL, EVIL, NOW - 5, 1)]
        page = view.render_overview(overview(rows), "c" * 64)
        self.assertNoMarkup(page)
        # The revoke link's query is URL-quoted, then escaped.
        self.assertIn('href="/revoke?device=%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E'
                      '%26%22%27"', page.decode())

    def test_node_fields_and_notices_are_escaped(self):
        nodes = [view.NodeRow(EVIL, (EVIL,), EVIL, NOW - 3, 0, None, False)]
        page = view.render_overview(overview([], nodes, problem=EVIL), "c", notice=EVIL)
        self.assertNoMarkup(page)

    def test_confirm_login_and_message_are_escaped(self):
        self.assertNoMarkup(view.render_confirm(EVIL, EVIL, EVIL, EVIL))
        self.assertNoMarkup(view.render_login(EVIL, EVIL))
        self.assertNoMarkup(view.render_message(EVIL, EVIL))

    def test_attributes_cannot_be_broken_out_of(self):
        page = view.render_confirm("relay.test", 'x" onclick="evil', "active", 'y"><b>')
        self.assertNotIn('onclick="evil"', page.decode())
        self.assertIn('value="x&quot; onclick=&quot;evil"', page.decode())
        self.assertIn('value="y&quot;&gt;&lt;b&gt;"', page.decode())

    def test_no_external_assets_no_script(self):
        page = view.render_overview(overview([]), "c").decode()
        self.assertEqual(re.findall(r'(?:src|href)="([^"]*)"', page), ["/admin.css"])
        self.assertNotIn("<script", page)
        self.assertNotIn("style=", page)  # inline styles would need 'unsafe-inline'
        self.assertTrue(view.CSP.startswith("default-src 'none';"))
        self.assertNotIn("unsafe", view.CSP)


class RowsTests(SynchronousTestCase):
    def test_states(self):
        entries = {"a": LiveEntry("a", "n2", "198.51.100.1", 4000, NOW - 10),
                   "r": LiveEntry("r", "n2", "198.51.100.2", 4000, NOW - 10),
                   "s": LiveEntry("s", "n1", "2001:db8::1", 4001, NOW - 1000)}
        rows = view.device_rows([("a", False, None), ("o", False, NOW - 5000),
                                 ("r", True, NOW - 7), ("s", False, None)],
                                entries, {"a": 2}, 300, NOW)
        self.assertEqual([(r.id, r.state, r.node, r.nat, r.tunnels) for r in rows], [
            ("a", "online", "n2", "198.51.100.1:4000", 2),
            ("o", "offline", None, None, 0),
            ("r", "revoked", None, None, 0),
            ("s", "stale", "n1", "[2001:db8::1]:4001", 0)])
        self.assertEqual(rows[1].last_access, NOW - 5000)

    def test_revoked_devices_have_no_revoke_link(self):
        rows = [view.DeviceRow("gone", "revoked", None, None, None)]
        self.assertNotIn("/revoke?", view.render_overview(overview(rows), "c").decode())

    def test_traffic_and_times(self):
        page = view.render_overview(overview([]), "c").decode()
        self.assertIn("2.0 KiB", page)
        self.assertIn("1.0 KiB", page)
        self.assertEqual(view.format_time(NOW - 30, NOW), f"{_utc(NOW - 30)}Z (30 s ago)")

    def test_long_lists_are_cut(self):
        rows = [view.DeviceRow(f"d{i}", "offline", None, None, None)
                for i in range(view.MAX_DEVICES + 5)]
        page = view.render_overview(overview(rows), "c").decode()
        self.assertEqual(page.count("data-device="), view.MAX_DEVICES)
        self.assertIn("5 more devices not listed", page)


def _utc(t):
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")
