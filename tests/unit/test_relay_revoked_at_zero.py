"""
A device's ``revoked`` is a time (POSIX seconds) or None: a revocation at
time 0.0 is a revocation.  Records with any time come from other nodes
through the shared registry (L{Registry.import_device} and the cluster's
codec accept every finite time), so the relay's device table must test
``is not None``, never the time's truth.
"""

from twisted.trial.unittest import SynchronousTestCase

from tests.unit import test_cluster_revocation
from tests.unit.test_cluster import record
from tests.unit.test_relay_terminal import status


class RevokedAtZeroTests(SynchronousTestCase):
    service = test_cluster_revocation.RestartTests.service
    terminal = test_cluster_revocation.RestartTests.terminal

    def setUp(self):
        self.svc = self.service(self.mktemp())
        self.closed = []
        self.patch(self.svc.relay, "device_revoked", self.closed.append)

    def test_revoked_at_zero_is_refused(self):
        """Read revoked at 0.0 from the shared registry: refused as revoked (403)."""
        self.svc.apply_records({"cam": record(revoked=0.0)})
        self.assertTrue(self.svc.table.get("cam").revoked)
        self.assertEqual(status(self.terminal(self.svc).transport), 403)

    def test_revocation_at_zero_closes_the_tunnels(self):
        """An active device revoked at 0.0: its tunnels close as for any other time."""
        self.svc.apply_records({"cam": record()})
        self.assertFalse(self.svc.table.get("cam").revoked)
        self.assertEqual(self.closed, [])
        self.svc.apply_records({"cam": record(revoked=0.0)})
        self.assertEqual(self.closed, ["cam"])
        self.assertTrue(self.svc.table.get("cam").revoked)
