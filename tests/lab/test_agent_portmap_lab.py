"""
The device agent's port mapping in the NAT lab: a relay on the internet
segment, a device behind a symmetric-random router running Debian's
miniupnpd (PCP, NAT-PMP and UPnP IGD on), and a terminal fetching the
device's page with ``curl`` through the relay.

:class:`AgentPortmapTests` shows, with real processes:

- the agent's gateway maps its notify socket, its notifies tell the relay
  the mapped address, and the relay records it (its log, the router's
  miniupnpd table: one UDP mapping to the agent's notify port);
- a terminal reaches the device through the relay on that address alone:
  the router's conntrack is flushed (the notifies' own mapping is gone,
  and a symmetric-random NAT gives the next flow another port) and the page
  is fetched before the agent's next notify; a control device behind a
  router without port mapping is not reached after the same flush;
- the mapping is gone from the router once the agent stopped.

Needs root, ``ip``, ``nft``, ``conntrack``, ``curl`` and ``miniupnpd``
(``miniupnpd-nftables``): skips with the reason otherwise, and fails
instead when the environment variable ``CI`` is set.
"""

import re
import time

from p2pnat.lab import upnp
from tests.support.lab import relay as F
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import wait_for_log

#: The agents' notify-B interval: long (the relay advises at most 25 s),
#: so that no notify renews the NAT mapping between the flush and the fetch.
B_INTERVAL = 20.0
#: curl's limit for the control device's fetch, which must fail.
CONTROL_MAX_TIME = 5


class AgentPortmapTests(LabTestCase):
    tools = ("curl",)

    @classmethod
    def make_env(cls, workdir):
        return F.RelayLab.with_docroot(workdir)

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.router = lab.add_router("rmap", kind="symmetric-random")
        cls.upnpd = upnp.start_miniupnpd(cls.router)
        cls.dev = lab.add_host("dev", behind=cls.router)
        cls.plain_router = lab.add_router("rplain", kind="symmetric-random")
        cls.plain = lab.add_host("plain", behind=cls.plain_router)
        cls.term = lab.add_host("term")
        rl.start_relay()
        for host in (cls.dev, cls.plain):
            rl.start_web(host)

    def relay_lines(self, device_id, start):
        """The relay's lines about ``device_id``'s NAT mapping after offset ``start``."""
        return re.findall(rf"device {re.escape(device_id)} (?:online at|mapping now) \S+",
                          self.env.relay.stdout()[start:])

    def test_mapped_address_recorded_used_and_deleted(self):
        rl, dev = self.env, self.dev
        start = len(rl.relay.stdout())
        device = rl.add_device("cam", dev, b_interval=B_INTERVAL)
        # The agent's own account of the grant, then the relay's record.
        granted = wait_for_log(device.agent, r"gateway mapped (\S+):(\d+) to notify port (\d+)"
                                             r" \((\S+),", timeout=10)
        ext_ip, ext_port, port = granted.group(1), int(granted.group(2)), int(granted.group(3))
        self.assertEqual(ext_ip, self.router.public_ip, device.agent.describe())
        recorded = wait_for_log(rl.relay, r"device cam port-mapped at (\S+)", start, timeout=10)
        self.assertEqual(recorded.group(1), f"{ext_ip}:{ext_port}")
        self.assertEqual(self.upnpd.mappings(), [("udp", ext_port, dev.ip, port)],
                         self.upnpd.describe())

        # The notifies' mapping goes; only the port mapping leads to the agent now.
        control = rl.add_device("ctl", self.plain, b_interval=B_INTERVAL)
        mark = len(rl.relay.stdout())
        t0 = time.monotonic()
        self.lab.flush_conntrack(self.router)
        self.lab.flush_conntrack(self.plain_router)
        f = rl.fetch(self.term, "cam", max_time=10)
        self.assertEqual((f.exit, f.status, f.body), (0, 200, F.INDEX), f.describe())
        missed = rl.fetch(self.term, "ctl", max_time=CONTROL_MAX_TIME)
        self.assertLess(time.monotonic() - t0, B_INTERVAL - 2,
                        "too slow: a notify B may have renewed the NAT mappings")
        self.assertNotEqual((missed.exit, missed.status), (0, 200),
                            f"the control device was reached without a mapping: "
                            f"{missed.describe()}")
        self.assertEqual(self.relay_lines("cam", mark), [], "a notify moved the mapping")
        self.assertEqual(self.relay_lines("ctl", mark), [], "a notify moved the mapping")
        measured(f"cam reached at {ext_ip}:{ext_port} ({granted.group(4)}) in {f.seconds:.3f}s"
                 f" after a flush; control: curl exit {missed.exit}, HTTP {missed.status}")

        device.agent.stop(grace=5)
        # twistd ends by the signal that stopped it (status -15), once shut down.
        self.assertIn("Server Shut Down", device.agent.stdout(), device.agent.describe())
        self.assertEqual(self.upnpd.mappings(), [], self.upnpd.describe())
        control.agent.stop(grace=5)
