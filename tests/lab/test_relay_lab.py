"""
The relay path across the Linux kernel's real NATs, in the
NAT lab: a relay on the internet segment, devices behind NAT routers of
every kind running an ordinary web server (``python -m http.server``) and
the device agent, and terminals fetching the devices' pages with ``curl``
over HTTPS, all as processes in network namespaces.

What each class shows:

- :class:`NatKindTests`: pages fetched byte for byte, and a 20 MB file by
  SHA-256, through cone, symmetric-sequential, symmetric-random and double
  NAT, and through a link losing 2 % of packets each way; 8 parallel
  sessions to one device.  (No delay is modelled: this kernel lacks
  ``sch_netem`` and the lab raises ``LabUnavailable`` for ``delay_ms``.)
- :class:`RefusalTests`: unknown, revoked and stale devices refused at once;
  a revoked device's open tunnel closed within the relay's sync interval; a
  forged connect request and a replayed genuine one ignored by the device;
  device certificates from another CA or for another device refused by the
  relay's tunnel side; a wrong terminal credential refused.
- :class:`RecoveryTests`: a fetch works again within about one notify-B
  interval after a relay restart, a NAT mapping flush, a flush that makes a
  symmetric NAT pick a new port, and a change of the router's public
  address.

The tests need root, ``ip``, ``nft``, ``conntrack`` and ``curl``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
Each class builds one lab, shared by its tests (each test uses devices of
its own), and tears it down after its last test; a failing test's message
carries the lab's report (topology, every process's output).
"""

import json
import os
import re
import subprocess
import time

from p2pnat.protocol import wire
from tests.support import procs
from tests.support.lab import relay as F
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import run_tool, start_tool, wait_for_log

#: The agents' notify-B interval here: recovery is measured against it.
B_INTERVAL = 2.0
#: The UDP echo server on the relay's host (loss check).
ECHO_PORT = 3478
#: Refusals must be answered at once (curl's total time, TLS included).
AT_ONCE = 0.5


class RelayLabTestCase(LabTestCase):
    """
    Tests sharing one :class:`~tests.support.lab.relay.RelayLab` per class
    (:attr:`rl`), with the devices' docroot; :meth:`build` adds the class's
    nodes and processes (the relay is not started yet).
    """

    tools = ("curl", "ss")
    relay_args = ()

    @classmethod
    def make_env(cls, workdir):
        env = F.RelayLab.with_docroot(workdir, cls.relay_args)
        cls.big_sha256 = env.big_sha256
        return env

    def setUp(self):
        super().setUp()
        self.rl = self.env

    # -- helpers ------------------------------------------------------------

    def fetch_ok(self, terminal, device_id, path="/", **kw):
        """Fetch a page and check it is the docroot's file, exactly."""
        f = self.rl.fetch(terminal, device_id, path, **kw)
        self.assertEqual((f.exit, f.status), (0, 200), f"{device_id}{path}: {f.describe()}")
        if path.startswith("/big.bin"):
            self.assertEqual(F.sha256_file(f.path), self.big_sha256,
                             f"{device_id}{path}: wrong content ({os.path.getsize(f.path)} bytes)")
        else:
            self.assertEqual(f.body, F.INDEX, f"{device_id}{path}: wrong content")
        os.unlink(f.path)
        return f

    def refused(self, terminal, device_id, status, **kw):
        """Fetch and check the relay answers ``status`` from itself, at once."""
        f = self.rl.fetch(terminal, device_id, "/", **kw)
        self.assertEqual((f.exit, f.status), (0, status), f"{device_id}: {f.describe()}")
        self.assertIn(b"p2pnat relay", f.body, f"{device_id}: not the relay's page")
        self.assertLess(f.seconds, AT_ONCE, f"{device_id}: refused only after {f.seconds:.3f}s")
        measured(f"{device_id} refused with {status} in {f.seconds:.3f}s")
        return f

    def relay_mapping(self, device_id):
        """The device's address as the relay last logged it (ip, port)."""
        found = re.findall(rf"device {re.escape(device_id)} (?:online at|mapping now) (\S+):(\d+)",
                           self.rl.relay.stdout())
        self.assertTrue(found, f"the relay never logged {device_id}'s address")
        return found[-1][0], int(found[-1][1])

    def log_since(self, proc, start):
        return proc.stdout()[start:]


def vm_bytes(pid, field):
    """A memory figure of process ``pid`` from /proc (VmRSS, VmHWM …), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


# -- NAT kinds -----------------------------------------------------------------


class NatKindTests(RelayLabTestCase):
    """
    A terminal behind its own cone NAT fetches pages from devices behind
    every kind of NAT; each device's first fetch in its test needs a connect
    request across its NAT.
    """

    KINDS = {  # device: (router kind, options)
        "cone": ("cone", {}),
        "seq": ("symmetric-sequential", {}),
        "rand": ("symmetric-random", {}),
        "double": ("double", {}),
        "lossy": ("cone", {"loss_pct": 2}),
    }
    relay_args = ("--log-level", "debug")

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.terminal = lab.add_host("term", behind=lab.add_router("tnat", kind="cone"))
        cls.routers = {}
        hosts = {}
        for name, (kind, options) in cls.KINDS.items():
            cls.routers[name] = lab.add_router(f"r{name}", kind=kind, **options)
            hosts[name] = lab.add_host(f"d{name}", behind=cls.routers[name])
        rl.start_relay()
        rl.relay_node.start_probe_server(ports=(ECHO_PORT,), duration=900)
        for host in hosts.values():
            rl.start_web(host)
        devices = [rl.add_device(name, host, start=False) for name, host in hosts.items()]
        # A second device on the sequential NAT's host, for parallel sessions.
        devices.append(rl.add_device("par", hosts["seq"], start=False))
        rl.start_agents(devices)

    def through(self, name):
        """Fetch the page and the 20 MB file from device ``name``."""
        router = self.routers[name]
        ip, port = self.relay_mapping(name)
        # The relay sees the device at its (outermost) NAT's public address.
        self.assertEqual(ip, router.public_ip)
        first = self.fetch_ok(self.terminal, name, "/")
        self.fetch_ok(self.terminal, name, "/")
        big = self.fetch_ok(self.terminal, name, "/big.bin", max_time=60)
        # The first fetch needed a connect request and a new tunnel.
        self.assertIn(f"connect request for {name} to", self.rl.relay.stdout())
        self.assertIn("connect request for session", self.rl.devices[name].agent.stdout())
        measured(f"first page {first.seconds:.3f}s, 20 MB {big.seconds:.2f}s")
        return first, big, (ip, port)

    def test_cone(self):
        self.through("cone")

    def test_symmetric_sequential(self):
        _, _, (ip, port) = self.through("seq")
        # The seed's router: the mapping came from its sequential port plan.
        self.assertTrue(20000 <= port < 22000, port)

    def test_symmetric_random(self):
        self.through("rand")

    def test_double_nat(self):
        """A home router (cone) behind a carrier-grade NAT (symmetric-sequential)."""
        router = self.routers["double"]
        self.assertEqual(router.outer.kind, "symmetric-sequential")
        self.assertNotEqual(router.wan_ip, router.public_ip)
        self.through("double")

    def test_lossy_link(self):
        """2 % loss each way on the device router's WAN link."""
        # The link does lose packets: 400 UDP echoes, each crossing it twice.
        host = self.rl.devices["lossy"].host
        echo = f"{self.rl.relay_ip}:{ECHO_PORT}"
        result = host.probe("query", *[f"--to={echo}"] * 400, "--tries=1", "--timeout=0.1",
                            timeout=90)
        lost = sum(step["observed"] is None for step in result["results"])
        self.assertTrue(2 <= lost <= 60, f"{lost} of 400 echoes lost")
        measured(f"{lost} of 400 UDP echoes lost")
        self.through("lossy")

    def test_large_download_bounded_memory(self):
        """
        A 256 MB body streams from the device behind a cone NAT to the
        terminal while the relay's memory stays put: each side of the relay
        is the other's push producer (back-pressure, no unbounded buffer).
        """
        size = 256 * 1024 * 1024
        huge = os.path.join(self.rl.docroot, "huge.bin")
        with open(huge, "wb") as f:
            f.truncate(size)  # sparse: zeros, read fast by the device's web server
        self.addCleanup(os.unlink, huge)
        pid = self.rl.relay.pid
        before = vm_bytes(pid, "VmRSS")
        f = self.rl.fetch(self.terminal, "cone", "/huge.bin", max_time=180)
        self.assertEqual((f.exit, f.status), (0, 200), f.describe())
        self.assertEqual(os.path.getsize(f.path), size)
        os.unlink(f.path)
        peak = vm_bytes(pid, "VmHWM")
        grown = max(0, peak - before)
        measured(f"256 MB in {f.seconds:.2f}s ({size / f.seconds / 1e6:.0f} MB/s); relay RSS"
                 f" {before / 1e6:.0f} MB before, peak {peak / 1e6:.0f} MB")
        self.assertLess(grown, 48 * 1024 * 1024,
                        f"the relay's memory grew by {grown / 1e6:.0f} MB for a 256 MB body")

    def test_tcp_forward(self):
        """
        ``p2pnat forward`` on the terminal carries a raw TCP stream through
        the relay to the device's service behind its sequential NAT (an
        HTTP/1.0 exchange here, byte for byte, as SSH would be).
        """
        port = 2222
        fwd = self.terminal.popen(
            procs.p2pnat("forward", "seq", "--relay", f"{self.rl.relay_ip}:{F.HTTPS_PORT}",
                         "--relay-hostname", F.RELAY_HOSTNAME, "--ca", self.rl.ca,
                         "--listen", f"127.0.0.1:{port}"), cwd=procs.REPO, env=procs.env())
        self.addCleanup(fwd.stop)
        wait_for_log(fwd, f"forwarding 127.0.0.1:{port}", timeout=20)
        out = os.path.join(self.rl.workdir, "forwarded.bin")
        done = self.terminal.run(["curl", "-sS", "--max-time", "60", "-o", out, "-w",
                                  "%{http_code}", f"http://127.0.0.1:{port}/big.bin"], timeout=75)
        self.assertEqual((done.returncode, done.stdout), (0, "200"), done.stderr)
        self.assertEqual(F.sha256_file(out), self.big_sha256)
        os.unlink(out)

    def test_parallel_sessions(self):
        """
        8 terminals' requests to one device at once: each gets its own
        session and tunnel, and the right content.
        """
        procs = [self.rl.start_fetch(self.terminal, "par", "/big.bin" if i % 2 else "/",
                                     max_time=60) for i in range(8)]
        fetches = [F.finish_fetch(p, timeout=75) for p in procs]
        for i, f in enumerate(fetches):
            self.assertEqual((f.exit, f.status), (0, 200), f"fetch {i}: {f.describe()}")
            if i % 2:
                self.assertEqual(F.sha256_file(f.path), self.big_sha256, f"fetch {i}")
            else:
                self.assertEqual(f.body, F.INDEX, f"fetch {i}")
        sessions = self.rl.devices["par"].agent.stdout().count("connect request for session")
        # Several tunnels at once (a tunnel carries one stream at a time).
        self.assertGreaterEqual(sessions, 2, "the requests were not served in parallel")
        measured(f"8 fetches over {sessions} tunnels")
        for f in fetches:
            os.unlink(f.path)


# -- refusals and attacks ----------------------------------------------------------


class RefusalTests(RelayLabTestCase):
    """
    What the relay and the device refuse, and how fast.  The relay's
    access-check period is 3 s here (notify A every second).
    """

    PERIOD = 3
    relay_args = ("--relay-access-check-period", str(PERIOD), "--log-level", "debug")

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.terminal = lab.add_host("term")
        cls.attacker = lab.add_host("evil")
        cls.router = lab.add_router("home", kind="cone")
        cls.device_host = lab.add_host("dev", behind=cls.router)
        # The revoked device has a host of its own, to count its tunnels.
        cls.gone_host = lab.add_host("devgone", behind=cls.router)
        rl.start_relay()
        rl.start_web(cls.device_host)
        rl.start_web(cls.gone_host)
        devices = [rl.add_device(d, cls.device_host, start=False)
                   for d in ("cam", "replayed", "sleepy")]
        devices.append(rl.add_device("locked", cls.device_host, access="relay", start=False))
        devices.append(rl.add_device("gone", cls.gone_host, start=False))
        rl.start_agents(devices)

    def test_unknown_device(self):
        """An unknown ID looks like a device that asks for its credential (no enumeration)."""
        f = self.refused(self.terminal, "nosuch", 401)
        self.assertIn(b"asks for its access credential", f.body)

    def test_revoked_device(self):
        """
        ``p2pnat device remove`` while a download runs: within the relay's
        sync interval (1 s) the device's tunnel is closed, the download is
        cut short, and new requests get 403 at once.
        """
        rl = self.rl
        self.fetch_ok(self.terminal, "gone", "/")
        download = rl.start_fetch(self.terminal, "gone", "/big.bin",
                                  extra=("--limit-rate", "1M"), max_time=60)
        deadline = time.monotonic() + 10
        while self.rl.tunnels(self.gone_host) == 0 or not os.path.exists(download.out_path):
            self.assertLess(time.monotonic(), deadline, "the download did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        self.assertIsNone(download.poll(), "the download ended early")
        start = len(rl.relay.stdout())
        removed = time.monotonic()
        rl.cli("device", "remove", "gone", "--state-dir", rl.state)
        # The relay's sync (every 1 s) notices and closes the tunnel.
        while self.rl.tunnels(self.gone_host):
            self.assertLess(time.monotonic() - removed, 3.0,
                            "the revoked device's tunnel is still open")
            time.sleep(0.02)
        closed_after = time.monotonic() - removed
        self.assertIn("device gone revoked or re-provisioned; closing its tunnels",
                      self.log_since(rl.relay, start))
        result = F.finish_fetch(download, timeout=60)
        self.assertNotEqual(result.exit, 0, f"the download completed: {result.describe()}")
        self.assertLess(os.path.getsize(result.path), F.BIG_SIZE)
        self.refused(self.terminal, "gone", 403)
        measured(f"gone: tunnel closed {closed_after:.2f}s after `device remove`")

    def test_stale_device(self):
        """
        A device whose agent stopped is refused with 503, at once, once its
        last notify A is older than the access-check period.
        """
        self.fetch_ok(self.terminal, "sleepy", "/")
        self.rl.devices["sleepy"].agent.stop()
        time.sleep(self.PERIOD + 1.5)
        f = self.refused(self.terminal, "sleepy", 503)
        self.assertIn(b"access-check period", f.body)

    def test_wrong_credential(self):
        """
        A device provisioned with ``--access relay``: without its credential
        the relay answers its login page (401), with a wrong one 401 or 403,
        with the right one the device's page; the login form sets a cookie
        that opens the device too.
        """
        cred = self.rl.devices["locked"].credential
        self.assertTrue(cred)
        f = self.refused(self.terminal, "locked", 401)
        self.assertIn(b"name='credential'", f.body)
        f = self.rl.fetch(self.terminal, "locked", "/", extra=("-u", ":WRONG"))
        self.assertIn(f.status, (401, 403), f.describe())
        self.assertNotIn(b"Device page", f.body)
        f = self.rl.fetch(self.terminal, "locked", "/.p2pnat/login",
                          extra=("--data-urlencode", "credential=WRONG"))
        self.assertEqual(f.status, 403, f.describe())
        self.assertIn(b"Wrong credential", f.body)
        self.fetch_ok(self.terminal, "locked", "/", extra=("-u", f":{cred}"))
        jar = os.path.join(self.rl.workdir, "cookies")
        f = self.rl.fetch(self.terminal, "locked", "/.p2pnat/login",
                          extra=("-c", jar, "--data-urlencode", f"credential={cred}"))
        self.assertEqual(f.status, 303, f.describe())
        self.fetch_ok(self.terminal, "locked", "/", extra=("-b", jar))

    def test_forged_connect_request(self):
        """
        A connect request with a wrong MAC, from the relay's address spoofed
        by another host, reaches the device through its NAT mapping (the
        agent logs the drop) and does nothing: no tunnel is opened.  Its
        timestamp is ahead of the relay's, and the relay's genuine requests
        still work afterwards.
        """
        rl = self.rl
        agent = rl.devices["cam"].agent
        ip, port = self.relay_mapping("cam")
        agent_start, relay_start = len(agent.stdout()), len(rl.relay.stdout())
        run_tool(self.attacker, "forge", "--kind", "connect", "--key-id", "cam",
                 "--src", f"{rl.relay_ip}:{F.UDP_PORT}", "--dst", f"{ip}:{port}",
                 "--tunnel-port", str(F.TUNNEL_PORT), "--count", "3", "--ahead", "30")
        wait_for_log(agent, r"bad-mac ConnectRequest for cam", agent_start, timeout=5)
        time.sleep(1.0)
        self.assertNotIn("connect request for session", self.log_since(agent, agent_start))
        self.assertNotIn("tunnel of cam", self.log_since(rl.relay, relay_start))
        self.assertNotIn("tunnel from", self.log_since(rl.relay, relay_start))
        # The genuine path still works: one connect request, one tunnel.
        self.fetch_ok(self.terminal, "cam", "/")
        self.assertEqual(self.log_since(agent, agent_start).count("connect request for session"), 1)

    def test_replayed_connect_request(self):
        """
        A genuine connect request captured on the device router's WAN link
        and sent again (from another host, the relay's address spoofed)
        reaches the device and is dropped as a replay: no second tunnel.
        """
        rl = self.rl
        agent = rl.devices["replayed"].agent
        sniffer = start_tool(self.router, "sniff", "--iface", "wan",
                             "--type", hex(wire.ConnectRequest.TYPE), "--key-id", "replayed",
                             "--src", f"{rl.relay_ip}:{F.UDP_PORT}", "--timeout", "20")
        wait_for_log(sniffer, "listening", timeout=20)
        self.fetch_ok(self.terminal, "replayed", "/")
        sniffer.wait(10)
        packet = json.loads(sniffer.stdout().strip().splitlines()[-1])["packet"]
        agent_start, relay_start = len(agent.stdout()), len(rl.relay.stdout())
        run_tool(self.attacker, "inject", "--hex", packet)
        wait_for_log(agent, r"replay ConnectRequest for replayed", agent_start, timeout=5)
        time.sleep(1.0)
        self.assertNotIn("connect request for session", self.log_since(agent, agent_start))
        self.assertNotIn("tunnel of replayed", self.log_since(rl.relay, relay_start))
        self.assertNotIn("tunnel from", self.log_since(rl.relay, relay_start))

    def test_foreign_certificates(self):
        """
        The tunnel port refuses a device certificate from another CA (a TLS
        alert, which TLS 1.3 delivers after the client's handshake), one
        from the deployment's CA for an unregistered device, and one for a
        registered device that is not its registered certificate.  The
        genuine certificate passes and only its (random) session is refused.
        """
        from p2pnat.deployment import pki

        rl = self.rl
        ca_cert = pki.load_cert(os.path.join(rl.state, "ca.crt"))
        ca_key = pki.load_key(os.path.join(rl.state, "ca.key"))
        other_ca, other_key = pki.create_ca("another deployment's CA")
        certs = {
            "other-ca": pki.issue_device_cert(other_ca, other_key, "cam"),
            "unregistered": pki.issue_device_cert(ca_cert, ca_key, "ghost"),
            "not-registered-cert": pki.issue_device_cert(ca_cert, ca_key, "cam"),
        }
        results = {}
        for name, (cert, key) in certs.items():
            cert_path = os.path.join(rl.workdir, f"{name}.crt")
            key_path = os.path.join(rl.workdir, f"{name}.key")
            with open(cert_path, "wb") as f:
                f.write(pki.cert_pem(cert))
            pki.write_secret(key_path, pki.key_pem(key), replace=True)
            results[name] = self.probe(cert_path, key_path)
        bundle = rl.devices["cam"].bundle
        results["genuine"] = self.probe(os.path.join(bundle, "device.crt"),
                                        os.path.join(bundle, "device.key"))
        for name in certs:
            self.assertNotEqual(results[name]["status"], 0, f"{name}: {results[name]}")
            self.assertTrue(results[name]["closed"], f"{name}: {results[name]}")
        self.assertIsNone(results["other-ca"]["status"], results["other-ca"])
        self.assertIn("unknown ca", results["other-ca"]["error"].lower(), results["other-ca"])
        self.assertEqual(results["unregistered"]["status"], 5, results["unregistered"])
        self.assertEqual(results["not-registered-cert"]["status"], 5,
                         results["not-registered-cert"])
        self.assertEqual(results["genuine"]["status"], 2, results["genuine"])
        log = rl.relay.stdout()
        self.assertIn("certificate of unknown or revoked device ghost", log)
        self.assertIn("certificate of cam is not the registered one", log)

    def probe(self, cert, key):
        return run_tool(self.terminal, "tls-probe", "--connect",
                        f"{self.rl.relay_ip}:{F.TUNNEL_PORT}", "--servername", F.RELAY_HOSTNAME,
                        "--ca", self.rl.ca, "--cert", cert, "--key", key)


# -- recovery ----------------------------------------------------------------------


class RecoveryTests(RelayLabTestCase):
    """
    After the relay restarts or a device's NAT mapping or address changes,
    a fetch works again within about one notify-B interval (2 s here).
    Each case has a device behind a router of its own.
    """

    relay_args = ("--log-level", "debug")
    #: Longest acceptable time from the event to a page fetched: one
    #: notify-B interval, the connect request's next retransmission (at most
    #: 1 s apart in the first 3 s) and the fetch itself.
    RECOVERY = B_INTERVAL + 2.5

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.terminal = lab.add_host("term")
        cls.routers = {}
        # device: (router kind, agent options).  The flush cases close idle
        # tunnels at once, so that the fetch after the flush needs a connect
        # request to cross the NAT again.
        cases = {
            "restart": ("cone", ()),
            "flush": ("cone", ("--agent-idle-timeout", "0.3")),
            "newport": ("symmetric-sequential", ("--agent-idle-timeout", "0.3")),
            "moved": ("cone", ()),
        }
        rl.start_relay()
        devices = []
        for name, (kind, agent_args) in cases.items():
            router = cls.routers[name] = lab.add_router(f"r{name}", kind=kind)
            host = lab.add_host(f"d{name}", behind=router)
            rl.start_web(host)
            devices.append(rl.add_device(name, host, agent_args=agent_args, start=False))
        rl.start_agents(devices)

    def recovered(self, name, since, max_time=15):
        """
        Fetch from ``name`` right now and check it works within
        :attr:`RECOVERY` seconds of ``since`` (a monotonic time); return the
        seconds taken.
        """
        self.fetch_ok(self.terminal, name, "/", max_time=max_time)
        took = time.monotonic() - since
        self.assertLess(took, self.RECOVERY, f"{name}: recovered only after {took:.2f}s")
        measured(f"{name}: page fetched {took:.2f}s after the event")
        return took

    def wait_idle_closed(self, name):
        """Wait until the device has no tunnel to the relay."""
        host = self.rl.devices[name].host
        deadline = time.monotonic() + 5
        while self.rl.tunnels(host):
            self.assertLess(time.monotonic(), deadline, f"{name}'s idle tunnel stays open")
            time.sleep(0.05)

    def test_relay_restart(self):
        """
        The relay is stopped and started again: its registry kept the
        device's address and last access, so the device is not refused, and
        the connect request goes out as soon as the next notify B shows the
        relay which socket reaches the device.
        """
        rl = self.rl
        self.fetch_ok(self.terminal, "restart", "/")
        rl.stop_relay()
        rl.start_relay()
        self.recovered("restart", time.monotonic())

    def test_mapping_flushed(self):
        """The cone router forgets every mapping (conntrack -F)."""
        self.fetch_ok(self.terminal, "flush", "/")
        self.wait_idle_closed("flush")
        self.lab.flush_conntrack(self.routers["flush"])
        self.recovered("flush", time.monotonic())

    def test_flush_gives_new_port(self):
        """
        The symmetric-sequential router forgets its mappings; the device's
        next notify comes from the next port of the plan, which the relay
        learns and sends the connect request to.
        """
        before = self.relay_mapping("newport")
        self.fetch_ok(self.terminal, "newport", "/")
        self.wait_idle_closed("newport")
        start = len(self.rl.relay.stdout())
        self.lab.flush_conntrack(self.routers["newport"])
        self.recovered("newport", time.monotonic())
        after = self.relay_mapping("newport")
        self.assertIn("device newport mapping now", self.log_since(self.rl.relay, start))
        self.assertEqual(after[0], before[0])
        self.assertNotEqual(after[1], before[1])

    def test_public_address_changed(self):
        """
        The device's router gets a new public address (its ISP renumbered
        it): the device's TCP connections through the old one are dead.
        Once the relay has the new address from a notify (within one
        notify-B interval), a fetch works, even though the relay holds an
        idle tunnel from before the change.
        """
        rl = self.rl
        router = self.routers["moved"]
        self.fetch_ok(self.terminal, "moved", "/")  # leaves an idle tunnel
        old_ip, new_ip = router.wan_ip, "198.18.2.200"
        start = len(rl.relay.stdout())
        changed = time.monotonic()
        # (Deleting the only address first: a secondary one would go with it.)
        subprocess.run(["ip", "-n", router.ns, "addr", "del", f"{old_ip}/16", "dev", "wan"],
                       check=True, timeout=10)
        subprocess.run(["ip", "-n", router.ns, "addr", "add", f"{new_ip}/16", "dev", "wan"],
                       check=True, timeout=10)
        router.wan_ip = new_ip
        wait_for_log(rl.relay, rf"device moved mapping now {re.escape(new_ip)}:\d+", start,
                       timeout=self.RECOVERY)
        self.recovered("moved", changed)
