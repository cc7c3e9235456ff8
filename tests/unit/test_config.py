"""
Tests for L{p2pnat.daemon.config}: every error names the file and the key.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon import config as C
from tests.support import procs

SCHEMA = [
    C.Setting("a.port", int, 5, "a port", C.port_number),
    C.Setting("a.name", str, "x", "a name"),
    C.Setting("a.on", bool, False, "a flag"),
    C.Setting("a.ratio", float, 1.5, "a ratio", C.positive),
    C.Setting("udp.listen", list, ["0.0.0.0:1"], "addresses", C.udp_addresses, item=str),
    C.Setting("a.dir", str, "state", "a path"),
] + C.COMMON


class LoadTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def error(self, text, overrides=None):
        path = self.write(text)
        with self.assertRaises(C.ConfigError) as cm:
            C.load(path, SCHEMA, overrides)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        return path, message

    def test_defaults(self):
        c = C.load(None, SCHEMA)
        self.assertEqual((c["a.port"], c["a.name"], c["a.on"]), (5, "x", False))
        self.assertEqual(c["log.level"], "info")

    def test_file_then_cli(self):
        path = self.write('[a]\nport = 7\nname = "y"\nratio = 2\n')
        c = C.load(path, SCHEMA, {"a.port": "8", "a.name": None})
        self.assertEqual((c["a.port"], c["a.name"], c["a.ratio"]), (8, "y", 2.0))

    def test_cli_types(self):
        c = C.load(None, SCHEMA, {"a.on": "yes", "udp.listen": "1.2.3.4:5, [::1]:6",
                                  "a.ratio": "0.25"})
        self.assertEqual(c["a.on"], True)
        self.assertEqual(c["udp.listen"], ["1.2.3.4:5", "[::1]:6"])
        self.assertEqual(c["a.ratio"], 0.25)

    def test_missing_file(self):
        with self.assertRaises(C.ConfigError) as cm:
            C.load("/nonexistent/x.toml", SCHEMA)
        self.assertEqual(str(cm.exception), "/nonexistent/x.toml: no such config file")

    def test_syntax_error(self):
        path, message = self.error("[a\nport=1")
        self.assertTrue(message.startswith(f"{path}: not valid TOML"))

    def test_unknown_key(self):
        path, message = self.error("[a]\nprot = 1\n")
        self.assertEqual(message, f"{path}: a.prot: unknown key")
        path, message = self.error("[b]\nx = 1\n")
        self.assertEqual(message, f"{path}: b.x: unknown key")

    def test_wrong_type(self):
        path, message = self.error('[a]\nport = "80"\n')
        self.assertEqual(message, f"{path}: a.port: expected an integer, got '80'")
        path, message = self.error("[a]\nport = true\n")
        self.assertIn("a.port: expected an integer", message)
        path, message = self.error("[udp]\nlisten = [1]\n")
        self.assertIn("udp.listen: expected a list of strings", message)

    def test_bad_value(self):
        path, message = self.error("[a]\nport = 70000\n")
        self.assertEqual(message, f"{path}: a.port: not a port number: 70000")
        path, message = self.error('[udp]\nlisten = ["relay.example.org:5"]\n')
        self.assertIn("udp.listen: 'relay.example.org:5': listen address must be an IP", message)
        path, message = self.error('[log]\nlevel = "loud"\n')
        self.assertIn("log.level: must be one of debug, info, warn, error", message)
        path, message = self.error("[a]\nratio = -1\n")
        self.assertIn("a.ratio: must be positive", message)

    def test_bad_cli_value_names_option(self):
        with self.assertRaises(C.ConfigError) as cm:
            C.load(None, SCHEMA, {"a.port": "eighty"})
        self.assertEqual(str(cm.exception), "--a-port: a.port: expected an integer, got 'eighty'")

    def test_paths_relative_to_file_or_cwd(self):
        path = self.write('[a]\ndir = "sub"\n')
        c = C.load(path, SCHEMA)
        self.assertEqual(c.path_of("a.dir"), os.path.join(os.path.dirname(os.path.abspath(path)),
                                                          "sub"))
        c = C.load(path, SCHEMA, {"a.dir": "other"})
        self.assertEqual(c.path_of("a.dir"), os.path.join(os.getcwd(), "other"))


class HostPortTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(C.parse_hostport("1.2.3.4:5"), ("1.2.3.4", 5))
        self.assertEqual(C.parse_hostport("[::1]:6"), ("::1", 6))
        self.assertEqual(C.parse_hostport("host.example:7"), ("host.example", 7))
        self.assertEqual(C.parse_hostport(":8", "0.0.0.0"), ("0.0.0.0", 8))

    def test_errors(self):
        for bad in ("nohost", "h:port", "h:70000", "[::1]6", ":5"):
            self.assertRaises(ValueError, C.parse_hostport, bad)


class ShippedConfigTests(SynchronousTestCase):
    """The files in etc/ load against their daemon's schema as they are."""

    def test_etc_files(self):
        from p2pnat.agent.tap import SCHEMA as AGENT
        from p2pnat.lobby.tap import SCHEMA as LOBBY
        from p2pnat.relay.tap import SCHEMA as RELAY

        etc = os.path.join(procs.REPO, "etc")
        for name, schema in [("relay.toml", RELAY), ("lobby.toml", LOBBY),
                             ("device-agent.toml", AGENT)]:
            c = C.load(os.path.join(etc, name), schema)
            # Every key of the schema is documented in the shipped file.
            self.assertEqual({s.name for s in schema}, set(c.values), name)
            with open(os.path.join(etc, name)) as f:
                text = f.read()
            for s in schema:
                self.assertIn(s.name.split(".")[-1] + " =", text, f"{name}: {s.name}")
