"""
``p2pnat peer``'s candidate switches (L{p2pnat.cli.peer}): the config keys
``client.portmap`` and ``client.ipv6``, ``--no-portmap`` and ``--no-ipv6``,
and what they make of the client's options.
"""

import argparse

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cli import CommandError
from p2pnat.cli import peer as P


class CandidateOptionTests(SynchronousTestCase):
    def config(self, extra=""):
        d = FilePath(self.mktemp())
        d.makedirs()
        d.child("mac.key").setContent(b"00" * 32 + b"\n")
        d.child("mac.key").chmod(0o600)
        path = d.child("client.toml")
        path.setContent(f'[client]\nid = "alice"\nlobby = "198.18.1.1:3478"\n{extra}'.encode())
        return P.load_client(path.path)[0]

    def args(self, *argv):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        P.add_parser(sub)
        return parser.parse_args(["peer", "connect", "bob", "--config", "c.toml", *argv])

    def test_on_by_default(self):
        self.assertEqual(P.candidate_options(self.config(), self.args()),
                         {"ipv6": "auto", "portmap": True})

    def test_switches_turn_them_off(self):
        self.assertEqual(P.candidate_options(self.config(), self.args("--no-ipv6",
                                                                      "--no-portmap")),
                         {"ipv6": None, "portmap": False})

    def test_config_turns_them_off_or_names_the_address(self):
        config = self.config('portmap = false\nipv6 = "off"\n')
        self.assertEqual(P.candidate_options(config, self.args()),
                         {"ipv6": None, "portmap": False})
        config = self.config('ipv6 = "2001:2:0:1::10"\n')
        self.assertEqual(P.candidate_options(config, self.args())["ipv6"], "2001:2:0:1::10")

    def test_bad_ipv6_setting(self):
        for bad in ("fe80::1", "::", "::1", "ff02::1", "198.18.0.1", "yes"):
            e = self.assertRaises(CommandError, self.config, f'ipv6 = "{bad}"\n')
            self.assertIn("client.ipv6", str(e))
