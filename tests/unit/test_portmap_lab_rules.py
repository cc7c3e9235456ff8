"""
Tests for the text p2pnat.lab.upnp gives miniupnpd and nftables (no root):
the switches, the chains miniupnpd expects, the firewall hook, and reading
miniupnpd's rules back.
"""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.lab import nft, upnp
from p2pnat.lab.errors import LabConfigError

LAN = ipaddress.IPv4Network("10.0.1.0/24")


def config_dict(text):
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line]
    return dict(pairs)


class RulesetTests(SynchronousTestCase):
    def test_chains_miniupnpd_needs(self):
        text = upnp.miniupnpd_ruleset()
        self.assertIn("table inet p2pnat_upnp {", text)
        for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
            self.assertIn(f"  chain {chain} {{", text)
            self.assertIn(f"jump {chain}", text)
        # Its NAT runs before the lab's masquerade (srcnat, 100).
        self.assertIn("type nat hook postrouting priority 99;", text)
        self.assertNotIn("drop", text)

    def test_switches(self):
        no_pcp = upnp.miniupnpd_ruleset(pcp=False)
        self.assertIn('iifname "lan" udp dport 5351 @th,64,8 2 drop', no_pcp)
        self.assertNotIn("@th,64,8 0 drop", no_pcp)
        no_natpmp = upnp.miniupnpd_ruleset(natpmp=False)
        self.assertIn('iifname "lan" udp dport 5351 @th,64,8 0 drop', no_natpmp)
        self.assertNotIn("@th,64,8 2 drop", no_natpmp)

    def test_accept_dnat_hook(self):
        self.assertEqual(nft.accept_dnat_rule(),
                         'insert rule ip p2pnat forward iifname "wan" ct status dnat accept\n')


class ConfigTests(SynchronousTestCase):
    def test_config(self):
        conf = config_dict(upnp.miniupnpd_config("198.18.2.1", LAN, min_lifetime=2,
                                                 lease_file="/tmp/x/leases"))
        self.assertEqual(conf["ext_ifname"], "wan")
        self.assertEqual(conf["listening_ip"], "lan")
        self.assertEqual((conf["enable_upnp"], conf["enable_natpmp"]), ("yes", "yes"))
        # The router answers its own STUN (reserved lab addresses).
        self.assertEqual((conf["ext_perform_stun"], conf["ext_stun_host"],
                          conf["ext_stun_port"]), ("yes", "198.18.2.1", "3478"))
        self.assertEqual(conf["upnp_table_name"], upnp.TABLE)
        self.assertEqual(conf["upnp_nat_postrouting_chain"], upnp.POSTROUTING_CHAIN)
        self.assertEqual(conf["min_lifetime"], "2")
        self.assertEqual(conf["lease_file"], "/tmp/x/leases")
        text = upnp.miniupnpd_config("198.18.2.1", LAN)
        self.assertIn("allow 1024-65535 10.0.1.0/24 1024-65535\n", text)
        self.assertTrue(text.endswith("deny 0-65535 0.0.0.0/0 0-65535\n"))

    def test_switches(self):
        conf = config_dict(upnp.miniupnpd_config("198.18.2.1", LAN, upnp=False))
        self.assertEqual((conf["enable_upnp"], conf["enable_natpmp"]), ("no", "yes"))
        conf = config_dict(upnp.miniupnpd_config("198.18.2.1", LAN, pcp_or_natpmp=False))
        self.assertEqual((conf["enable_upnp"], conf["enable_natpmp"]), ("yes", "no"))

    def test_bad(self):
        self.assertRaises(LabConfigError, upnp.miniupnpd_config, "198.18.2.1", LAN, False, False)
        self.assertRaises(LabConfigError, upnp.miniupnpd_config, "198.18.2.1", LAN,
                          min_lifetime=10, max_lifetime=5)


class MappingsTests(SynchronousTestCase):
    def test_parse(self):
        text = """table inet p2pnat_upnp {
	chain prerouting_miniupnpd {
		iif "wan" @nh,72,8 0x11 th dport 4000 dnat ip to 10.0.1.2:4000
		iif "wan" @nh,72,8 0x6 th dport 2222 dnat ip to 10.0.1.3:22
		iif "wan" udp dport 5000 dnat to 10.0.1.4:5001
	}
}
"""
        self.assertEqual(upnp.parse_mappings(text), [
            ("udp", 4000, "10.0.1.2", 4000),
            ("tcp", 2222, "10.0.1.3", 22),
            ("udp", 5000, "10.0.1.4", 5001),
        ])
        self.assertEqual(upnp.parse_mappings("chain prerouting_miniupnpd {\n}\n"), [])
