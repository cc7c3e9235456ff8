"""
``p2pnat peer``'s stream options (L{p2pnat.cli.peer}): ``--forward-tcp
HOST:PORT=SERVICE``, ``--service NAME=HOST:PORT``, and the client's QUIC
credentials from its bundle (a clear message when an older bundle has
none).
"""

import argparse
import os

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cli import CommandError
from p2pnat.cli import peer as P
from p2pnat.deployment import provision
from tests.support import procs


class ParseTests(SynchronousTestCase):
    def test_forwards(self):
        self.assertEqual(P.parse_forwards(["127.0.0.1:2222=ssh", "[::1]:8080=http.v2"]),
                         [(("127.0.0.1", 2222), "ssh"), (("::1", 8080), "http.v2")])
        self.assertEqual(P.parse_forwards(None), [])
        for bad, why in (("127.0.0.1:2222", "expected HOST:PORT=SERVICE"),
                         ("2222=ssh", "expected host:port"),
                         ("127.0.0.1:2222=Bad Name", "not a valid service name"),
                         ("127.0.0.1:2222=", "not a valid service name")):
            e = self.assertRaises(CommandError, P.parse_forwards, [bad])
            self.assertIn(why, str(e))
        e = self.assertRaises(CommandError, P.parse_forwards, ["127.0.0.1:1=a", "127.0.0.1:1=b"])
        self.assertIn("given twice", str(e))

    def test_services(self):
        self.assertEqual(P.parse_services(["ssh=127.0.0.1:22", "web=[::1]:80"]),
                         {"ssh": ("127.0.0.1", 22), "web": ("::1", 80)})
        for bad, why in (("ssh", "expected NAME=HOST:PORT"), ("ssh=22", "expected host:port"),
                         ("-x=127.0.0.1:22", "not a valid service name"),
                         ("ssh=127.0.0.1:0", "port 0")):
            e = self.assertRaises(CommandError, P.parse_services, [bad])
            self.assertIn(why, str(e))
        e = self.assertRaises(CommandError, P.parse_services, ["a=h:1", "a=h:2"])
        self.assertIn("a given twice", str(e))

    def test_combinations_refused(self):
        parser = argparse.ArgumentParser()
        P.add_parser(parser.add_subparsers())
        args = parser.parse_args(["peer", "connect", "bob", "--config", "c", "--send", "x",
                                  "--forward-tcp", "127.0.0.1:1=ssh"])
        e = self.assertRaises(CommandError, P._streams_options, args, None)
        self.assertIn("--forward-tcp goes with neither", str(e))
        args = parser.parse_args(["peer", "wait", "--config", "c", "--echo",
                                  "--service", "ssh=127.0.0.1:22"])
        e = self.assertRaises(CommandError, P._streams_options, args, None)
        self.assertIn("--service goes with neither", str(e))


class CredentialTests(SynchronousTestCase):
    def bundle(self, name="alice"):
        state, out = self.mktemp(), self.mktemp()
        provision.add_client(state, name, out, lobby="127.0.0.1:3478")
        return out

    def test_from_bundle(self):
        out = self.bundle()
        config, _ = P.load_client(os.path.join(out, "client.toml"))
        self.assertEqual(str(P.load_credentials(config).identity), "client:alice")

    def test_old_bundle(self):
        """A bundle made before client certificates: the datagram path works, QUIC says why not."""
        out = self.bundle()
        path = os.path.join(out, "client.toml")
        procs.without_certificate(path)
        config, key = P.load_client(path)
        self.assertEqual(len(key), 32)
        e = self.assertRaises(CommandError, P.load_credentials, config)
        self.assertIn("no client.cert_file, client.key_file, client.ca_file", str(e))
        self.assertIn("`p2pnat client add ID --replace`", str(e))
        # Chat and UDP forwards go on, in the clear (and say so).
        self.assertIsNone(P.optional_credentials(config))

    def test_optional_credentials(self):
        """A bundle with its certificate: datagrams go on QUIC, so they are loaded."""
        out = self.bundle()
        config, _ = P.load_client(os.path.join(out, "client.toml"))
        self.assertEqual(str(P.optional_credentials(config).identity), "client:alice")
        # A certificate named but unusable is an error, not a silent fall to the clear.
        os.chmod(os.path.join(out, "client.key"), 0o644)
        self.assertRaises(CommandError, P.optional_credentials, config)

    def test_certificate_of_another_client(self):
        out = self.bundle()
        other = self.bundle("bob")
        os.replace(os.path.join(other, "client.crt"), os.path.join(out, "client.crt"))
        config, _ = P.load_client(os.path.join(out, "client.toml"))
        e = self.assertRaises(CommandError, P.load_credentials, config)
        self.assertIn("not a certificate for client alice", str(e))

    def test_unreadable_key(self):
        out = self.bundle()
        os.chmod(os.path.join(out, "client.key"), 0o644)
        config, _ = P.load_client(os.path.join(out, "client.toml"))
        self.assertRaises(CommandError, P.load_credentials, config)
