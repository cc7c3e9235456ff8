"""
The device agent's relay list (``agent.relay``) and notify sockets
(``udp.listen``): parsing, the clear errors, and the order relays are
tried in.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.agent import relays
from p2pnat.agent.tap import SCHEMA
from p2pnat.daemon import config as C


class ParseRelaysTests(SynchronousTestCase):
    def test_one_string_as_before(self):
        self.assertEqual(relays.parse_relays("relay.example.org:7478"),
                         [("relay.example.org", 7478)])

    def test_list_in_configured_order(self):
        self.assertEqual(
            relays.parse_relays(["b.example.org:7478", "192.0.2.1:7000", "[2001:DB8::1]:7478",
                                 "b.example.org:7478"]),
            [("b.example.org", 7478), ("192.0.2.1", 7000), ("2001:db8::1", 7478)])

    def test_comma_separated_from_the_command_line(self):
        self.assertEqual(relays.parse_relays(" 192.0.2.1:1, [::1]:2 ,"),
                         [("192.0.2.1", 1), ("::1", 2)])

    def test_names_in_lower_case_without_the_root_dot(self):
        self.assertEqual(relays.parse_relays("Relay.Example.ORG.:7478"),
                         [("relay.example.org", 7478)])

    def test_bad_entries(self):
        cases = {
            "": "needs at least one relay address",
            "relay.example.org": "expected host:port",
            "[relay.example.org]:7478": "brackets are for IPv6 addresses only",
            "2001:db8::1:7478": "write an IPv6 relay address as [address]:port",
            "[2001:db8::1]7478": "expected [ipv6]:port",
            "relay_1.example.org:7478": "not an IP address or a host name",
            "-relay.example.org:7478": "not an IP address or a host name",
            "192.0.2.1:0": "port must be 1-65535",
            "192.0.2.1:70000": "bad port",
            "0.0.0.0:7478": "not an address one can send to",
            "[::]:7478": "not an address one can send to",
        }
        for value, why in cases.items():
            with self.assertRaises(ValueError, msg=value) as cm:
                relays.parse_relays(value)
            self.assertIn(why, str(cm.exception), value)
        with self.assertRaises(ValueError) as cm:
            relays.parse_relays(["192.0.2.1:1", 7478])
        self.assertIn("7478", str(cm.exception))
        with self.assertRaises(ValueError):
            relays.parse_relays({"host": "x"})
        with self.assertRaises(ValueError) as cm:
            relays.parse_relays([f"192.0.2.{i}:1" for i in range(relays.MAX_RELAYS + 1)])
        self.assertIn(f"at most {relays.MAX_RELAYS} relays", str(cm.exception))


class ParseListenTests(SynchronousTestCase):
    def test_one_or_one_per_family(self):
        self.assertEqual(relays.parse_listen("0.0.0.0:0"), {4: ("0.0.0.0", 0)})
        self.assertEqual(relays.parse_listen(["[::]:5000", "192.0.2.7:0"]),
                         {6: ("::", 5000), 4: ("192.0.2.7", 0)})

    def test_bad(self):
        for value, why in {"host.example:0": "must be an IP address",
                           "0.0.0.0:0,127.0.0.1:0": "one address per family",
                           "[]": "expected [ipv6]:port",
                           "": "needs at least one address"}.items():
            with self.assertRaises(ValueError, msg=value) as cm:
                relays.parse_listen(value)
            self.assertIn(why, str(cm.exception), value)


class OrderTests(SynchronousTestCase):
    def test_interleave_ipv6_first(self):
        self.assertEqual(
            relays.interleave(["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:DB8::1",
                               "2001:db8::2", "192.0.2.1"]),
            ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "192.0.2.3"])
        self.assertEqual(relays.interleave(["192.0.2.1"]), ["192.0.2.1"])
        self.assertEqual(relays.interleave([]), [])

    def test_candidates_follow_the_configured_order(self):
        entries = relays.parse_relays(["192.0.2.9:7478", "r.example:7478", "[::1]:7000"])
        resolved = {"r.example": ["192.0.2.1", "2001:db8::1", "192.0.2.9"]}
        self.assertEqual(relays.candidates(entries, resolved),
                         [("192.0.2.9", 7478), ("2001:db8::1", 7478), ("192.0.2.1", 7478),
                          ("::1", 7000)])
        # A name that resolved to nothing adds nothing.
        self.assertEqual(relays.candidates(entries, {}), [("192.0.2.9", 7478), ("::1", 7000)])


class RingTests(SynchronousTestCase):
    def test_advance_and_wrap(self):
        ring = relays.RelayRing(relays.parse_relays(["192.0.2.1:1", "192.0.2.2:1"]))
        self.assertIsNone(ring.current)
        self.assertTrue(ring.advance())  # nothing to move to: resolve first
        ring.reload({})
        self.assertEqual(ring.current, ("192.0.2.1", 1))
        self.assertFalse(ring.advance())
        self.assertEqual(ring.current, ("192.0.2.2", 1))
        self.assertTrue(ring.advance())
        self.assertEqual(ring.current, ("192.0.2.1", 1))

    def test_reload_keeps_the_current_address(self):
        ring = relays.RelayRing(relays.parse_relays(["r.example:7478"]))
        self.assertEqual(ring.names, ["r.example"])
        ring.reload({"r.example": ["192.0.2.1", "192.0.2.2"]})
        ring.advance()
        self.assertEqual(ring.current, ("192.0.2.2", 7478))
        # DNS now lists another address first: the agent stays where it is.
        ring.reload({"r.example": ["192.0.2.3", "192.0.2.2"]})
        self.assertEqual(ring.current, ("192.0.2.2", 7478))
        # Gone from DNS: back to the first.
        ring.reload({"r.example": ["192.0.2.4"]})
        self.assertEqual(ring.current, ("192.0.2.4", 7478))


class ConfigTests(SynchronousTestCase):
    """The settings as a config file and the command line give them."""

    def load(self, text, **overrides):
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write(text)
        return C.load(self.path, SCHEMA, overrides)

    def test_string_list_and_command_line(self):
        c = self.load('[agent]\nrelay = ["a.example:7478", "[2001:db8::1]:7478"]\n'
                      'dead_after = 12\n[udp]\nlisten = ["0.0.0.0:0", "[::]:0"]\n')
        self.assertEqual(c["agent.relay"], ["a.example:7478", "[2001:db8::1]:7478"])
        self.assertEqual(c["agent.dead_after"], 12.0)
        self.assertEqual(relays.parse_listen(c["udp.listen"]), {4: ("0.0.0.0", 0), 6: ("::", 0)})
        c = self.load('[agent]\nrelay = "a.example:7478"\n',
                      **{"agent.relay": "a.example:1,b.example:2"})
        self.assertEqual(relays.parse_relays(c["agent.relay"]),
                         [("a.example", 1), ("b.example", 2)])
        self.assertEqual(self.load("")["agent.dead_after"], 30.0)

    def test_errors_name_the_file_and_the_key(self):
        for text, why in [
                ('[agent]\nrelay = ["a.example:7478", "2001:db8::1:7478"]\n',
                 ("agent.relay: '2001:db8::1:7478': write an IPv6 relay address as"
                  " [address]:port")),
                ("[agent]\nrelay = 7478\n", "agent.relay: expected \"host:port\" or a list"),
                ("[agent]\nrelay = []\n", "agent.relay: needs at least one relay address"),
                ("[agent]\ndead_after = 2\n", "agent.dead_after: must be 5 to 86400 seconds"),
                ('[udp]\nlisten = ["0.0.0.0:0", "10.0.0.1:0"]\n',
                 "udp.listen: '10.0.0.1:0': one address per family")]:
            with self.assertRaises(C.ConfigError, msg=text) as cm:
                self.load(text)
            self.assertTrue(str(cm.exception).startswith(f"{self.path}: {why}"),
                            str(cm.exception))
