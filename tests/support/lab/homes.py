"""
Homes: lobby clients each on a host of its own behind a NAT router of its
own, and the UDP blocks between two of them that force a relayed path.

- :func:`add_home`: one client of a :class:`~tests.support.lab.p2p.P2PLab`
  behind a new router (of any kind, behind the internet or another router,
  with the router's own options such as ``udp_timeout``);
- :class:`UdpBlock`: drop UDP between two addresses on the internet
  switch (:meth:`UdpBlock.on_internet`, as if the route between two NATs
  broke), or to and from one address in a router's forwarding
  (:meth:`UdpBlock.in_router`); :meth:`UdpBlock.lift` lets it through
  again (idempotent, so it can also be a test's cleanup).

Node names are at most 12 of ``[a-z0-9]`` (:class:`p2pnat.lab.Lab`): a
home's router is ``r`` + the client's ID and its host the client's ID
unless named otherwise.
"""

import subprocess


def add_home(pl, cid, kind, *, router=None, host=None, behind=None, **router_options):
    """
    Add client ``cid`` to ``pl`` on a host of its own (named ``host``,
    default ``cid``) behind a new router of ``kind`` (named ``router``,
    default ``"r" + cid``), whose WAN is on ``behind``'s LAN (default: the
    internet).  ``router_options`` go to :meth:`p2pnat.lab.Lab.add_router`
    (``udp_timeout``, ``delay_ms`` ...).  Return the router.
    """
    lab = pl.lab
    r = lab.add_router(router or f"r{cid}", kind=kind, behind=behind, **router_options)
    pl.add_client(cid, lab.add_host(host or cid, behind=r))
    return r


class UdpBlock:
    """
    UDP dropped in one namespace's forwarding (an nftables table of its
    own, named ``name``), from when this returns until :meth:`lift`.
    """

    def __init__(self, run, family, matches, name):
        self._run = run
        self._family = family
        self.name = name
        drops = "".join(f"    {m} meta l4proto udp drop\n" for m in matches)
        self._run(["nft", "-f", "-"], input=(
            f"table {family} {name} {{\n  chain forward {{\n"
            f"    type filter hook forward priority -10; policy accept;\n{drops}  }}\n}}\n"),
            check=True)
        self.on = True

    @classmethod
    def on_internet(cls, lab, x, y, name="homeblock"):
        """Between WAN addresses ``x`` and ``y``, both ways, on the internet switch."""
        inet = lab._internet()

        def run(argv, check=False, **kwargs):
            return subprocess.run(["ip", "netns", "exec", inet, *argv], text=True,
                                  capture_output=True, timeout=10, check=check, **kwargs)

        return cls(run, "bridge", [f"ip saddr {x} ip daddr {y}", f"ip saddr {y} ip daddr {x}"],
                   name)

    @classmethod
    def in_router(cls, router, peer, name="homeblock"):
        """To and from address ``peer``, in ``router``'s forwarding."""

        def run(argv, **kwargs):
            return router.run(argv, timeout=10, **kwargs)

        return cls(run, "ip", [f"ip daddr {peer}", f"ip saddr {peer}"], name)

    def lift(self):
        """Let the UDP through again (nothing if lifted already)."""
        if self.on:
            self.on = False
            self._run(["nft", "delete", "table", self._family, self.name])
