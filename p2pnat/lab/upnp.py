# -*- test-case-name: tests.unit.test_portmap_lab_rules,tests.lab.test_portmap_lab -*-
"""
Debian's ``miniupnpd`` (package ``miniupnpd-nftables``) on a NAT lab
router: a gateway that grants port mappings by UPnP IGD, NAT-PMP and PCP,
each switchable.

:func:`start_miniupnpd` starts it in a :class:`~p2pnat.lab.topology.Router`'s
namespace with its own configuration in a temporary directory, its own
nftables table (``inet p2pnat_upnp``) and one rule added to the router's
forward chain (:func:`p2pnat.lab.nft.accept_dnat_rule`) so that mapped
ports get through the home-router firewall.  The lab stops it with the
router's namespace; :meth:`MiniUPnPd.stop` stops it earlier.

Two things about miniupnpd 2.3.1 (Debian 12) shape this:

- It keeps its rules in tables and chains that must exist when it starts
  (:func:`miniupnpd_ruleset` makes them).  Its postrouting chain runs just
  before the lab's masquerade, since the first NAT rule that matches a
  flow wins.
- It refuses to map anything when its WAN address is in a reserved range
  (the lab's internet is 198.18.0.0/15, RFC 2544), and an ``ext_ip`` in
  such a range is an error; it has no ``ext_allow_private_ipv4`` before
  2.3.4.  It does accept the address that STUN reports, so the router
  answers its own STUN: :func:`stun_main` runs on the router's WAN address
  inside the router's namespace (the traffic never leaves it) and answers
  every Binding request from the socket it came to, which tells miniupnpd
  what is true of the lab router: nothing upstream filters or translates.

NAT-PMP and PCP share miniupnpd's ``enable_natpmp`` switch and port 5351;
switching one of them off drops its requests (by version byte: 0 NAT-PMP,
2 PCP) in ``p2pnat_upnp``'s input chain, as a gateway that does not speak
it would.

``python -m p2pnat.lab.upnp stun --listen IP:PORT`` is that STUN responder.
"""

import argparse
import json
import os
import re
import select
import shutil
import socket
import sys
import tempfile
import time
import uuid

from p2pnat.lab import nft
from p2pnat.lab.errors import LabConfigError, LabError, LabUnavailable

#: The nftables table (family inet) miniupnpd keeps its rules in.
TABLE = "p2pnat_upnp"
FORWARD_CHAIN = "miniupnpd"
PREROUTING_CHAIN = "prerouting_miniupnpd"
POSTROUTING_CHAIN = "postrouting_miniupnpd"
#: Where the router's own STUN responder listens (on its WAN address).
STUN_PORT = 3478
#: miniupnpd's HTTP port for UPnP (descriptions and SOAP).
HTTP_PORT = 5000

_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
# miniupnpd -d logs to standard error: what it says once it serves.
_FORWARDING = "Port forwarding is now enabled"
_SERVING_UPNP = "HTTP listening on port"
_SERVING_5351 = "Listening for NAT-PMP/PCP traffic"


def miniupnpd_path():
    """The miniupnpd binary, or ``None``."""
    return shutil.which("miniupnpd") or shutil.which("miniupnpd", path=_SBIN)


def miniupnpd_ruleset(pcp=True, natpmp=True, lan="lan"):
    """
    The ``inet p2pnat_upnp`` table miniupnpd needs before it starts: its
    forward, prerouting and postrouting chains with the base chains that
    jump to them, and the input rules that switch PCP or NAT-PMP off.
    """
    drops = []
    for on, version in ((pcp, 2), (natpmp, 0)):
        if not on:
            # The first byte of the UDP payload is the version.
            drops.append(f'    iifname "{lan}" udp dport 5351 @th,64,8 {version} drop')
    lines = [
        f"table inet {TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    jump {FORWARD_CHAIN}",
        "  }",
        f"  chain {FORWARD_CHAIN} {{",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f"    jump {PREROUTING_CHAIN}",
        "  }",
        "  chain postrouting {",
        # Before the lab's masquerade (srcnat, 100): the first NAT wins.
        "    type nat hook postrouting priority 99; policy accept;",
        f"    jump {POSTROUTING_CHAIN}",
        "  }",
        f"  chain {PREROUTING_CHAIN} {{",
        "  }",
        f"  chain {POSTROUTING_CHAIN} {{",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *drops,
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def miniupnpd_config(wan_ip, lan_net, upnp=True, pcp_or_natpmp=True, min_lifetime=2,
                     max_lifetime=86400, lease_file=None, wan="wan", lan="lan"):
    """
    miniupnpd's configuration file for a lab router (text).  Mappings are
    allowed for the LAN's hosts, each for itself (secure mode), on ports
    1024-65535.
    """
    if not (upnp or pcp_or_natpmp):
        raise LabConfigError("miniupnpd with UPnP, NAT-PMP and PCP all off serves nothing")
    if not 1 <= min_lifetime <= max_lifetime:
        raise LabConfigError("need 1 <= min_lifetime <= max_lifetime")
    yes = {True: "yes", False: "no"}
    lines = [
        f"ext_ifname={wan}",
        f"listening_ip={lan}",
        "ipv6_disable=yes",
        f"http_port={HTTP_PORT}",
        f"enable_upnp={yes[upnp]}",
        f"enable_natpmp={yes[pcp_or_natpmp]}",
        "ext_perform_stun=yes",
        f"ext_stun_host={wan_ip}",
        f"ext_stun_port={STUN_PORT}",
        "secure_mode=yes",
        "system_uptime=no",
        f"min_lifetime={int(min_lifetime)}",
        f"max_lifetime={int(max_lifetime)}",
        f"upnp_table_name={TABLE}",
        f"upnp_nat_table_name={TABLE}",
        f"upnp_forward_chain={FORWARD_CHAIN}",
        f"upnp_nat_chain={PREROUTING_CHAIN}",
        f"upnp_nat_postrouting_chain={POSTROUTING_CHAIN}",
        f"uuid={uuid.uuid4()}",
        "notify_interval=60",
        # Expired mappings are removed within this many seconds.
        "clean_ruleset_interval=1",
        "clean_ruleset_threshold=0",
        f"allow 1024-65535 {lan_net} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    if lease_file:
        lines.insert(5, f"lease_file={lease_file}")
    return "\n".join(lines) + "\n"


# nft prints miniupnpd's DNAT rules as e.g.
#   iif "wan" @nh,72,8 0x11 th dport 4000 dnat ip to 10.0.1.2:4000
# (the IPv4 header's protocol byte: 0x11 UDP, 0x6 TCP).
_RULE = re.compile(r"(?:@nh,72,8 (0x11|0x6|17|6)\b|\b(udp|tcp)\b).*?\bdport (\d+)\b.*"
                   r"\bdnat (?:ip )?to ([\d.]+):(\d+)")
_PROTOCOL_BYTE = {"0x11": "udp", "17": "udp", "0x6": "tcp", "6": "tcp"}


def parse_mappings(chain_text):
    """
    The mappings in the text of ``nft list chain ... prerouting_miniupnpd``:
    a list of ``(protocol, external port, internal ip, internal port)``.
    """
    found = []
    for line in chain_text.splitlines():
        m = _RULE.search(line)
        if m:
            protocol = _PROTOCOL_BYTE.get(m.group(1)) or m.group(2)
            found.append((protocol, int(m.group(3)), m.group(4), int(m.group(5))))
    return found


class MiniUPnPd:
    """
    miniupnpd running on ``router`` (see :func:`start_miniupnpd`):
    :attr:`process` and :attr:`stun` are the lab processes,
    :meth:`mappings` reads what it forwards now, :meth:`stop` ends it.
    """

    def __init__(self, router, process, stun, workdir):
        self.router = router
        self.process = process
        self.stun = stun
        self.workdir = workdir

    def mappings(self):
        """What miniupnpd forwards now: ``(protocol, ext port, int ip, int port)`` each."""
        done = self.router.run([_nft(), "list", "chain", "inet", TABLE, PREROUTING_CHAIN])
        if done.returncode != 0:
            raise LabError(f"nft list chain in {self.router.name}: {done.stderr.strip()}")
        return parse_mappings(done.stdout)

    def describe(self):
        """Its output, for a failure message."""
        return f"{self.process.describe()}\n{self.stun.describe()}"

    def stop(self):
        """End miniupnpd and its STUN responder and drop its table."""
        self.process.stop()
        self.stun.stop()
        self.router.run([_nft(), "delete", "table", "inet", TABLE])
        shutil.rmtree(self.workdir, ignore_errors=True)


def _nft():
    return shutil.which("nft") or shutil.which("nft", path=_SBIN) or "nft"


def _load(router, ruleset):
    done = router.run([_nft(), "-f", "-"], input=ruleset)
    if done.returncode != 0:
        raise LabError(f"nft in {router.name}: {done.stderr.strip()}")


def start_miniupnpd(router, upnp=True, natpmp=True, pcp=True, min_lifetime=2,
                    max_lifetime=86400, timeout=10.0):
    """
    Start miniupnpd on ``router`` (a NAT router of the lab) with UPnP IGD,
    NAT-PMP and PCP each on or off, and wait until it serves; return a
    :class:`MiniUPnPd`.  PCP lifetimes are clamped to
    ``min_lifetime``-``max_lifetime`` seconds (short ones let tests see
    renewals).  Raise :class:`LabUnavailable` without the
    ``miniupnpd-nftables`` package.
    """
    binary = miniupnpd_path()
    if binary is None:
        raise LabUnavailable("needs miniupnpd (apt-get install miniupnpd-nftables)")
    if router.ns is None or router.lan is None:
        raise LabConfigError(f"{router.name} is not a NAT router")
    # In the lab's own temporary directory: removed with the lab at the latest.
    workdir = tempfile.mkdtemp(prefix=f"miniupnpd-{router.name}-", dir=router.lab._tmp)
    config = miniupnpd_config(router.wan_ip, router.lan, upnp, pcp or natpmp, min_lifetime,
                              max_lifetime, lease_file=os.path.join(workdir, "leases"))
    conf = os.path.join(workdir, "miniupnpd.conf")
    with open(conf, "w") as f:
        f.write(config)
    _load(router, miniupnpd_ruleset(pcp, natpmp))
    _load(router, nft.accept_dnat_rule())
    stun = router.popen(router.python("-m", "p2pnat.lab.upnp", "stun",
                                      f"--listen={router.wan_ip}:{STUN_PORT}"))
    stun.wait_for_output('"listening"')
    process = router.popen([binary, "-d", "-f", conf, "-P", os.path.join(workdir, "pid")])
    daemon = MiniUPnPd(router, process, stun, workdir)
    expected = [_FORWARDING, *([_SERVING_UPNP] if upnp else []),
                *([_SERVING_5351] if pcp or natpmp else [])]
    deadline = time.monotonic() + timeout
    while True:
        err = process.stderr()
        if all(line in err for line in expected):
            return daemon
        if process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise LabError(f"miniupnpd did not start on {router.name}:\n{daemon.describe()}")
        time.sleep(0.02)


# -- the router's own STUN responder ---------------------------------------


def stun_main(listen, duration):
    """
    Answer STUN Binding requests on ``listen`` (``(ip, port)``) from the same
    socket, for ``duration`` seconds; print ``{"event": "listening"}`` once
    bound.  Malformed datagrams are dropped.
    """
    from p2pnat.protocol import stun

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(listen)
    print(json.dumps({"event": "listening", "addr": f"{listen[0]}:{listen[1]}"}), flush=True)
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], min(left, 1.0))
        if not ready:
            continue
        data, source = sock.recvfrom(2048)
        try:
            # One socket on purpose (see the module's docstring).
            answer = stun.answer_binding(data, source, honour_change=True)
        except stun.StunError:
            continue
        if answer is not None:
            sock.sendto(answer, source)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m p2pnat.lab.upnp")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("stun", help="the lab router's own STUN responder")
    serve.add_argument("--listen", required=True, help="IP:PORT")
    serve.add_argument("--duration", type=float, default=3600.0)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    stun_main((host, int(port)), args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
