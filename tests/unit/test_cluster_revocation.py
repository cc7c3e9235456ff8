"""
A revocation made on one node of a cluster for a device provisioned on
another: the node's SQLite registry has no row of the device, so it keeps
the record as the shared registry has it, revoked
(L{Registry.import_device}).  Restarted while Redis is away, the node still
refuses the device as revoked; and it merges the revocation again into a
Redis that came back empty, where the provisioning node's SQLite would
otherwise bring the device back.
"""

import math

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cluster import redis as R
from p2pnat.deployment.registry import Registry, RegistryError
from tests.unit.test_cluster import record
from tests.unit.test_relay_terminal import Transport, status

FP = "ab" * 32


def imported(created=100.0, revoked=None, key=b"k" * 32, device_id="cam"):
    return record(device_id, created=created, revoked=revoked, key=key)


class ImportTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.registry = Registry(self.path)
        self.addCleanup(lambda: self.registry.close())

    def reopen(self):
        self.registry.close()
        self.registry = Registry(self.path, create=False)
        return self.registry

    def test_a_revocation_is_kept(self):
        """A device this registry never had, revoked: kept as is, across a reopen."""
        r = imported(revoked=150.0)
        self.assertTrue(self.registry.import_device(r))
        self.assertEqual(self.reopen().device("cam"), r)
        self.assertEqual(self.registry.load_all(), {"cam": r})
        self.assertEqual(self.registry.devices(), [], "not listed as active")

    def test_never_brings_a_revoked_device_back(self):
        self.registry.import_device(imported(revoked=150.0))
        self.assertFalse(self.registry.import_device(imported()))
        self.assertFalse(self.registry.import_device(imported(created=99.0)))
        self.assertEqual(self.registry.device("cam").revoked, 150.0)

    def test_revokes_the_same_provisioning(self):
        """An active row of the same provisioning is revoked; its last access stays."""
        self.registry.add_device("cam", b"k" * 32, FP, created=100.0)
        self.registry.record_access("cam", 120.0, "203.0.113.5", 4)
        self.assertTrue(self.registry.import_device(imported(revoked=150.0)))
        d = self.registry.device("cam")
        self.assertEqual((d.revoked, d.last_access, d.address),
                         (150.0, 120.0, ("203.0.113.5", 4)))

    def test_a_later_provisioning_wins(self):
        self.registry.add_device("cam", b"k" * 32, FP, created=100.0)
        self.registry.record_access("cam", 120.0, "203.0.113.5", 4)
        self.registry.revoke_device("cam", when=130.0)
        again = imported(created=200.0, key=b"n" * 32)
        self.assertTrue(self.registry.import_device(again))
        self.assertEqual(self.registry.device("cam"), again, "its old access forgotten")
        self.assertFalse(self.registry.import_device(imported(revoked=300.0)),
                         "an older provisioning's revocation")
        self.assertTrue(self.registry.device("cam").active)

    def test_bad_records(self):
        from dataclasses import replace

        for bad in (replace(imported(), id="no spaces"), imported(key=b"short"),
                    replace(imported(), cert_fingerprint="zz"),
                    replace(imported(), access_mode="open"),
                    replace(imported(), created=math.nan),
                    replace(imported(), revoked=math.inf),
                    replace(imported(), created="x"),
                    replace(imported(), access_credential_hash=b"bytes")):
            with self.assertRaises(RegistryError, msg=bad):
                self.registry.import_device(bad)
        self.assertEqual(self.registry.load_all(), {})


class RestartTests(SynchronousTestCase):
    """Node X of a cluster, its Redis unreachable, restarted after revoking ``cam``."""

    def service(self, state_dir):
        from p2pnat.daemon import config as C
        from p2pnat.relay import tap
        from p2pnat.relay.core import synchronous
        from tests.unit.test_taps import UDPMemoryReactor

        config = C.load(None, tap.SCHEMA, {
            "relay.state_dir": state_dir, "relay.hostname": "relay.test",
            "udp.listen": "127.0.0.1:0", "terminal.https": "", "tunnel.listen": "",
            "cluster.redis": "redis://127.0.0.1:1/0", "cluster.node": "x"})
        svc = tap.RelayService(config, UDPMemoryReactor(), run_blocking=synchronous,
                               run_store=synchronous)
        self.addCleanup(svc.registry.close)
        return svc

    def terminal(self, svc):
        from p2pnat.relay.terminal import Terminal

        t = Terminal(svc.relay, True)
        t.makeConnection(Transport())
        t.dataReceived(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        return t

    def test_refused_as_revoked_and_merged_again(self):
        state_dir = self.mktemp()
        first = self.service(state_dir)
        self.assertIsNone(first.registry.device("cam"), "provisioned on another node")
        first.registry.import_device(imported(revoked=150.0))
        first.registry.close()

        x = self.service(state_dir)
        self.assertFalse(x.cluster.available())
        self.assertEqual(status(self.terminal(x).transport), 403)
        # What X merges into a Redis that comes back empty (a new epoch):
        # the revocation, which wins over the provisioning node's active row.
        self.assertIsInstance(x.cluster, R.RedisState)
        self.assertEqual(x.local_records()["cam"].revoked, 150.0)

    def test_revoke_keeps_it(self):
        """RelayService.revoke of a device only the shared registry had: kept in SQLite."""
        state_dir = self.mktemp()
        first = self.service(state_dir)
        first.reactor.advance(1_700_000_000)
        first.apply_records({"cam": imported()})  # as read from Redis
        first.revoke("cam")
        self.assertIsNotNone(first.registry.device("cam").revoked)
        first.registry.close()
        x = self.service(state_dir)
        self.assertEqual(status(self.terminal(x).transport), 403)
        self.assertIsNotNone(x.local_records()["cam"].revoked)
