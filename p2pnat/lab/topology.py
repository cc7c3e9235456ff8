# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
NAT lab topologies: network namespaces joined by veth pairs, with the Linux
kernel's own NAT (nftables) on namespace routers.

The shape of every lab::

    servers, public hosts          routers (NAT)              hosts
    198.18.1.x / 198.18.3.x  ---  wan 198.18.2.x | lan .1  ---  lan .2, .3 ...
              \\ bridge "sw" in the "inet" namespace /

The internet segment is one bridge in its own namespace, with
198.18.0.0/16 (benchmark range) on-link for everyone and no default route
anywhere, so nothing a lab sends can leave it.  A router's LAN is a bridge
in the router's namespace; a router may sit behind another router's LAN
(carrier-grade NAT), whose segment then uses 100.64.0.0/10.

A dual-stack lab (``Lab(ipv6=True)``) adds IPv6 from the benchmarking
range 2001:2::/48 (RFC 5180), still with no default route::

    servers, public hosts           routers (ipv6=True)           hosts
    2001:2::1:x / 2001:2::3:x  ---  wan 2001:2::2:x | lan ::1  ---  lan ::2, ::3 ...
                                            lan 2001:2:0:N::/64, routed, no NAT66

The internet segment is 2001:2::/64; its switch (2001:2::1, the "inet"
namespace) routes each router's LAN /64 to that router's WAN address, and
every node reaches the rest of 2001:2::/48 through it (public nodes) or
through its router (hosts).  A home router forwards IPv6 through a stateful
firewall (:func:`p2pnat.lab.nft.ipv6_firewall_ruleset`): replies get in,
nothing unsolicited does.  A carrier-grade NAT (the outer router of a
``"double"``) does not firewall IPv6: it only routes, as carriers do, and
the home router behind it gets a /64 of its own.  Addresses are static
(no router advertisements, no SLAAC) and usable at once (no duplicate
address detection).  A host or server made with ``ipv4=False`` has no IPv4
address at all.

Everything here is synchronous and uses the ``ip``, ``nft`` and
``conntrack`` commands: a reactor cannot change namespace, so programs under
test run as their own processes (:meth:`Node.popen`) and the lab tracks them.
"""

import atexit
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from p2pnat.lab import nft, state
from p2pnat.lab.errors import LabConfigError, LabError, LabUnavailable

#: The internet segment: every public address is on-link here.
INTERNET = ipaddress.IPv4Network("198.18.0.0/16")
SWITCH_IP = ipaddress.IPv4Address("198.18.0.1")
#: Third octet of the public address of each sort of node (readability).
_PUBLIC_BLOCK = {"server": 1, "router": 2, "host": 3}
#: Carrier-grade NAT segments are carved from the shared address space.
CGN_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
#: Every IPv6 address of a dual-stack lab (RFC 5180 benchmarking range).
LAB6 = ipaddress.IPv6Network("2001:2::/48")
#: The internet segment's IPv6 prefix: every public IPv6 address is on-link here.
INTERNET6 = ipaddress.IPv6Network("2001:2::/64")
#: The switch's IPv6 address: the router of every LAN prefix on the internet segment.
SWITCH_IP6 = ipaddress.IPv6Address("2001:2::1")

_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
_PROBE = "p2pnat.lab.probe"
# The directory that holds the p2pnat package, so that ``python -m p2pnat...``
# works inside a namespace whatever the current directory.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_lab_counter = itertools.count(1)
# Why tc netem does not work here ("" when it does; None until tried).
_netem_error = None


def hostport(ip, port):
    """``ip:port``, or ``[ip]:port`` for an IPv6 address: how the lab's tools read addresses."""
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def _which(tool):
    return shutil.which(tool) or shutil.which(tool, path=_SBIN)


def unavailable_reason(tools=("ip", "nft")):
    """
    Why this machine cannot build a lab, or ``None`` if it can: the lab
    needs root and the ``ip`` and ``nft`` commands (``conntrack`` only for
    :meth:`Lab.flush_conntrack`).
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    missing = [t for t in tools if _which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install nftables iproute2 conntrack)"
    return None


def _run(argv, input=None, timeout=30):
    """Run a setup command; raise :class:`LabError` with its stderr if it fails."""
    tool = _which(argv[0]) or argv[0]
    try:
        done = subprocess.run(
            [tool, *argv[1:]], input=input, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from e
    if done.returncode != 0:
        err = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        what = " ".join(map(str, argv[:8])) + (" ..." if len(argv) > 8 else "")
        raise LabError(f"{what}: {err}")
    return done


def netns_list():
    """The names of every network namespace ``ip netns`` knows."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(names)


def _pids_in(ns):
    tool = _which("ip") or "ip"
    done = subprocess.run([tool, "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_pids(pids, grace=1.0):
    """TERM the given processes, then KILL those still there after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [p for p in alive if state.process_start_time(p) is not None]
        pids = alive


def delete_namespace(ns):
    """
    Delete namespace ``ns`` after ending the processes inside it (they were
    started in our lab, by the lab or by someone who entered it).  Deleting
    it frees its veth ends, bridges, routes and nftables rules.
    """
    if ns not in netns_list():
        return
    try:
        _kill_pids(_pids_in(ns))
    except (OSError, subprocess.TimeoutExpired):
        pass
    tool = _which("ip") or "ip"
    subprocess.run([tool, "netns", "delete", ns], capture_output=True, timeout=10)


def reap_stale(state_dir=state.STATE_DIR):
    """
    Delete the namespaces and state files of labs whose owner process is
    dead (a killed test run).  Never touches a namespace outside the lab's
    naming family, a named (persistent) lab, or a lab whose owner lives.
    Return the namespaces deleted.
    """
    doomed, dead = state.stale_namespaces(netns_list(), state.load_states(state_dir))
    for ns in doomed:
        delete_namespace(ns)
    for lab_id in dead:
        state.remove_state(state_dir, lab_id)
    return doomed


class LabProcess:
    """
    A process started inside a lab namespace.  Its standard output and error
    go to files (never a pipe that could fill up and block it) and can be
    read at any time, also after teardown, for failure messages.
    """

    def __init__(self, node, argv, popen, out_path, err_path, own_group=True):
        self.node = node
        #: Whether the process leads its own process group (the default).
        self.own_group = own_group
        self.argv = argv
        self.popen = popen
        self._paths = (out_path, err_path)
        self._final = None

    @property
    def pid(self):
        """The process id (``ip netns exec`` execs, so it is the program's own)."""
        return self.popen.pid

    def poll(self):
        """The exit status, or ``None`` while it runs."""
        return self.popen.poll()

    def wait(self, timeout=10):
        """Wait for the exit status; raise :class:`LabError` on timeout."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{self.describe()} still running after {timeout}s") from e

    def _read(self, i):
        if self._final is not None:
            return self._final[i]
        if self._paths[i] is None:
            return ""
        try:
            with open(self._paths[i], errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stdout(self):
        """Everything the process printed on standard output so far."""
        return self._read(0)

    def stderr(self):
        """Everything the process printed on standard error so far."""
        return self._read(1)

    def wait_for_output(self, text, timeout=5.0):
        """
        Wait until ``text`` appears in standard output (e.g. a "ready"
        line) and return the output; raise :class:`LabError` if the process
        exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = self.stdout()
            if text in out:
                return out
            if self.poll() is not None:
                raise LabError(f"{self.describe()} exited before printing {text!r}")
            if time.monotonic() >= deadline:
                raise LabError(f"{self.describe()} did not print {text!r} within {timeout}s")
            time.sleep(0.01)

    def stop(self, grace=1.0):
        """End the process (TERM, then KILL after ``grace`` seconds)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            if self.popen.poll() is not None:
                return
            try:
                if self.own_group:
                    # Its own session: end its children too, by group id.
                    os.killpg(self.popen.pid, sig)
                else:
                    self.popen.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                pass

    def _finish(self):
        """Stop, keep the output in memory, and drop the files."""
        self.stop()
        self._final = (self._read(0), self._read(1))
        for path in self._paths:
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def describe(self, tail=2000):
        """A few lines for a failure message: where, what, status, output."""
        status = self.popen.poll()
        lines = [f"[{self.node.name} pid {self.pid} status {status}] {' '.join(map(str, self.argv))}"]
        for label, text in (("stdout", self.stdout()), ("stderr", self.stderr())):
            if text:
                lines.append(f"  {label}: {text[-tail:].rstrip()}")
        return "\n".join(lines)


class Node:
    """
    A namespace of the lab: something that can run programs.
    """

    def __init__(self, lab, name, ns):
        self.lab = lab
        #: The name given to the lab (``"relay"``, ``"a"``...).
        self.name = name
        #: The network namespace (``ip netns exec NODE.ns ...``).
        self.ns = ns

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} ns={self.ns}>"

    def _argv(self, argv):
        return [_which("ip") or "ip", "netns", "exec", self.ns, *map(str, argv)]

    def _env(self, env):
        env = dict(os.environ if env is None else env)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + path if path else "")
        return env

    def run(self, argv, timeout=30, env=None, **kwargs):
        """
        Run ``argv`` inside this namespace and wait for it; return the
        :class:`subprocess.CompletedProcess` (text output captured unless
        ``stdout``/``stderr`` are given).  ``p2pnat`` is importable in it.
        """
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs["capture_output"] = True
        kwargs.setdefault("text", True)
        return subprocess.run(self._argv(argv), timeout=timeout, env=self._env(env), **kwargs)

    def popen(self, argv, env=None, **kwargs):
        """
        Start ``argv`` inside this namespace and return a tracked
        :class:`LabProcess`; the lab ends it at teardown.  Output goes to
        files unless ``stdout``/``stderr`` are given.
        """
        return self.lab._popen(self, argv, self._env(env), **kwargs)

    def python(self, *args):
        """``[sys.executable, *args]``: an argv to run Python inside the lab."""
        return [sys.executable, *map(str, args)]

    def probe(self, *args, timeout=30):
        """
        Run the probe tool (:mod:`p2pnat.lab.probe`) here with ``args`` and
        return its last JSON line as a dict; raise :class:`LabError` if it
        fails.
        """
        done = self.run(self.python("-m", _PROBE, *args), timeout=timeout)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise LabError(
                f"probe {' '.join(map(str, args))} in {self.name} failed "
                f"({done.returncode}): {done.stderr.strip()[-500:]}"
            )
        return json.loads(lines[-1])

    def start_probe(self, *args):
        """Start the probe tool here in the background; a tracked :class:`LabProcess`."""
        return self.popen(self.python("-m", _PROBE, *args))


class Host(Node):
    """
    An end host: a server or public host on the internet segment, or a host
    on a router's LAN.
    """

    def __init__(self, lab, name, ns, ips, router=None, gateway=None, ip6s=()):
        super().__init__(lab, name, ns)
        #: Every IPv4 address of the host (none for an IPv6-only host).
        self.ips = [str(ip) for ip in ips]
        #: Every IPv6 address of the host (global, on its LAN or public).
        self.ip6s = [str(ip) for ip in ip6s]
        #: The :class:`Router` whose LAN the host is on (``None``: public).
        self.router = router
        #: The default gateway, if any.
        self.gateway = gateway
        #: For background hosts, the traffic process.
        self.process = None

    @property
    def ip(self):
        """
        The host's (first) IPv4 address: public, or private on its LAN; for
        an IPv6-only host, its (first) IPv6 address.
        """
        return (self.ips or self.ip6s)[0]

    @property
    def ip6(self):
        """The host's (first) IPv6 address, or ``None`` if it has none."""
        return self.ip6s[0] if self.ip6s else None

    @property
    def public_ip(self):
        """
        The IPv4 address the internet segment sees for this host (``None``
        for an IPv6-only host).  Its IPv6 addresses are seen as they are.
        """
        if not self.ips:
            return None
        return self.ip if self.router is None else self.router.public_ip

    def start_probe_server(self, ports=(3478,), duration=3600):
        """
        Start the probe echo server on every address of this host (IPv4 and
        IPv6) and each of ``ports``, and wait until it listens.  Each address
        is bound on its own so that replies leave from the address a request
        was sent to.
        """
        listen = [f"--listen={hostport(ip, port)}" for ip in self.ips + self.ip6s
                  for port in ports]
        proc = self.start_probe("serve", *listen, f"--duration={duration}")
        proc.wait_for_output('"listening"')
        return proc


class Router(Node):
    """
    A NAT router (or, for kind ``"public"``, the absence of one: hosts added
    behind it sit directly on the internet segment and :attr:`ns` is
    ``None``).
    """

    def __init__(self, lab, name, ns, kind, wan_ip=None, lan=None, upstream=None,
                 wan_ip6=None, lan6=None):
        super().__init__(lab, name, ns)
        #: One of :data:`p2pnat.lab.nft.KINDS`.
        self.kind = kind
        #: The router's own address on its WAN (public, or a CGN address).
        self.wan_ip = str(wan_ip) if wan_ip else None
        #: The LAN network (:class:`ipaddress.IPv4Network`), or ``None``.
        self.lan = lan
        #: The router whose LAN this router's WAN is on (``None``: internet).
        self.upstream = upstream
        #: For a ``"double"`` router: the carrier-grade NAT in front of it.
        self.outer = upstream if kind == "double" else None
        #: The router's global IPv6 address on its WAN, when it routes IPv6.
        self.wan_ip6 = str(wan_ip6) if wan_ip6 else None
        #: The LAN's IPv6 /64 (:class:`ipaddress.IPv6Network`), or ``None``.
        self.lan6 = lan6
        self._next_lan = 2
        # Impairments for links below a "public" pseudo-router.
        self._impair = {}
        self.ruleset = None

    @property
    def lan_ip(self):
        """The router's address on its LAN (the hosts' gateway)."""
        return str(self.lan.network_address + 1) if self.lan else None

    @property
    def ipv6(self):
        """Whether the router routes IPv6 (its LAN has a /64 of its own)."""
        return self.lan6 is not None

    @property
    def lan_ip6(self):
        """The router's IPv6 address on its LAN (the hosts' IPv6 gateway)."""
        return str(self.lan6.network_address + 1) if self.lan6 else None

    @property
    def public_ip(self):
        """The address the internet sees for hosts behind this router."""
        if self.kind == "public":
            return None
        return self.upstream.public_ip if self.upstream else self.wan_ip

    def _allocate_lan_ip(self):
        """
        The next free address on the LAN: ``(ipv4, ipv6)``, with the same
        host number in both (``.5`` and ``::5``); ipv6 is ``None`` unless the
        router routes IPv6.
        """
        ip = self.lan.network_address + self._next_lan
        if ip >= self.lan.broadcast_address:
            raise LabConfigError(f"LAN {self.lan} of {self.name} is full")
        ip6 = self.lan6.network_address + self._next_lan if self.lan6 else None
        self._next_lan += 1
        return ip, ip6

    def run(self, argv, **kwargs):
        """Like :meth:`Node.run`; a ``"public"`` pseudo-router has nothing to run in."""
        if self.ns is None:
            raise LabError(f"{self.name} is a 'public' pseudo-router: it has no namespace")
        return super().run(argv, **kwargs)


class Lab:
    """
    A NAT lab: builds namespaces on demand, and removes all of them on
    :meth:`close` (also from ``__exit__`` when the body raised, and at
    interpreter exit).  Use it as a context manager::

        with Lab() as lab:
            relay = lab.add_server("relay")
            r1 = lab.add_router("r1", kind="symmetric-sequential")
            a = lab.add_host("a", behind=r1)
            a.probe("query", f"--to={relay.ip}:3478")

    With ``ipv6=True`` the lab is dual-stack (see the module's docstring):
    servers and public hosts get global IPv6 addresses beside their IPv4
    ones, and routers made with ``ipv6=True`` route a /64 to their LAN
    through a stateful firewall.

    A lab without ``name`` belongs to the running process: its namespaces
    are ``p2l<pid>x<n>-<node>``, and a later lab reaps them if this process
    is killed before it could clean up.  A named lab (``name="demo"``,
    ``persistent=True``) is for ``p2pnat lab up``: it outlives the process
    and is removed by :func:`destroy_named`.

    Raises :class:`LabUnavailable` if the machine cannot run labs.
    """

    def __init__(self, name=None, persistent=False, state_dir=state.STATE_DIR, reap=True,
                 ipv6=False):
        reason = unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        if persistent and not name:
            raise LabConfigError("a persistent lab needs a name")
        self.name = name
        self.persistent = persistent
        self.state_dir = state_dir
        #: Whether the lab is dual-stack.
        self.ipv6 = bool(ipv6)
        if name:
            self.lab_id = state.named_lab_id(name)
        else:
            self.lab_id = state.ephemeral_lab_id(os.getpid(), next(_lab_counter))
        if reap:
            reap_stale(state_dir)
        if name and state.read_state(state_dir, self.lab_id) is not None:
            raise LabError(f"a lab named {name} exists already: p2pnat lab down --name {name}")
        #: Every node by name: servers, routers and hosts.
        self.nodes = {}
        self.namespaces = []
        self.processes = []
        self._inet = None
        self._ports = {}  # namespace -> next bridge-port number
        self._public_next = dict.fromkeys(_PUBLIC_BLOCK, 1)
        self._lan_next = 1
        self._cgn_next = 1
        self._lan6_next = 1
        self._tmp = tempfile.mkdtemp(prefix=f"p2pnat-lab-{self.lab_id}-")
        self._closed = False
        self._state = {
            "lab_id": self.lab_id,
            "name": name,
            "persistent": persistent,
            "ipv6": self.ipv6,
            "pid": os.getpid(),
            "pid_start": state.process_start_time(os.getpid()),
            "created": time.time(),
            "namespaces": self.namespaces,
            "nodes": [],
        }
        self._save()
        if not persistent:
            atexit.register(self.close)

    # -- life cycle ------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """
        Tear the lab down: end tracked processes (their output is kept),
        delete every namespace (ending what runs inside), remove the state
        file.  Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        if not self.persistent:
            atexit.unregister(self.close)
        for proc in self.processes:
            try:
                proc._finish()
            except Exception:  # teardown goes on whatever one process does
                pass
        for ns in reversed(self.namespaces):
            delete_namespace(ns)
        state.remove_state(self.state_dir, self.lab_id)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def detach(self):
        """
        Leave a persistent lab up when this object goes away (``lab up``):
        processes are no longer tracked here, only by their namespaces.
        """
        if not self.persistent:
            raise LabError("only a persistent lab can be left up")
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _save(self):
        state.write_state(self.state_dir, self._state)

    # -- building --------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise LabError("this lab is closed")

    def _new_ns(self, node):
        ns = state.ns_name(self.lab_id, node)
        if ns in netns_list():
            raise LabError(f"namespace {ns} exists already")
        # Recorded before it exists, so that a crash right now cannot leak it.
        self.namespaces.append(ns)
        self._save()
        _run(["ip", "netns", "add", ns])
        self._ports[ns] = 1
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # A new namespace has bridge-nf-call-iptables=1: frames crossing a
        # bridge would then go through the IP hooks (and conntrack) as if
        # routed.  Real switches do not do that.
        self._sysctl(ns, {"net.bridge.bridge-nf-call-iptables": 0}, optional=True)
        if self.ipv6:
            self._sysctl(ns, {"net.bridge.bridge-nf-call-ip6tables": 0}, optional=True)
            # Before any interface exists, so that every one inherits them:
            # addresses usable at once (no DAD, link-local ones included)
            # and static (no router advertisements taken).
            self._sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0,
                              "net.ipv6.conf.default.accept_dad": 0,
                              "net.ipv6.conf.all.accept_ra": 0,
                              "net.ipv6.conf.default.accept_ra": 0})
        return ns

    def _sysctl(self, ns, values, optional=False):
        args = [f"{k}={v}" for k, v in values.items()]
        try:
            _run(["ip", "netns", "exec", ns, _which("sysctl") or "sysctl", "-q", "-w", *args])
        except LabError:
            if not optional:
                raise

    def _nft(self, ns, ruleset):
        _run(["ip", "netns", "exec", ns, _which("nft") or "nft", "-f", "-"], input=ruleset)

    def _add_node_record(self, **record):
        self._state["nodes"].append(record)
        self._save()

    def _claim_name(self, name):
        self._check_open()
        state.check_node_name(name)
        if name == "inet":
            raise LabConfigError("'inet' is the name of the internet segment")
        # Internal names (a double router's NAME-cgn) hold a "-", which
        # node names cannot: they never clash.
        if name in self.nodes:
            raise LabConfigError(f"the lab has a node named {name} already")
        return name

    def _internet(self):
        """The internet segment's namespace, made on first use."""
        if self._inet is None:
            ns = self._new_ns("inet")
            self._bridge(ns, "sw")
            _run(["ip", "-n", ns, "addr", "add", f"{SWITCH_IP}/{INTERNET.prefixlen}", "dev", "sw"])
            ips6 = []
            if self.ipv6:
                # The switch routes every LAN prefix to its router (see
                # _route_lan6); nothing else, so nothing leaves the lab.
                self._addr6(ns, SWITCH_IP6, INTERNET6, "sw")
                self._sysctl(ns, {"net.ipv6.conf.all.forwarding": 1})
                ips6 = [str(SWITCH_IP6)]
            _run(["ip", "-n", ns, "link", "set", "sw", "up"])
            self._inet = ns
            self._add_node_record(role="internet", name="inet", ns=ns, ips=[str(SWITCH_IP)],
                                  ips6=ips6)
        return self._inet

    def _bridge(self, ns, name):
        """A bridge ``name`` in ``ns``; without multicast snooping in a dual-stack lab."""
        extra = ["mcast_snooping", "0"] if self.ipv6 else []
        _run(["ip", "-n", ns, "link", "add", name, "type", "bridge", *extra])

    def _addr6(self, ns, ip, network, dev):
        """Give ``dev`` in ``ns`` the IPv6 address ``ip`` on ``network``, usable at once."""
        _run(["ip", "-n", ns, "-6", "addr", "add", f"{ip}/{network.prefixlen}", "dev", dev,
              "nodad"])

    def _route6(self, ns, network, via):
        _run(["ip", "-n", ns, "-6", "route", "add", str(network), "via", str(via)])

    def _check_ipv6(self, what):
        if not self.ipv6:
            raise LabConfigError(f"{what} needs a dual-stack lab: Lab(ipv6=True)")

    @staticmethod
    def _public_ip6(ip):
        """The IPv6 twin of public IPv4 address ``ip``: 198.18.B.N is 2001:2::B:N."""
        block, n = ipaddress.IPv4Address(ip).packed[2:]
        return INTERNET6.network_address + (block << 16) + n

    def _lan6(self):
        """A fresh /64 for a router's LAN: 2001:2:0:N::/64."""
        n = self._lan6_next
        if n > 0xFFFF:
            raise LabConfigError("too many IPv6 LANs")
        self._lan6_next += 1
        return ipaddress.IPv6Network(f"{LAB6.network_address + (n << 64)}/64")

    def _route_lan6(self, router):
        """
        Route ``router``'s LAN /64 to it from every router above it and from
        the internet segment's switch.
        """
        node, via = router, router.wan_ip6
        while node.upstream is not None:
            node = node.upstream
            self._route6(node.ns, router.lan6, via)
            via = node.wan_ip6
        self._route6(self._internet(), router.lan6, via)

    def _public_ip(self, sort):
        n = self._public_next[sort]
        if n > 254:
            raise LabConfigError(f"too many {sort}s on the internet segment")
        self._public_next[sort] = n + 1
        return INTERNET.network_address + 256 * _PUBLIC_BLOCK[sort] + n

    def _link(self, ns, ifname, up_ns, bridge, impair=None):
        """
        Join ``ns`` (interface ``ifname``) to bridge ``bridge`` in
        ``up_ns`` by a veth pair, created directly in both namespaces, so no
        name is ever taken in the host's own namespace.  Return the name of
        the bridge port.
        """
        port = f"p{self._ports[up_ns]}"
        self._ports[up_ns] += 1
        _run(["ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", up_ns])
        _run(["ip", "-n", up_ns, "link", "set", port, "master", bridge, "up"])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])
        if impair:
            self._impair_link(ns, ifname, up_ns, port, **impair)
        return port

    def _check_netem(self):
        """
        Raise :class:`LabUnavailable` unless ``tc netem`` works here; tried
        on the internet namespace's loopback, before anything is built.
        """
        global _netem_error
        if _netem_error is None:
            inet = self._internet()
            try:
                _run(["tc", "-n", inet, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
                _run(["tc", "-n", inet, "qdisc", "del", "dev", "lo", "root"])
                _netem_error = ""
            except LabError as e:
                _netem_error = (
                    "delay needs tc netem (kernel CONFIG_NET_SCH_NETEM, module sch_netem), "
                    f"which this kernel lacks ({e}); loss works without it"
                )
        if _netem_error:
            raise LabUnavailable(_netem_error)

    def _impair_link(self, ns, ifname, up_ns, port, delay_ms=0, loss_pct=0):
        # Delay needs sch_netem, on both ends (each end delays what it sends).
        if delay_ms:
            for where, dev in ((ns, ifname), (up_ns, port)):
                _run(["tc", "-n", where, "qdisc", "add", "dev", dev, "root", "netem",
                      "delay", f"{delay_ms}ms"])
        # Loss is done by nftables on the upstream bridge port: it needs no
        # netem, and drops on the wire, after the router's NAT has run.
        if loss_pct:
            self._nft(up_ns, nft.loss_ruleset(port, loss_pct))

    def add_server(self, name, addresses=1, ipv4=True):
        """
        Add a server on the internet segment with ``addresses`` public
        addresses (198.18.1.x; use 2 for RFC 5780 style tests) and return
        its :class:`Host`.  In a dual-stack lab it has as many IPv6 ones
        (2001:2::1:x) too; ``ipv4=False`` makes it IPv6-only.
        """
        self._claim_name(name)
        if not 1 <= addresses <= 8:
            raise LabConfigError("a server has 1 to 8 addresses")
        ips = [self._public_ip("server") for _ in range(addresses)]
        return self._public_host(name, ips, role="server", ipv4=ipv4)

    def _public_host(self, name, ips, role, impair=None, router=None, ipv4=True):
        if not ipv4:
            self._check_ipv6("an IPv6-only host")
        ip6s = [self._public_ip6(ip) for ip in ips] if self.ipv6 else []
        ips = ips if ipv4 else []
        inet = self._internet()
        ns = self._new_ns(name)
        self._link(ns, "eth0", inet, "sw", impair)
        for ip in ips:
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{INTERNET.prefixlen}", "dev", "eth0"])
        for ip in ip6s:
            self._addr6(ns, ip, INTERNET6, "eth0")
        if ip6s:
            self._route6(ns, LAB6, SWITCH_IP6)
        host = Host(self, name, ns, ips, ip6s=ip6s)
        self.nodes[name] = host
        self._add_node_record(role=role, name=name, ns=ns, ips=host.ips, ips6=host.ip6s,
                              behind=router.name if router else None)
        return host

    def add_router(self, name, kind="cone", behind=None, lan=None, delay_ms=0, loss_pct=0,
                   port_base=20000, port_count=2000, port_step=1,
                   outer_kind="symmetric-sequential", udp_timeout=None, ipv6=False):
        """
        Add a router of ``kind`` (see :data:`p2pnat.lab.nft.KINDS`) and
        return its :class:`Router`.

        - ``behind``: a router whose LAN this one's WAN is on (default: the
          internet segment).
        - ``lan``: the LAN network, e.g. ``"192.168.1.0/24"`` for two LANs on
          the same private range (default: a fresh ``10.0.N.0/24``).
        - ``delay_ms``/``loss_pct``: impair the WAN link, both directions
          (delay needs ``sch_netem``; loss uses nftables).
        - ``port_base``/``port_count``/``port_step``: the port plan of a
          ``"symmetric-sequential"`` router (UDP flows take
          ``base, base+step, ...`` and wrap after ``count``).
        - ``outer_kind``: for ``"double"``, the kind of the carrier-grade NAT
          in front of the cone home router; it is named ``NAME-cgn``, its
          segment is in 100.64.0.0/10, and the returned router's
          :attr:`~Router.outer` is it.
        - ``udp_timeout``: the router's conntrack UDP timeout in seconds
          (mapping lifetime), default the kernel's.
        - ``ipv6``: (dual-stack labs) the router also has a global IPv6
          address on its WAN and routes a /64 of its own to its LAN
          (:attr:`~Router.lan6`), through a stateful firewall; no NAT66.  A
          ``"double"`` router's carrier-grade NAT then routes IPv6 without a
          firewall.  Ignored for ``"public"`` (its hosts are public hosts).
        """
        self._claim_name(name)
        if kind not in nft.KINDS:
            raise LabConfigError(f"unknown router kind {kind!r}: use one of {', '.join(nft.KINDS)}")
        if delay_ms < 0 or not 0 <= loss_pct < 100:
            raise LabConfigError("delay_ms must be >= 0 and loss_pct in [0, 100)")
        if kind == "symmetric-sequential":
            nft.check_port_plan(port_base, port_count, port_step)
        if ipv6 and kind != "public":
            self._check_ipv6("a router with ipv6=True")
        if delay_ms:
            self._check_netem()
        impair = {"delay_ms": delay_ms, "loss_pct": loss_pct} if (delay_ms or loss_pct) else None
        if kind == "public":
            if behind is not None:
                raise LabConfigError("a 'public' router is on the internet segment itself")
            router = Router(self, name, None, "public")
            router._impair = impair
            self.nodes[name] = router
            self._add_node_record(role="router", name=name, ns=None, kind=kind)
            return router
        if kind == "double":
            if outer_kind not in ("symmetric-sequential", "symmetric-random", "cone"):
                raise LabConfigError(f"outer_kind must be a NAT kind, not {outer_kind!r}")
            # The CGN takes the WAN link (and its impairments); the home
            # router is a cone behind it.
            outer = self._nat_router(f"{name}-cgn", outer_kind, behind, self._cgn_lan(),
                                     impair, port_base, port_count, port_step, udp_timeout,
                                     ipv6=ipv6, firewall6=False)
            return self._nat_router(name, "double", outer, lan, None, port_base, port_count,
                                    port_step, udp_timeout, ruleset_kind="cone", ipv6=ipv6)
        return self._nat_router(name, kind, behind, lan, impair, port_base, port_count,
                                port_step, udp_timeout, ipv6=ipv6)

    def _cgn_lan(self):
        n = self._cgn_next
        self._cgn_next += 1
        if n > 255:
            raise LabConfigError("too many carrier-grade NATs")
        return ipaddress.IPv4Network(f"{CGN_SPACE.network_address + 256 * n}/24")

    def _nat_router(self, name, kind, behind, lan, impair, port_base, port_count, port_step,
                    udp_timeout, ruleset_kind=None, ipv6=False, firewall6=True):
        if behind is not None and (behind.lab is not self or behind.kind == "public"
                                   or not isinstance(behind, Router)):
            raise LabConfigError("behind= must be a NAT router of this lab")
        if ipv6 and behind is not None and not behind.ipv6:
            raise LabConfigError(f"an IPv6 router cannot sit behind {behind.name},"
                                 " which does not route IPv6")
        if lan is None:
            if self._lan_next > 254:
                raise LabConfigError("too many LANs")
            lan = ipaddress.IPv4Network(f"10.0.{self._lan_next}.0/24")
            self._lan_next += 1
        else:
            try:
                lan = ipaddress.IPv4Network(lan)
            except ValueError as e:
                raise LabConfigError(f"bad LAN {lan!r}: {e}") from e
            if lan.prefixlen > 29 or lan.overlaps(INTERNET):
                raise LabConfigError(f"LAN {lan} must be /29 or larger and not in {INTERNET}")
        ns = self._new_ns(name)
        if behind is None:
            up_ns, bridge = self._internet(), "sw"
            wan_ip = self._public_ip("router")
            wan_ip6 = self._public_ip6(wan_ip) if ipv6 else None
            prefix, gateway = INTERNET.prefixlen, None
            wan6, gateway6 = INTERNET6, SWITCH_IP6
        else:
            up_ns, bridge = behind.ns, "lan"
            wan_ip, wan_ip6 = behind._allocate_lan_ip()
            prefix, gateway = behind.lan.prefixlen, behind.lan_ip
            wan6, gateway6 = behind.lan6, behind.lan_ip6
        lan6 = self._lan6() if ipv6 else None
        router = Router(self, name, ns, kind, wan_ip, lan, behind, wan_ip6, lan6)
        self._link(ns, "wan", up_ns, bridge, impair)
        _run(["ip", "-n", ns, "addr", "add", f"{wan_ip}/{prefix}", "dev", "wan"])
        if gateway:
            _run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
        self._bridge(ns, "lan")
        _run(["ip", "-n", ns, "addr", "add", f"{router.lan_ip}/{lan.prefixlen}", "dev", "lan"])
        if ipv6:
            self._addr6(ns, wan_ip6, wan6, "wan")
            self._addr6(ns, router.lan_ip6, lan6, "lan")
            self._route6(ns, LAB6, gateway6)
        _run(["ip", "-n", ns, "link", "set", "lan", "up"])
        sysctls = {"net.ipv4.ip_forward": 1}
        if ipv6:
            sysctls["net.ipv6.conf.all.forwarding"] = 1
        if udp_timeout:
            sysctls["net.netfilter.nf_conntrack_udp_timeout"] = int(udp_timeout)
            sysctls["net.netfilter.nf_conntrack_udp_timeout_stream"] = int(udp_timeout)
        self._sysctl(ns, sysctls)
        router.ruleset = nft.router_ruleset(ruleset_kind or kind, wan_ip, "wan", port_base,
                                            port_count, port_step)
        if ipv6 and firewall6:
            router.ruleset += nft.ipv6_firewall_ruleset("wan", "lan")
        self._nft(ns, router.ruleset)
        if ipv6:
            self._route_lan6(router)
        self.nodes[name] = router
        self._add_node_record(role="router", name=name, ns=ns, kind=kind, wan_ip=str(wan_ip),
                              lan=str(lan), behind=behind.name if behind else None,
                              wan_ip6=router.wan_ip6, lan6=str(lan6) if lan6 else None)
        return router

    def add_host(self, name, behind=None, ipv4=True):
        """
        Add a host on ``behind``'s LAN (a :class:`Router`), or on the
        internet segment when ``behind`` is ``None`` or a ``"public"``
        router; return its :class:`Host`.  It has a global IPv6 address too
        when it is public in a dual-stack lab or behind a router with
        ``ipv6=True``; ``ipv4=False`` makes it IPv6-only.
        """
        self._claim_name(name)
        if behind is None or behind.kind == "public":
            ip = self._public_ip("host")
            return self._public_host(name, [ip], role="host",
                                     impair=behind._impair if behind else None, router=behind,
                                     ipv4=ipv4)
        if not isinstance(behind, Router) or behind.lab is not self:
            raise LabConfigError("behind= must be a router of this lab")
        if not ipv4 and not behind.ipv6:
            raise LabConfigError(f"an IPv6-only host needs a router with ipv6=True,"
                                 f" and {behind.name} has none")
        ns = self._new_ns(name)
        ip, ip6 = behind._allocate_lan_ip()
        self._link(ns, "eth0", behind.ns, "lan")
        if ipv4:
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{behind.lan.prefixlen}", "dev", "eth0"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", behind.lan_ip])
        if ip6 is not None:
            self._addr6(ns, ip6, behind.lan6, "eth0")
            self._route6(ns, LAB6, behind.lan_ip6)
        host = Host(self, name, ns, [ip] if ipv4 else [], router=behind,
                    gateway=behind.lan_ip if ipv4 else behind.lan_ip6,
                    ip6s=[ip6] if ip6 is not None else [])
        self.nodes[name] = host
        self._add_node_record(role="host", name=name, ns=ns, ips=host.ips, ips6=host.ip6s,
                              behind=behind.name)
        return host

    def add_background(self, name, behind, target, rate=10, port=9, duration=600):
        """
        Add a host on ``behind``'s LAN that opens a new UDP flow (a new
        socket, so a new NAT mapping) to ``target`` (a :class:`Host` or an
        address) on ``port`` ``rate`` times per second, for at most
        ``duration`` seconds; the lab stops it at teardown.  Return the
        :class:`Host`, whose :attr:`~Host.process` is the traffic.
        """
        if not 0.1 <= rate <= 1000:
            raise LabConfigError("rate must be 0.1-1000 flows per second")
        address = target.ip if isinstance(target, Host) else str(ipaddress.IPv4Address(target))
        host = self.add_host(name, behind=behind)
        host.process = host.start_probe("flows", f"--to={address}:{port}", f"--rate={rate}",
                                        f"--duration={duration}")
        return host

    # -- running ---------------------------------------------------------

    def _popen(self, node, argv, env, **kwargs):
        self._check_open()
        if node.ns is None:
            raise LabError(f"{node.name} has no namespace")
        out_path = err_path = None
        files = []
        if "stdout" not in kwargs:
            fd, out_path = tempfile.mkstemp(prefix=f"{node.name}-", suffix=".out", dir=self._tmp)
            kwargs["stdout"] = fd
            files.append(fd)
        if "stderr" not in kwargs:
            fd, err_path = tempfile.mkstemp(prefix=f"{node.name}-", suffix=".err", dir=self._tmp)
            kwargs["stderr"] = fd
            files.append(fd)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        # Own session: stop() can end the whole process group by its id.
        kwargs.setdefault("start_new_session", True)
        try:
            popen = subprocess.Popen(node._argv(argv), env=env, **kwargs)
        finally:
            for fd in files:
                os.close(fd)
        proc = LabProcess(node, list(argv), popen, out_path, err_path,
                          own_group=bool(kwargs["start_new_session"]))
        self.processes.append(proc)
        return proc

    def flush_conntrack(self, router):
        """
        Forget every NAT mapping of ``router`` (``conntrack -F`` in its
        namespace): what mapping expiry does, at once.
        """
        if not _which("conntrack"):
            raise LabUnavailable("flush_conntrack needs the conntrack tool (apt-get install conntrack)")
        _run(["ip", "netns", "exec", router.ns, _which("conntrack"), "-F"])

    def conntrack(self, router):
        """``router``'s conntrack table as text (``conntrack -L``), for debugging."""
        if not _which("conntrack"):
            raise LabUnavailable("needs the conntrack tool (apt-get install conntrack)")
        done = router.run([_which("conntrack"), "-L"])
        return done.stdout

    def describe(self):
        """The topology, one node per line: name, namespace, addresses."""
        lines = []
        for node in self.nodes.values():
            if isinstance(node, Router):
                if node.kind == "public":
                    lines.append(f"router {node.name:<10} (public: no NAT)")
                    continue
                up = f" behind {node.upstream.name}" if node.upstream else ""
                v6 = f" wan6 {node.wan_ip6} lan6 {node.lan6}" if node.wan_ip6 else ""
                lines.append(f"router {node.name:<10} {node.ns:<20} wan {node.wan_ip} "
                             f"lan {node.lan}{v6} ({node.kind}{up})")
            else:
                where = f"on {node.router.name}'s LAN" if node.router and node.router.ns else "public"
                lines.append(f"host   {node.name:<10} {node.ns:<20}"
                             f" {' '.join(node.ips + node.ip6s)} ({where})")
        return "\n".join(lines)

    def report(self):
        """
        The topology and every tracked process's status and output: what a
        failing lab test should print.
        """
        parts = [f"lab {self.lab_id}:", self.describe()]
        parts.extend(proc.describe() for proc in self.processes)
        return "\n".join(parts)


def destroy_named(name, state_dir=state.STATE_DIR):
    """
    Tear down the named lab ``name`` (made by ``p2pnat lab up``): delete
    its namespaces (ending what runs in them) and its state file.  Return
    the namespaces deleted; raise :class:`LabError` if there is no such lab.
    """
    lab_id = state.named_lab_id(name)
    found = state.read_state(state_dir, lab_id)
    if found is None:
        raise LabError(f"no lab named {name}")
    prefix = state.ns_name(lab_id, "")
    gone = []
    for ns in reversed(found.get("namespaces", [])):
        if ns.startswith(prefix):  # never anything outside the lab's family
            delete_namespace(ns)
            gone.append(ns)
    state.remove_state(state_dir, lab_id)
    return gone
