"""
Tests for L{p2pnat.cli.provision}, the ``relay``, ``device`` and ``client``
command groups run through L{p2pnat.cli.main}, and for the library under
them, L{p2pnat.deployment.provision}, called with plain parameters.
"""

import ast
import io
import json
import os
import sqlite3
import stat
import sys
import time
import tomllib

from OpenSSL import crypto
from twisted.trial.unittest import SynchronousTestCase

from p2pnat import cli
from p2pnat.deployment import pki, provision, registry
from p2pnat.quic.identity import Credentials, PeerIdentity, check_peer
from tests.support import procs

AGENT_KEYS = {"device_id", "relay", "relay_hostname", "mac_key_file", "cert_file", "key_file",
              "ca_file", "service"}


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class CommandTestCase(SynchronousTestCase):
    """
    Runs commands with captured output, and checks that no output ever
    holds a secret written during the test.
    """

    def setUp(self):
        self.base = self.mktemp()
        os.mkdir(self.base)
        self.state = os.path.join(self.base, "state")
        self.outputs = []
        self.addCleanup(self.check_no_secret_printed)

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            status = cli.main(list(argv))
        finally:
            sys.stdout, sys.stderr = saved
        self.outputs.append(out.getvalue() + err.getvalue())
        return status, out.getvalue(), err.getvalue()

    def ok(self, *argv):
        status, out, err = self.run_cli(*argv)
        self.assertEqual((status, err), (0, ""), f"{argv}: {err}")
        return out

    def fails(self, *argv):
        """Run a command that must fail: status 2, one line on stderr, nothing on stdout."""
        status, out, err = self.run_cli(*argv)
        self.assertEqual(status, 2, f"{argv}: {out}{err}")
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("p2pnat "), err)
        return err

    def path(self, *parts):
        return os.path.join(self.base, *parts)

    def init(self, *extra):
        return self.ok("relay", "init", "--state-dir", self.state,
                       "--hostname", "relay.example.org", *extra)

    def add_device(self, device_id, out, *extra):
        return self.ok("device", "add", device_id, "--state-dir", self.state,
                       "--relay", "relay.example.org:3478", "--service", "127.0.0.1:8080",
                       "--out", out, *extra)

    def registry(self):
        reg = registry.Registry(os.path.join(self.state, "registry.sqlite3"), create=False)
        self.addCleanup(reg.close)
        return reg

    def check_no_secret_printed(self):
        secrets = []
        for root, _, files in os.walk(self.base):
            for name in files:
                if name.endswith((".key",)):
                    data = open(os.path.join(root, name)).read()
                    secrets.append(data.strip())
                    if "PRIVATE KEY" in data:
                        # the base64 body of the key, line by line
                        secrets += [line for line in data.splitlines() if "-----" not in line]
        printed = "".join(self.outputs)
        for secret in secrets:
            self.assertNotIn(secret, printed)
        self.assertNotIn("PRIVATE KEY", printed)


class RelayInitTests(CommandTestCase):

    def test_init(self):
        out = self.init("--udp", "0.0.0.0:3478", "--tunnel-port", "443")
        for name in ("ca.crt", "ca.key", "relay.crt", "relay.key", "registry.sqlite3",
                     "deployment.toml"):
            self.assertIn(name, out)
        self.assertIn("relay.example.org, *.relay.example.org", out)
        self.assertEqual(_mode(self.state), 0o700)
        for name in ("ca.key", "relay.key", "registry.sqlite3"):
            self.assertEqual(_mode(os.path.join(self.state, name)), 0o600, name)
        ca = pki.load_cert(os.path.join(self.state, "ca.crt"))
        relay = pki.load_cert(os.path.join(self.state, "relay.crt"))
        self.assertTrue(pki.covers_hostname(relay, "relay.example.org"))
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca))
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(relay)).verify_certificate()
        self.assertEqual(self.registry().devices(), [])
        with open(os.path.join(self.state, "deployment.toml"), "rb") as f:
            self.assertEqual(tomllib.load(f), {"deployment": {
                "hostname": "relay.example.org", "udp": "0.0.0.0:3478", "tunnel_port": 443}})

    def test_init_makes_the_relay_secret(self):
        """
        relay init makes the relay's own secret (0600), not the relay's first
        start: the nodes of a cluster are copies of this directory and must
        share it.  A re-init keeps it.
        """
        self.init()
        path = os.path.join(self.state, "terminal.secret")
        self.assertEqual(_mode(path), 0o600)
        secret = open(path).read()
        self.assertEqual(len(bytes.fromhex(secret.strip())), 32)
        self.init("--force")
        self.assertEqual(open(path).read(), secret)

    def test_refuses_overwrite(self):
        """An existing CA is kept unless --force; --force replaces it and keeps the registry."""
        self.init()
        ca = open(os.path.join(self.state, "ca.crt")).read()
        err = self.fails("relay", "init", "--state-dir", self.state, "--hostname", "x.example")
        self.assertIn("already exists", err)
        self.assertIn("--force", err)
        self.assertEqual(open(os.path.join(self.state, "ca.crt")).read(), ca)
        self.add_device("cam-1", self.path("b1"))
        out = self.init("--force")
        self.assertNotEqual(open(os.path.join(self.state, "ca.crt")).read(), ca)
        self.assertEqual(_mode(os.path.join(self.state, "ca.key")), 0o600)
        self.assertIn("1 active device", out)
        self.assertEqual([d.id for d in self.registry().devices()], ["cam-1"])

    def test_ip_hostname(self):
        out = self.ok("relay", "init", "--state-dir", self.state, "--hostname", "192.0.2.10")
        self.assertIn("192.0.2.10", out)
        self.add_device("cam-1", self.path("b1"))
        with open(self.path("b1", "agent.toml"), "rb") as f:
            self.assertEqual(tomllib.load(f)["agent"]["relay_hostname"], "192.0.2.10")

    def test_bad_arguments(self):
        self.fails("relay", "init", "--state-dir", self.state, "--hostname", "bad_name")
        self.fails("relay", "init", "--state-dir", self.state, "--hostname", "r.example",
                   "--udp", "nonsense")
        self.fails("relay", "init", "--state-dir", self.state, "--hostname", "r.example",
                   "--tunnel-port", "70000")
        self.assertFalse(os.path.exists(self.state))

    def test_reissue(self):
        self.init()
        ca = open(os.path.join(self.state, "ca.crt")).read()
        self.ok("relay", "reissue-cert", "--state-dir", self.state, "--hostname", "new.example")
        relay = pki.load_cert(os.path.join(self.state, "relay.crt"))
        self.assertTrue(pki.covers_hostname(relay, "new.example"))
        self.assertEqual(open(os.path.join(self.state, "ca.crt")).read(), ca)
        self.assertEqual(_mode(os.path.join(self.state, "relay.key")), 0o600)


class DeviceTests(CommandTestCase):

    def setUp(self):
        super().setUp()
        self.init()

    def test_add(self):
        """
        device add writes a complete bundle with the right modes, an
        agent.toml with exactly the agent's keys, and a registry row whose
        key and fingerprint match the bundle.
        """
        bundle = self.path("bundle")
        out = self.add_device("cam-1", bundle, "--relay-hostname", "cam-1.relay.example.org")
        self.assertIn("device-agent --config", out)
        self.assertIn(os.path.abspath(os.path.join(bundle, "agent.toml")), out)
        self.assertEqual(sorted(os.listdir(bundle)),
                         ["agent.toml", "ca.crt", "device.crt", "device.key", "mac.key"])
        self.assertEqual(_mode(bundle), 0o700)
        self.assertEqual(_mode(os.path.join(bundle, "device.key")), 0o600)
        self.assertEqual(_mode(os.path.join(bundle, "mac.key")), 0o600)

        with open(os.path.join(bundle, "agent.toml"), "rb") as f:
            config = tomllib.load(f)
        self.assertEqual(list(config), ["agent"])
        agent = config["agent"]
        self.assertEqual(set(agent), AGENT_KEYS)
        self.assertEqual(agent["device_id"], "cam-1")
        self.assertEqual(agent["relay"], "relay.example.org:3478")
        self.assertEqual(agent["relay_hostname"], "cam-1.relay.example.org")
        self.assertEqual(agent["service"], "127.0.0.1:8080")
        for key in ("mac_key_file", "cert_file", "key_file", "ca_file"):
            self.assertFalse(os.path.isabs(agent[key]))
            self.assertTrue(os.path.isfile(os.path.join(bundle, agent[key])), key)

        mac_key = pki.read_mac_key(os.path.join(bundle, agent["mac_key_file"]))
        cert = pki.load_cert(os.path.join(bundle, agent["cert_file"]))
        key = pki.load_key(os.path.join(bundle, agent["key_file"]))
        ca = pki.load_cert(os.path.join(bundle, agent["ca_file"]))
        self.assertEqual(ca, pki.load_cert(os.path.join(self.state, "ca.crt")))
        self.assertEqual(cert.public_key().public_numbers(), key.public_key().public_numbers())
        self.assertEqual(pki.device_id_of(cert), "cam-1")
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca))
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert)).verify_certificate()

        rec = self.registry().device("cam-1")
        self.assertEqual(rec.mac_key, mac_key)
        self.assertTrue(rec.accepts(pki.fingerprint(cert)))
        self.assertEqual(rec.access_mode, "device")
        self.assertIn(pki.fingerprint(cert), out)

    def test_relay_default(self):
        """Without --relay, the hostname and --udp port given to relay init are used."""
        self.init("--force", "--udp", "0.0.0.0:3478")
        self.ok("device", "add", "cam-1", "--state-dir", self.state,
                "--service", "[::1]:80", "--out", self.path("b"))
        with open(self.path("b", "agent.toml"), "rb") as f:
            agent = tomllib.load(f)["agent"]
        self.assertEqual((agent["relay"], agent["relay_hostname"], agent["service"]),
                         ("relay.example.org:3478", "relay.example.org", "[::1]:80"))

    def test_no_relay(self):
        err = self.fails("device", "add", "cam-1", "--state-dir", self.state,
                         "--service", "127.0.0.1:80", "--out", self.path("b"))
        self.assertIn("--relay", err)

    def test_generate_credential(self):
        """The generated credential is printed once and stored only as a hash."""
        out = self.add_device("cam-1", self.path("b"), "--access", "relay",
                              "--generate-credential")
        line = [line for line in out.splitlines() if "access credential" in line]
        self.assertEqual(len(line), 1)
        credential = line[0].rsplit(" ", 1)[1]
        self.assertGreaterEqual(len(credential), 20)
        reg = self.registry()
        rec = reg.device("cam-1")
        self.assertEqual(rec.access_mode, "relay")
        self.assertNotIn(credential, rec.access_credential_hash)
        self.assertTrue(reg.check_credential("cam-1", credential))
        self.assertFalse(reg.check_credential("cam-1", credential + "x"))
        with open(os.path.join(self.state, "registry.sqlite3"), "rb") as f:
            self.assertNotIn(credential.encode(), f.read())
        listing = self.ok("device", "list", "--state-dir", self.state)
        self.assertNotIn(credential, listing)

    def test_credential_file(self):
        path = self.path("cred")
        with open(path, "w") as f:
            f.write("open sesame, please\n")
        out = self.add_device("cam-1", self.path("b"), "--access", "relay",
                              "--credential-file", path)
        self.assertNotIn("open sesame", out)
        self.assertTrue(self.registry().check_credential("cam-1", "open sesame, please"))

    def test_credential_errors(self):
        base = ["device", "add", "cam-1", "--state-dir", self.state, "--relay", "r.example:1",
                "--service", "127.0.0.1:80", "--out", self.path("b")]
        self.assertIn("--access relay", self.fails(*base, "--access", "relay"))
        self.fails(*base, "--generate-credential")
        self.fails(*base, "--access", "relay", "--credential-file", self.path("none"))
        empty = self.path("empty")
        open(empty, "w").close()
        self.fails(*base, "--access", "relay", "--credential-file", empty)
        self.assertIsNone(self.registry().device("cam-1"))
        self.assertFalse(os.path.exists(self.path("b")))

    def test_device_id_is_a_host_name(self):
        """
        A new device ID is one lower-case DNS label: terminals reach it at
        ID.RELAYHOST, whose case does not count and whose dots would make
        more labels than the relay's wildcard certificate covers.
        """
        base = ["--state-dir", self.state, "--relay", "relay.example.org:3478",
                "--service", "127.0.0.1:80", "--out", self.path("b")]
        self.add_device("cam", self.path("b0"))
        self.assertIn("device IDs are lower case, as host names are case-insensitive;"
                      " use 'cam'", self.fails("device", "add", "Cam", *base))
        for bad in ("garage.door", "under_score", "x" * 64, "a-"):
            err = self.fails("device", "add", bad, *base)
            self.assertIn("one DNS label: 1-63 characters of a-z, 0-9 and '-', starting and"
                          " ending with a letter or digit", err)
        self.assertFalse(os.path.exists(self.path("b")))
        self.assertEqual([d.id for d in self.registry().devices()], ["cam"])
        self.add_device("x" * 63, self.path("b1"))

    def test_legacy_id_kept_on_replace(self):
        """A device registered before the rule can be re-provisioned under its old ID."""
        db = sqlite3.connect(os.path.join(self.state, "registry.sqlite3"), isolation_level=None)
        db.execute("INSERT INTO devices (id, mac_key, cert_fingerprint, created)"
                   " VALUES ('Cam.1', ?, ?, 0)", (bytes(32), "ab" * 32))
        db.close()
        self.add_device("Cam.1", self.path("b"), "--replace")
        self.assertNotEqual(self.registry().device("Cam.1").cert_fingerprint, "ab" * 32)

    def test_credential_length(self):
        """A credential given at provisioning has at least 12 characters."""
        base = ["device", "add", "cam-1", "--state-dir", self.state, "--relay", "r.example:1",
                "--service", "127.0.0.1:80", "--out", self.path("b"), "--access", "relay",
                "--credential-file"]
        path = self.path("cred")
        for short in ("hunter2", "caf\u00e9-caf\u00e9"):  # 11 characters, 13 bytes
            with open(path, "w", encoding="utf-8") as f:
                f.write(short + "\n")
            err = self.fails(*base, path)
            self.assertIn(f"has {len(short)} characters; at least 12 are needed", err)
        self.assertIsNone(self.registry().device("cam-1"))
        with open(path, "w", encoding="utf-8") as f:
            f.write("twelve chars\n")
        self.ok(*base, path)
        self.assertTrue(self.registry().check_credential("cam-1", "twelve chars"))

    def test_add_errors(self):
        """Bad input is refused with one line, and leaves no row and no bundle behind."""
        base = ["--state-dir", self.state, "--relay", "relay.example.org:3478",
                "--service", "127.0.0.1:80", "--out", self.path("b")]
        self.assertIn("invalid device ID", self.fails("device", "add", "bad/id", *base))
        self.fails("device", "add", "cam-1", *base[:-2], "--out", self.path("b"),
                   "--relay-hostname", "elsewhere.example")
        self.fails("device", "add", "cam-1", "--state-dir", self.state, "--relay", "nope",
                   "--service", "127.0.0.1:80", "--out", self.path("b"))
        self.fails("device", "add", "cam-1", "--state-dir", self.state,
                   "--relay", "relay.example.org:3478", "--service", "127.0.0.1:0",
                   "--out", self.path("b"))
        self.fails("device", "add", "cam-1", *base, "--years", "9")
        self.assertFalse(os.path.exists(self.path("b")))
        self.assertEqual(self.registry().devices(include_revoked=True), [])

    def test_duplicate(self):
        self.add_device("cam-1", self.path("b1"))
        err = self.fails("device", "add", "cam-1", "--state-dir", self.state,
                         "--relay", "relay.example.org:3478", "--service", "127.0.0.1:80",
                         "--out", self.path("b2"))
        self.assertIn("already exists", err)
        self.assertFalse(os.path.exists(self.path("b2")))

    def test_out_not_empty(self):
        """An existing bundle is never overwritten."""
        self.add_device("cam-1", self.path("b1"))
        mac = open(self.path("b1", "mac.key")).read()
        err = self.fails("device", "add", "cam-2", "--state-dir", self.state,
                         "--relay", "relay.example.org:3478", "--service", "127.0.0.1:80",
                         "--out", self.path("b1"))
        self.assertIn("already exists", err)
        self.assertEqual(open(self.path("b1", "mac.key")).read(), mac)
        self.assertIsNone(self.registry().device("cam-2"))

    def test_not_initialised(self):
        err = self.fails("device", "add", "cam-1", "--state-dir", self.path("nowhere"),
                         "--relay", "r.example:1", "--service", "127.0.0.1:80",
                         "--out", self.path("b"))
        self.assertIn("no such file", err)
        self.assertIn("relay init", self.fails("device", "list", "--state-dir",
                                               self.path("nowhere")))

    def test_wide_ca_key(self):
        """A CA key readable by others is refused, not used."""
        os.chmod(os.path.join(self.state, "ca.key"), 0o644)
        err = self.fails("device", "add", "cam-1", "--state-dir", self.state,
                         "--relay", "r.example:1", "--service", "127.0.0.1:80",
                         "--out", self.path("b"))
        self.assertIn("chmod 600", err)

    def test_list(self):
        self.add_device("cam-2", self.path("b2"), "--access", "relay", "--generate-credential")
        self.add_device("cam-1", self.path("b1"))
        reg = self.registry()
        reg.record_access("cam-1", 1700000000.0, "198.51.100.7", 40001)
        out = self.ok("device", "list", "--state-dir", self.state)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "ACCESS", "CREATED", "REVOKED", "LAST",
                                            "ACCESS", "LAST", "ADDRESS"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["cam-1", "cam-2"])
        self.assertIn("2023-11-14T22:13:20Z", lines[1])
        self.assertIn("198.51.100.7:40001", lines[1])
        self.assertEqual(lines[2].split()[1], "relay")

        rows = json.loads(self.ok("device", "list", "--state-dir", self.state, "--json"))
        self.assertEqual([r["id"] for r in rows], ["cam-1", "cam-2"])
        self.assertEqual(rows[0]["last_access"], "2023-11-14T22:13:20Z")
        self.assertEqual(rows[0]["last_address"], "198.51.100.7:40001")
        self.assertIsNone(rows[1]["last_access"])
        self.assertIsNone(rows[1]["revoked"])
        self.assertEqual(set(rows[0]), {"id", "access_mode", "created", "revoked", "last_access",
                                        "last_address", "cert_fingerprint"})

    def test_remove(self):
        """
        remove revokes and keeps the row; a relay holding the registry open
        sees data_version move.
        """
        self.add_device("cam-1", self.path("b1"))
        relay = self.registry()
        before = relay.data_version()
        self.assertIn("revoked", self.ok("device", "remove", "cam-1", "--state-dir", self.state))
        self.assertNotEqual(relay.data_version(), before)
        rec = relay.load_all()["cam-1"]
        self.assertFalse(rec.active)
        cert = pki.load_cert(self.path("b1", "device.crt"))
        self.assertFalse(rec.accepts(pki.fingerprint(cert)))
        rows = json.loads(self.ok("device", "list", "--state-dir", self.state, "--json"))
        self.assertIsNotNone(rows[0]["revoked"])
        self.assertIn("already revoked",
                      self.ok("device", "remove", "cam-1", "--state-dir", self.state))
        self.assertIn("no device", self.fails("device", "remove", "cam-9",
                                              "--state-dir", self.state))
        # The revoked ID is not silently reused...
        err = self.fails("device", "add", "cam-1", "--state-dir", self.state,
                         "--relay", "relay.example.org:3478", "--service", "127.0.0.1:80",
                         "--out", self.path("b2"))
        self.assertIn("revoked", err)
        # ...but can be provisioned again on purpose.
        self.add_device("cam-1", self.path("b2"), "--replace")
        rec = self.registry().device("cam-1")
        self.assertTrue(rec.active)
        self.assertFalse(rec.accepts(pki.fingerprint(cert)))
        self.assertTrue(rec.accepts(pki.fingerprint(pki.load_cert(self.path("b2", "device.crt")))))

    def test_usage_errors(self):
        """argparse handles missing arguments (status 2)."""
        self.patch(sys, "stderr", io.StringIO())
        e = self.assertRaises(SystemExit, cli.main, ["device", "add", "cam-1"])
        self.assertEqual(e.code, 2)
        e = self.assertRaises(SystemExit, cli.main, [
            "device", "add", "cam-1", "--state-dir", self.state, "--service", "h:1", "--out", "o",
            "--credential-file", "f", "--generate-credential"])
        self.assertEqual(e.code, 2)
        self.assertEqual(cli.main(["device"]), 2)


class ClientTests(CommandTestCase):

    def test_add_list_remove(self):
        """
        client add creates the state directory, its registry and (none being
        there) a CA, and writes the client's MAC key, certificate and key.
        """
        out = self.ok("client", "add", "alice", "--state-dir", self.state,
                      "--lobby", "lobby.example.org:3479", "--out", self.path("alice"))
        self.assertIn("alice", out)
        self.assertIn("made a CA", out)
        self.assertEqual(sorted(os.listdir(self.path("alice"))),
                         ["ca.crt", "client.crt", "client.key", "client.toml", "mac.key"])
        for secret in ("mac.key", "client.key"):
            self.assertEqual(_mode(self.path("alice", secret)), 0o600)
        self.assertEqual(_mode(os.path.join(self.state, "ca.key")), 0o600)
        self.assertEqual(_mode(os.path.join(self.state, "registry.sqlite3")), 0o600)
        with open(self.path("alice", "client.toml"), "rb") as f:
            config = tomllib.load(f)
        self.assertEqual(config, {"client": {"id": "alice", "lobby": "lobby.example.org:3479",
                                             "mac_key_file": "mac.key",
                                             "cert_file": "client.crt",
                                             "key_file": "client.key", "ca_file": "ca.crt"}})
        creds = Credentials.from_files(self.path("alice", "client.crt"),
                                       self.path("alice", "client.key"),
                                       self.path("alice", "ca.crt"))
        self.assertEqual(str(creds.identity), "client:alice")
        ca = pki.load_cert(os.path.join(self.state, "ca.crt"))
        self.assertEqual(pki.fingerprint(creds.ca_certs[0]), pki.fingerprint(ca))
        check_peer(creds.cert, [], [ca], PeerIdentity("client", "alice"), time.time())
        key = pki.read_mac_key(self.path("alice", "mac.key"))
        self.assertEqual(self.registry().client("alice").mac_key, key)

        out = self.ok("client", "add", "bob", "--state-dir", self.state,
                      "--lobby", "lobby.example.org:3479", "--out", self.path("bob"))
        self.assertNotIn("made a CA", out)  # alice's CA issues bob's certificate too
        bob = pki.load_cert(self.path("bob", "client.crt"))
        check_peer(bob, [], [ca], PeerIdentity("client", "bob"), time.time())
        self.assertIn("already exists", self.fails(
            "client", "add", "bob", "--state-dir", self.state,
            "--lobby", "lobby.example.org:3479", "--out", self.path("bob2")))
        self.fails("client", "add", "_bad", "--state-dir", self.state,
                   "--lobby", "lobby.example.org:3479", "--out", self.path("bad"))
        self.fails("client", "add", "carol", "--state-dir", self.state,
                   "--lobby", "lobby.example.org", "--out", self.path("carol"))

        out = self.ok("client", "list", "--state-dir", self.state)
        self.assertEqual([line.split()[0] for line in out.splitlines()], ["ID", "alice", "bob"])
        self.ok("client", "remove", "alice", "--state-dir", self.state)
        rows = json.loads(self.ok("client", "list", "--state-dir", self.state, "--json"))
        self.assertEqual([(r["id"], r["revoked"] is not None) for r in rows],
                         [("alice", True), ("bob", False)])
        self.assertIn("no client", self.fails("client", "remove", "carol",
                                              "--state-dir", self.state))


class LibraryTests(SynchronousTestCase):
    """
    L{p2pnat.deployment.provision} without the command: plain parameters,
    results as values, failures as L{provision.ProvisionError}.
    """

    def setUp(self):
        self.base = self.mktemp()
        os.mkdir(self.base)
        self.state = os.path.join(self.base, "state")

    def path(self, *parts):
        return os.path.join(self.base, *parts)

    def test_no_command_layer(self):
        """The deployment package imports neither argparse nor the CLI."""
        top = os.path.join(procs.REPO, "p2pnat", "deployment")
        found = []
        for name in sorted(os.listdir(top)):
            if name.endswith(".py"):
                with open(os.path.join(top, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module] if isinstance(node, ast.ImportFrom) else [])
                    found += [(name, n) for n in names
                              if n == "argparse" or n.startswith("p2pnat.cli")]
        self.assertEqual(found, [])

    def test_init_relay_state_errors(self):
        """
        What the relay daemon calls on a first start raises ProvisionError,
        not the command's CommandError.
        """
        open(self.state, "w").close()
        e = self.assertRaises(provision.ProvisionError, provision.init_relay_state,
                              self.state, "relay.example.org")
        self.assertIn("not a directory", str(e))
        self.assertNotIsInstance(e, cli.CommandError)

    def test_init_relay(self):
        made = provision.init_relay(self.state, "Relay.Example.org", udp="0.0.0.0:3478")
        self.assertEqual((made.hostname, made.udp, made.kept_registry, made.old_devices),
                         ("relay.example.org", "0.0.0.0:3478", False, 0))
        self.assertTrue(pki.covers_hostname(made.relay_cert, "relay.example.org"))
        e = self.assertRaises(provision.ProvisionError, provision.init_relay, self.state,
                              "relay.example.org")
        self.assertIn("already exists", str(e))
        again = provision.init_relay(self.state, "relay.example.org", force=True)
        self.assertTrue(again.kept_registry)
        self.assertNotEqual(pki.fingerprint(again.ca_cert), pki.fingerprint(made.ca_cert))

    def test_device_lifecycle(self):
        provision.init_relay(self.state, "relay.example.org", udp="0.0.0.0:3478")
        bundle = provision.add_device(self.state, "cam-1", self.path("b1"),
                                      service="127.0.0.1:80", access="relay",
                                      generate_credential=True)
        self.assertFalse(bundle.replaced)
        self.assertEqual(bundle.config, os.path.abspath(self.path("b1", "agent.toml")))
        self.assertEqual(sorted(os.listdir(self.path("b1"))), sorted(provision.DEVICE_BUNDLE))
        with registry.Registry.open_state_dir(self.state, create=False) as reg:
            self.assertTrue(reg.check_credential("cam-1", bundle.credential))
            self.assertTrue(reg.device("cam-1").accepts(pki.fingerprint(bundle.cert)))

        e = self.assertRaises(provision.ProvisionError, provision.add_device, self.state,
                              "cam-1", self.path("b2"), service="127.0.0.1:80")
        self.assertIn("already exists (active)", str(e))
        self.assertFalse(os.path.exists(self.path("b2")))

        self.assertEqual([d.id for d in provision.devices(self.state)], ["cam-1"])
        self.assertIsNone(provision.remove_device(self.state, "cam-1").revoked)
        self.assertIsNotNone(provision.remove_device(self.state, "cam-1").revoked)
        self.assertRaises(provision.ProvisionError, provision.remove_device, self.state, "x")

        again = provision.add_device(self.state, "cam-1", self.path("b2"),
                                     service="127.0.0.1:80", replace=True)
        self.assertTrue(again.replaced)
        self.assertIsNone(again.credential)

    def test_registry_failure_leaves_no_bundle(self):
        """A registry refusal after the files are written removes them again."""
        provision.init_relay(self.state, "relay.example.org", udp="0.0.0.0:3478")

        def refuse(*args, **kw):
            raise registry.RegistryError("full")

        self.patch(registry.Registry, "add_device", refuse)
        e = self.assertRaises(provision.ProvisionError, provision.add_device, self.state,
                              "cam-1", self.path("b1"), service="127.0.0.1:80")
        self.assertEqual(str(e), "full")
        self.assertFalse(os.path.exists(self.path("b1")))

    def test_client_lifecycle(self):
        """The state directory, its registry and a CA are made for a first client."""
        first = provision.add_client(self.state, "alice", self.path("alice"),
                                     lobby="lobby.example.org:3479")
        self.assertEqual((first.replaced, first.made_ca), (False, True))
        with open(self.path("alice", "client.toml"), "rb") as f:
            self.assertEqual(tomllib.load(f)["client"]["lobby"], "lobby.example.org:3479")
        again = provision.add_client(self.state, "alice", self.path("alice2"),
                                     lobby="[::1]:3479", replace=True)
        self.assertEqual((again.replaced, again.made_ca), (True, False))
        self.assertNotEqual(pki.fingerprint(again.cert), pki.fingerprint(first.cert))
        self.assertEqual([c.id for c in provision.clients(self.state)], ["alice"])
        self.assertIsNone(provision.remove_client(self.state, "alice").revoked)
        e = self.assertRaises(provision.ProvisionError, provision.add_client, self.state,
                              "_bad", self.path("bad"), lobby="lobby.example.org:3479")
        self.assertIn("invalid client ID", str(e))
        e = self.assertRaises(provision.ProvisionError, provision.add_client, self.state,
                              "carol", self.path("carol"), lobby="lobby.example.org:3479",
                              years=6)
        self.assertIn("--years must be 1 to 5", str(e))
        self.assertFalse(os.path.exists(self.path("carol")))

    def test_client_certificate_from_the_relays_ca(self):
        """In a relay's state directory, clients and devices share the relay's CA."""
        relay = provision.init_relay(self.state, "relay.example.org", udp="0.0.0.0:7478")
        bundle = provision.add_client(self.state, "alice", self.path("alice"),
                                      lobby="lobby.example.org:3479", years=2)
        self.assertFalse(bundle.made_ca)
        identity = check_peer(bundle.cert, [], [relay.ca_cert], PeerIdentity("client", "alice"),
                              time.time())
        self.assertEqual(str(identity), "client:alice")
        lifetime = bundle.cert.not_valid_after_utc - bundle.cert.not_valid_before_utc
        self.assertLess(lifetime.days, 3 * 365)
        with open(self.path("alice", "ca.crt"), "rb") as f:
            self.assertEqual(f.read(), pki.cert_pem(relay.ca_cert))


class ProvisionRefusalTests(SynchronousTestCase):
    def test_revoked_at_zero_named_revoked(self):
        """
        Provisioning over an existing record names its state: one revoked
        at time 0.0 is "revoked", not "active" (the time's truth was tested).
        """
        from types import SimpleNamespace

        from p2pnat.deployment import provision
        for revoked, state in ((0.0, "revoked"), (None, "active")):
            with self.assertRaises(provision.ProvisionError) as caught:
                provision._refuse_existing(SimpleNamespace(revoked=revoked), "device", "cam",
                                           False, "replaces it")
            self.assertIn(f"({state}", str(caught.exception))
