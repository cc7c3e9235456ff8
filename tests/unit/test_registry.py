"""
Tests for L{p2pnat.deployment.registry}.
"""

import os
import sqlite3
import stat

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.deployment import registry
from p2pnat.deployment.registry import Registry, RegistryError

KEY = bytes(range(32))
FP = "ab" * 32


class RegistryTests(SynchronousTestCase):

    def setUp(self):
        self.reg = Registry(":memory:")
        self.addCleanup(self.reg.close)

    def test_add_and_get(self):
        rec = self.reg.add_device("cam-1", KEY, FP.upper(), created=1000.5)
        self.assertEqual(rec, self.reg.device("cam-1"))
        self.assertEqual((rec.id, rec.mac_key, rec.cert_fingerprint, rec.access_mode),
                         ("cam-1", KEY, FP, "device"))
        self.assertEqual(rec.created, 1000.5)
        self.assertIsNone(rec.revoked)
        self.assertIsNone(rec.last_access)
        self.assertIsNone(rec.address)
        self.assertIsNone(rec.access_credential_hash)
        self.assertTrue(rec.active)
        self.assertIsNone(self.reg.device("cam-2"))

    def test_repr_hides_secrets(self):
        rec = self.reg.add_device("cam-1", KEY, FP, "relay", "hunter2")
        self.assertNotIn(KEY.hex(), repr(rec))
        self.assertNotIn(repr(KEY), repr(rec))
        self.assertNotIn("scrypt", repr(rec))
        client = self.reg.add_client("c1", KEY)
        self.assertNotIn(repr(KEY), repr(client))

    def test_duplicate(self):
        self.reg.add_device("cam-1", KEY, FP)
        e = self.assertRaises(RegistryError, self.reg.add_device, "cam-1", KEY, FP)
        self.assertIn("already exists", str(e))
        self.reg.add_client("c1", KEY)
        self.assertRaises(RegistryError, self.reg.add_client, "c1", KEY)

    def test_bad_input(self):
        for bad in ("", "-x", "a b", "x" * 65, "caf\u00e9", None):
            self.assertRaises(RegistryError, self.reg.add_device, bad, KEY, FP)
            self.assertRaises(RegistryError, self.reg.add_client, bad, KEY)
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY[:31], FP)
        self.assertRaises(RegistryError, self.reg.add_device, "a", "x" * 32, FP)
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY, "zz" * 32)
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY, FP, "nobody")
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY, FP, "relay")
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY, FP, "device", "pw")
        self.assertRaises(RegistryError, self.reg.add_device, "a", KEY, FP, "relay", "")
        self.assertRaises(RegistryError, self.reg.add_client, "a", KEY[:1])
        self.assertEqual(self.reg.devices(include_revoked=True), [])

    def test_new_device_ids_are_dns_labels(self):
        """New device IDs are lower-case DNS labels; lobby client IDs keep the wire's rule."""
        for good in ("cam", "0", "cam-1", "a" * 63, "xn--caf-dma"):
            self.reg.add_device(good, KEY, FP)
        for bad, says in [("Cam", "use 'cam'"), ("CAM-1", "use 'cam-1'"),
                          ("garage.door", "one DNS label"), ("under_score", "one DNS label"),
                          ("a-", "one DNS label"), ("a" * 64, "one DNS label")]:
            e = self.assertRaises(RegistryError, self.reg.add_device, bad, KEY, FP)
            self.assertIn(says, str(e))
            self.assertIsNone(self.reg.device(bad))
        self.reg.add_client("Alice.B_1", KEY)

    def test_device_id_problem(self):
        """Why an ID an older registry holds cannot be reached by name."""
        self.assertIsNone(registry.device_id_problem("cam-1"))
        self.assertIn("upper-case", registry.device_id_problem("Cam"))
        self.assertIn("wildcard certificate", registry.device_id_problem("garage.door"))
        self.assertIn("wildcard certificate", registry.device_id_problem("Garage.Door"))
        self.assertIn("DNS label", registry.device_id_problem("under_score"))
        self.assertIn("DNS label", registry.device_id_problem("a" * 64))

    def test_legacy_device_id_replaced_in_place(self):
        """An ID an older p2pnat accepted can be re-provisioned, not added anew."""
        self.reg._db.execute("INSERT INTO devices (id, mac_key, cert_fingerprint, created)"
                             " VALUES ('Cam', ?, ?, 0)", (KEY, FP))
        rec = self.reg.add_device("Cam", KEY, "cd" * 32, replace=True)
        self.assertEqual(rec.cert_fingerprint, "cd" * 32)
        self.assertRaises(RegistryError, self.reg.add_device, "Cam2", KEY, FP, replace=True)
        # Its migration target may differ from it only in case.
        self.assertEqual(self.reg.add_device("cam", KEY, FP).id, "cam")

    def test_revoke(self):
        self.reg.add_device("cam-1", KEY, FP)
        self.reg.add_device("cam-0", KEY, "cd" * 32)
        self.assertTrue(self.reg.revoke_device("cam-1", when=2000.0))
        self.assertFalse(self.reg.revoke_device("cam-1", when=3000.0))
        self.assertFalse(self.reg.revoke_device("cam-9"))
        rec = self.reg.device("cam-1")
        self.assertEqual(rec.revoked, 2000.0)
        self.assertFalse(rec.active)
        self.assertFalse(rec.accepts(FP))
        self.assertEqual([d.id for d in self.reg.devices()], ["cam-0"])
        self.assertEqual([d.id for d in self.reg.devices(include_revoked=True)],
                         ["cam-0", "cam-1"])
        self.assertEqual(sorted(self.reg.load_all()), ["cam-0", "cam-1"])
        # Revoked, the ID is still taken.
        self.assertRaises(RegistryError, self.reg.add_device, "cam-1", KEY, FP)

    def test_replace(self):
        self.reg.add_device("cam-1", KEY, FP)
        self.reg.record_access("cam-1", 50.0, "192.0.2.1", 4000)
        self.reg.revoke_device("cam-1")
        new_key = bytes(32)
        rec = self.reg.add_device("cam-1", new_key, "cd" * 32, "relay", "pw", replace=True)
        self.assertTrue(rec.active)
        self.assertEqual(rec.mac_key, new_key)
        self.assertIsNone(rec.last_access)
        self.assertTrue(rec.accepts("CD" * 32))
        self.assertFalse(rec.accepts(FP))
        self.assertTrue(self.reg.check_credential("cam-1", "pw"))

    def test_accepts(self):
        rec = self.reg.add_device("cam-1", KEY, FP)
        self.assertTrue(rec.accepts(FP))
        self.assertTrue(rec.accepts(FP.upper()))
        self.assertFalse(rec.accepts("cd" * 32))

    def test_credential(self):
        """Only the hash is stored, and only the right credential of an active device passes."""
        self.reg.add_device("cam-1", KEY, FP, "relay", "correct horse")
        self.reg.add_device("cam-2", KEY, FP, "device")
        rec = self.reg.device("cam-1")
        self.assertNotIn("correct horse", rec.access_credential_hash)
        self.assertTrue(rec.access_credential_hash.startswith("scrypt$"))
        self.assertTrue(self.reg.check_credential("cam-1", "correct horse"))
        self.assertTrue(self.reg.check_credential("cam-1", b"correct horse"))
        self.assertFalse(self.reg.check_credential("cam-1", "correct horse "))
        self.assertFalse(self.reg.check_credential("cam-1", ""))
        self.assertFalse(self.reg.check_credential("cam-2", ""))
        self.assertFalse(self.reg.check_credential("cam-9", "correct horse"))
        self.reg.revoke_device("cam-1")
        self.assertFalse(self.reg.check_credential("cam-1", "correct horse"))

    def test_credential_hash(self):
        h1 = registry.hash_credential("pw")
        h2 = registry.hash_credential("pw")
        self.assertNotEqual(h1, h2)  # salted
        self.assertTrue(registry.verify_credential(h1, "pw"))
        for bad in ("", "plain", "md5$x$y$z", "scrypt$n=2$AA$AA",
                    "scrypt$n=99999999,r=8,p=1$AA$AA"):
            self.assertFalse(registry.verify_credential(bad, "pw"))

    def test_record_access(self):
        self.reg.add_device("cam-1", KEY, FP)
        self.assertTrue(self.reg.record_access("cam-1", 123.25, "2001:db8::1", 40000))
        rec = self.reg.device("cam-1")
        self.assertEqual(rec.last_access, 123.25)
        self.assertEqual(rec.address, ("2001:db8::1", 40000))
        self.assertFalse(self.reg.record_access("cam-9", 1.0, "192.0.2.1", 1))
        self.reg.revoke_device("cam-1")
        self.assertFalse(self.reg.record_access("cam-1", 200.0, "192.0.2.1", 1))
        self.assertEqual(self.reg.device("cam-1").last_access, 123.25)

    def test_record_accesses(self):
        """Many notify A times in one transaction; unknown and revoked devices skipped."""
        self.reg.add_device("cam-1", KEY, FP)
        self.reg.add_device("cam-2", KEY, FP)
        self.reg.add_device("cam-3", KEY, FP)
        self.reg.revoke_device("cam-3")
        n = self.reg.record_accesses([("cam-1", 10.0, "192.0.2.1", 1),
                                      ("cam-2", 11.0, "192.0.2.2", 2),
                                      ("cam-3", 12.0, "192.0.2.3", 3),
                                      ("cam-9", 13.0, "192.0.2.9", 9)])
        self.assertEqual(n, 2)
        self.assertEqual(self.reg.device("cam-1").address, ("192.0.2.1", 1))
        self.assertEqual(self.reg.device("cam-2").last_access, 11.0)
        self.assertIsNone(self.reg.device("cam-3").last_access)
        self.assertEqual(self.reg.record_accesses([]), 0)

    def test_clients(self):
        rec = self.reg.add_client("alice", KEY, created=5.0)
        self.assertEqual((rec.id, rec.mac_key, rec.created, rec.revoked), ("alice", KEY, 5.0, None))
        self.reg.add_client("bob", KEY)
        self.assertEqual([c.id for c in self.reg.clients()], ["alice", "bob"])
        self.assertTrue(self.reg.revoke_client("alice", when=6.0))
        self.assertFalse(self.reg.revoke_client("alice"))
        self.assertFalse(self.reg.revoke_client("carol"))
        self.assertEqual([c.id for c in self.reg.clients()], ["bob"])
        self.assertEqual(self.reg.client("alice").revoked, 6.0)
        self.assertEqual(sorted(self.reg.load_all_clients()), ["alice", "bob"])
        self.assertIsNone(self.reg.client("carol"))
        rec = self.reg.add_client("alice", bytes(32), replace=True)
        self.assertTrue(rec.active)
        # Clients and devices are separate name spaces.
        self.reg.add_device("alice", KEY, FP)

    def test_schema_version(self):
        self.assertEqual(self.reg.schema_version(), registry.SCHEMA_VERSION)


class RegistryFileTests(SynchronousTestCase):

    def setUp(self):
        self.dir = self.mktemp()
        os.mkdir(self.dir)

    def open(self, **kw):
        reg = Registry(os.path.join(self.dir, "registry.sqlite3"), **kw)
        self.addCleanup(reg.close)
        return reg

    def test_mode_and_wal(self):
        """The file is created 0600, in WAL mode, and its -wal file too is 0600."""
        old = os.umask(0)
        try:
            reg = self.open()
        finally:
            os.umask(old)
        reg.add_device("cam-1", KEY, FP)
        path = reg.path
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path + "-wal").st_mode), 0o600)
        self.assertEqual(reg._db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_open_state_dir(self):
        """open_state_dir makes a 0700 directory and the registry in it, or refuses."""
        state = os.path.join(self.dir, "a", "state")
        self.assertRaises(RegistryError, Registry.open_state_dir, state, create=False)
        reg = Registry.open_state_dir(state)
        self.addCleanup(reg.close)
        self.assertEqual(reg.path, os.path.join(state, registry.REGISTRY_FILE))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        again = Registry.open_state_dir(state, create=False)
        self.addCleanup(again.close)

    def test_missing(self):
        e = self.assertRaises(RegistryError, self.open, create=False)
        self.assertIn("no such registry", str(e))

    def test_not_a_registry(self):
        path = os.path.join(self.dir, "registry.sqlite3")
        with open(path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        self.assertRaises(RegistryError, self.open)
        os.unlink(path)
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE other (x)")
        db.commit()
        db.close()
        e = self.assertRaises(RegistryError, self.open)
        self.assertIn("not a p2pnat registry", str(e))

    def test_persists(self):
        reg = self.open()
        reg.add_device("cam-1", KEY, FP, "relay", "pw")
        reg.record_access("cam-1", 9.0, "192.0.2.1", 1234)
        reg.close()
        again = self.open(create=False)
        rec = again.device("cam-1")
        self.assertEqual(rec.address, ("192.0.2.1", 1234))
        self.assertTrue(again.check_credential("cam-1", "pw"))

    def test_data_version(self):
        """
        data_version moves when another connection commits, not when this
        one writes or reads: a daemon polls it to notice the CLI's changes.
        """
        daemon, cli = self.open(), self.open()
        daemon.add_device("cam-1", KEY, FP)
        v0 = daemon.data_version()
        daemon.record_access("cam-1", 1.0, "192.0.2.1", 1)
        daemon.device("cam-1")
        self.assertEqual(daemon.data_version(), v0)
        cli.revoke_device("cam-1")
        v1 = daemon.data_version()
        self.assertNotEqual(v1, v0)
        self.assertFalse(daemon.load_all()["cam-1"].active)
        self.assertEqual(daemon.data_version(), v1)
        cli.add_client("c1", KEY)
        self.assertNotEqual(daemon.data_version(), v1)

    def test_concurrent_writers(self):
        """Two connections write in turn without 'database is locked'."""
        a, b = self.open(), self.open()
        for i in range(20):
            (a if i % 2 else b).add_client(f"c{i}", KEY)
            (b if i % 2 else a).record_access("nobody", i, "192.0.2.1", 1)
        self.assertEqual(len(a.clients()), 20)

    def test_schema_newer(self):
        """A file from a newer p2pnat is refused, not damaged."""
        reg = self.open()
        reg._db.execute("UPDATE schema_version SET version = ?", (registry.SCHEMA_VERSION + 1,))
        reg.close()
        e = self.assertRaises(RegistryError, self.open)
        self.assertIn("newer", str(e))

    def test_upgrade(self):
        """Opening an older file applies the missing steps, once."""
        reg = self.open()
        self.assertEqual(reg.schema_version(), registry.SCHEMA_VERSION)
        reg.add_device("cam-1", KEY, FP)
        reg.close()
        step = registry.SCHEMA_VERSION + 1
        self.patch(registry, "SCHEMA_VERSION", step)
        self.patch(registry, "_MIGRATIONS", {
            **registry._MIGRATIONS, step: ["ALTER TABLE devices ADD COLUMN note TEXT"]})
        reg = self.open()
        self.assertEqual(reg.schema_version(), step)
        self.assertEqual(reg.device("cam-1").id, "cam-1")
        reg.close()
        reg = self.open()  # not applied twice (it would fail: duplicate column)
        self.assertEqual(reg.schema_version(), step)
