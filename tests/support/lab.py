"""
Fixtures for NAT-lab tests of the daemons (see ``tests/test_relay_lab.py``).

:class:`RelayLab` builds on :class:`p2pnat.lab.Lab`: a relay server on the
internet segment, run from this source tree with a state directory made by
``p2pnat relay init``; devices provisioned with ``p2pnat device add`` whose
agents and web servers run as processes in their hosts' namespaces; and
``curl`` run in a terminal host's namespace.

The module is also a small tool box run inside namespaces with
``python -m tests.support.lab TOOL ...`` (a reactor cannot change namespace,
and these need raw sockets of the namespace they look at):

- ``tls-probe``: present a client certificate to the relay's tunnel port,
  send a hello and report what the relay answered;
- ``forge-connect``: send a connect request sealed with a wrong key, from a
  spoofed source address (the relay's notify socket), to a device's mapping;
- ``sniff-connect``: capture the first connect request on an interface and
  print the IP packet in hex;
- ``inject``: send a captured IP packet again, as it is (a replay).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from twisted.trial.unittest import SkipTest

from tests.support import procs

RELAY_HOSTNAME = "relay.test"
UDP_PORT = 7478
TUNNEL_PORT = 7443
HTTPS_PORT = 8443
WEB_PORT = 8080

#: The device web server's pages: a small one checked byte for byte (with
#: bytes a text-mangling hop would change) and a 20 MB one checked by hash.
INDEX = ("<!doctype html><html><head><meta charset='utf-8'><title>p2pnat lab device</title>"
         "</head><body><h1>Device page</h1><p>caf\u00e9 \u2603 \u00fc\u00df \r\n"
         "line\tend</p></body></html>\n").encode("utf-8")
BIG_SIZE = 20 * 1024 * 1024


def require_lab():
    """
    Skip (with the reason) unless this machine can build NAT labs and has
    ``curl``; when the environment variable ``CI`` is set, fail instead:
    CI must really run the lab tests.
    """
    from p2pnat.lab import unavailable_reason

    reason = unavailable_reason(("ip", "nft", "conntrack"))
    if reason is None:
        missing = [tool for tool in ("curl", "ss") if shutil.which(tool) is None]
        if missing:
            reason = f"needs {' and '.join(missing)} (apt-get install curl iproute2)"
    if reason:
        message = f"NAT lab unavailable: {reason}"
        if os.environ.get("CI"):
            raise AssertionError(f"{message} (CI is set: the lab tests must run here)")
        raise SkipTest(message)


def make_docroot(path):
    """
    Write the device web server's directory: ``index.html`` (:data:`INDEX`)
    and ``big.bin`` (20 MB of random bytes).  Return the big file's SHA-256.
    """
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "index.html"), "wb") as f:
        f.write(INDEX)
    big = os.urandom(BIG_SIZE)
    with open(os.path.join(path, "big.bin"), "wb") as f:
        f.write(big)
    return hashlib.sha256(big).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LogTimeout(AssertionError):
    """A process did not log what a test waited for."""


def wait_for_log(proc, pattern, start=0, timeout=10.0):
    """
    Wait until ``proc``'s standard output, from character ``start`` on,
    matches the regular expression ``pattern``; return the match (its
    ``end()`` is an offset in the whole output).  Raise :class:`LogTimeout`
    if the process exits or ``timeout`` passes first.
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        m = regex.search(proc.stdout(), start)
        if m:
            return m
        if proc.poll() is not None:
            raise LogTimeout(f"{proc.describe()}\nexited before logging /{pattern}/")
        if time.monotonic() >= deadline:
            raise LogTimeout(f"no /{pattern}/ logged within {timeout}s:\n{proc.describe()}")
        time.sleep(0.02)


@dataclass
class Fetch:
    """What one curl run in a terminal got."""

    exit: int
    status: int
    seconds: float  # curl's time_total: connect, request and whole response
    path: str  # where the body was written
    stderr: str
    argv: list = field(default_factory=list)

    @property
    def body(self):
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def describe(self):
        return (f"curl exit {self.exit}, HTTP {self.status}, {self.seconds:.3f}s;"
                f" stderr {self.stderr.strip()!r}; body {self.body[:300]!r}")


@dataclass
class Device:
    """A provisioned device: its host, bundle, agent process and credential."""

    id: str
    host: object
    bundle: str
    web_port: int
    b_interval: float
    agent_args: list
    agent: object = None
    credential: str = None


class RelayLab:
    """
    A NAT lab with one relay (``relay.test`` on the internet segment) and
    helpers to add devices, run the relay and fetch pages from terminals.

    ``workdir`` holds the relay's state directory, device bundles and what
    terminals download; ``relay_args`` are extra ``twistd relay`` options.
    The caller closes it (:meth:`close`).
    """

    def __init__(self, workdir, docroot, relay_args=()):
        from p2pnat.lab import Lab

        self.workdir = workdir
        self.docroot = docroot
        self.state = os.path.join(workdir, "state")
        self.ca = os.path.join(self.state, "ca.crt")
        self.relay_args = list(relay_args)
        self.devices = {}
        self.relay = None
        self._fetches = 0
        self.lab = Lab()
        try:
            self.relay_node = self.lab.add_server("relay")
            self.relay_ip = self.relay_node.ip
            self.cli("relay", "init", "--state-dir", self.state, "--hostname", RELAY_HOSTNAME,
                     "--udp", f"{self.relay_ip}:{UDP_PORT}", "--tunnel-port", str(TUNNEL_PORT))
        except BaseException:
            self.lab.close()
            raise

    def close(self):
        self.lab.close()

    def report(self):
        return self.lab.report()

    # -- commands and daemons ---------------------------------------------

    def cli(self, *args, check=True):
        """Run ``p2pnat ARGS`` (outside the lab: it only touches files)."""
        done = subprocess.run(procs.p2pnat(*args), cwd=procs.REPO, env=procs.env(),
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"p2pnat {' '.join(args)} failed ({done.returncode}):"
                                 f" {done.stderr.strip()}")
        return done

    def relay_argv(self):
        ip = self.relay_ip
        return procs.twistd(
            "relay", "--relay-state-dir", self.state, "--relay-hostname", RELAY_HOSTNAME,
            "--udp-listen", f"{ip}:{UDP_PORT}",
            "--tunnel-listen", f"tcp:{TUNNEL_PORT}:interface={ip}",
            "--terminal-https", f"tcp:{HTTPS_PORT}:interface={ip}",
            *self.relay_args)

    def start_relay(self, timeout=30):
        """Start the relay and wait until it listens; return its process."""
        proc = self.relay_node.popen(self.relay_argv(), cwd=procs.REPO, env=procs.env())
        wait_for_log(proc, rf"relay {re.escape(RELAY_HOSTNAME)}: \d+ devices registered",
                     timeout=timeout)
        self.relay = proc
        return proc

    def stop_relay(self):
        self.relay.stop(grace=5)

    def start_web(self, host, port=WEB_PORT, timeout=20):
        """Serve the docroot from ``host`` on 127.0.0.1:``port``."""
        proc = host.popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                           "--directory", self.docroot], env=procs.env())
        wait_for_log(proc, "Serving HTTP", timeout=timeout)
        return proc

    def add_device(self, device_id, host, *, web_port=WEB_PORT, access="device",
                   b_interval=2.0, agent_args=(), start=True):
        """
        Provision ``device_id`` (``p2pnat device add``) for a web server on
        ``host`` and, with ``start``, run its agent and wait until the relay
        has its notify A.  With ``access="relay"`` a credential is generated
        and kept in :attr:`Device.credential`.
        """
        bundle = os.path.join(self.workdir, f"dev-{device_id}")
        args = ["device", "add", device_id, "--state-dir", self.state,
                "--relay", f"{self.relay_ip}:{UDP_PORT}", "--service", f"127.0.0.1:{web_port}",
                "--out", bundle, "--access", access]
        if access == "relay":
            args.append("--generate-credential")
        done = self.cli(*args)
        device = Device(device_id, host, bundle, web_port, b_interval, list(agent_args))
        m = re.search(r"access credential \(shown only now; stored hashed\): (\S+)", done.stdout)
        if m:
            device.credential = m.group(1)
        self.devices[device_id] = device
        if start:
            self.start_agent(device)
        return device

    def start_agent(self, device, timeout=30):
        """Run ``device``'s agent; return once the relay logged it online."""
        self.start_agents([device], timeout)
        return device.agent

    def start_agents(self, devices, timeout=30):
        """Run several devices' agents at once; return once all are online."""
        start = len(self.relay.stdout())
        for device in devices:
            device.agent = device.host.popen(
                procs.twistd("device-agent", "--config", os.path.join(device.bundle, "agent.toml"),
                             "--agent-notify-b-interval", str(device.b_interval),
                             *device.agent_args),
                cwd=procs.REPO, env=procs.env())
        for device in devices:
            self.wait_online(device.id, start, timeout)

    def wait_online(self, device_id, start=0, timeout=30):
        """Wait for the relay's "device ID online at ADDR" line; return ADDR."""
        m = wait_for_log(self.relay, rf"device {re.escape(device_id)} online at (\S+)", start,
                         timeout)
        return m.group(1)

    # -- terminals ----------------------------------------------------------

    def url(self, device_id, path="/"):
        return f"https://{device_id}.{RELAY_HOSTNAME}:{HTTPS_PORT}{path}"

    def curl_argv(self, device_id, path="/", out=None, max_time=30, extra=()):
        if out is None:
            self._fetches += 1
            out = os.path.join(self.workdir, f"fetch-{self._fetches}")
        return out, ["curl", "-sS", "--max-time", str(max_time), "-o", out,
                     "-w", "%{http_code} %{time_total}",
                     "--resolve", f"{device_id}.{RELAY_HOSTNAME}:{HTTPS_PORT}:{self.relay_ip}",
                     "--cacert", self.ca, *extra, self.url(device_id, path)]

    def fetch(self, terminal, device_id, path="/", *, max_time=30, extra=()):
        """Run curl in ``terminal`` for the device's ``path``; a :class:`Fetch`."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra)
        done = terminal.run(argv, timeout=max_time + 15)
        return parse_curl(done.returncode, done.stdout, done.stderr, out, argv)

    def start_fetch(self, terminal, device_id, path="/", *, max_time=30, extra=()):
        """Start curl in the background; finish it with :func:`finish_fetch`."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra)
        proc = terminal.popen(argv)
        proc.out_path = out
        return proc


def finish_fetch(proc, timeout=60):
    """Wait for a curl started by :meth:`RelayLab.start_fetch`; a :class:`Fetch`."""
    code = proc.wait(timeout)
    return parse_curl(code, proc.stdout(), proc.stderr(), proc.out_path, proc.argv)


def parse_curl(code, stdout, stderr, out, argv):
    status, seconds = 0, -1.0
    parts = stdout.strip().split()
    if len(parts) == 2:
        status, seconds = int(parts[0]), float(parts[1])
    return Fetch(code, status, seconds, out, stderr, argv)


# -- tools run inside namespaces ---------------------------------------------

def _tool_tls_probe(args):
    """
    Open a TLS connection to the tunnel port with a client certificate, send
    a hello with a random session, and print what happened as JSON:
    ``handshake`` (whether the client finished it), ``status`` (the hello
    status byte, or null), ``closed`` (the relay closed the connection),
    ``error``.
    """
    import ssl

    from p2pnat.protocol import tunnel

    host, port = args.connect.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    result = {"handshake": False, "status": None, "closed": False, "error": None}
    try:
        with socket.create_connection((host, int(port)), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=args.servername) as s:
                result["handshake"] = True
                s.sendall(tunnel.hello(os.urandom(16), os.urandom(16)))
                first = s.recv(1)
                if first:
                    result["status"] = first[0]
                    result["closed"] = s.recv(1) == b""
                else:
                    result["closed"] = True
    except (ssl.SSLError, OSError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["closed"] = True
    print(json.dumps(result))


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_udp_packet(src, dst, payload):
    """An IPv4/UDP packet from ``src`` to ``dst`` ((ip, port) pairs)."""
    sip, dip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    length = 8 + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    check = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, os.getpid() & 0xFFFF, 0, 64,
                     socket.IPPROTO_UDP, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


def fix_checksums(packet):
    """
    ``packet`` (IPv4/UDP) with its IP and UDP checksums computed again: a
    packet captured on a veth may carry only the partial checksum that
    checksum offload leaves for the hardware to finish.
    """
    packet = bytearray(packet)
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", _checksum(bytes(packet[:ihl])))
    if packet[9] == socket.IPPROTO_UDP:
        udp = packet[ihl:]
        udp[6:8] = b"\0\0"
        pseudo = bytes(packet[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
        udp[6:8] = struct.pack("!H", _checksum(pseudo + bytes(udp)) or 0xFFFF)
        packet[ihl:] = udp
    return bytes(packet)


def send_raw(packet, count=1):
    """Send a complete IPv4 packet as it is (source address included)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        dst = socket.inet_ntoa(packet[16:20])
        for _ in range(count):
            s.sendto(packet, (dst, 0))
    finally:
        s.close()


def _hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def _tool_forge_connect(args):
    """
    Send a connect request for ``--device`` sealed with a random key, from
    the spoofed address ``--src`` to ``--dst``: what an off-path attacker
    who knows the relay's and the device's addresses can send.  Its
    timestamp is ``--ahead`` seconds in the future: were it recorded before
    the MAC check, the device would then refuse the relay's genuine frames.
    """
    from p2pnat.protocol import wire

    request = wire.ConnectRequest(os.urandom(16), os.urandom(16), TUNNEL_PORT, "")
    stamp = int((time.time() + args.ahead) * 1e6)
    data = wire.seal(request, args.device, os.urandom(wire.KEY_LEN), stamp)
    send_raw(ip_udp_packet(_hostport(args.src), _hostport(args.dst), data), args.count)
    print(json.dumps({"sent": args.count, "bytes": len(data)}))


def _tool_sniff_connect(args):
    """
    Print (hex) the first IPv4 packet on ``--iface`` from ``--src`` that
    carries a p2pnat connect request for ``--device``, or exit 1 after
    ``--timeout``.
    """
    from p2pnat.protocol import wire

    src_ip, src_port = _hostport(args.src)
    key_id = args.device.encode("ascii")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.bind((args.iface, 0))
    print(json.dumps({"listening": args.iface}), flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            packet = s.recv(65535)
        except socket.timeout:
            break
        if len(packet) < 28 or packet[9] != socket.IPPROTO_UDP:
            continue
        ihl = (packet[0] & 0x0F) * 4
        sport = struct.unpack_from("!H", packet, ihl)[0]
        payload = packet[ihl + 8:]
        if (socket.inet_ntoa(packet[12:16]) == src_ip and sport == src_port
                and len(payload) > 2 and payload[0] == wire.MARKER
                and payload[2] == wire.ConnectRequest.TYPE
                and payload[13:13 + payload[12]] == key_id):
            print(json.dumps({"packet": packet.hex()}), flush=True)
            return 0
    return 1


def _tool_inject(args):
    send_raw(fix_checksums(bytes.fromhex(args.hex)), args.count)
    print(json.dumps({"sent": args.count}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.support.lab")
    tools = parser.add_subparsers(dest="tool", required=True)
    p = tools.add_parser("tls-probe")
    p.add_argument("--connect", required=True)
    p.add_argument("--servername", default=RELAY_HOSTNAME)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_tool_tls_probe)
    p = tools.add_parser("forge-connect")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--ahead", type=float, default=0.0)
    p.set_defaults(func=_tool_forge_connect)
    p = tools.add_parser("sniff-connect")
    p.add_argument("--iface", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=_tool_sniff_connect)
    p = tools.add_parser("inject")
    p.add_argument("--hex", required=True)
    p.add_argument("--count", type=int, default=1)
    p.set_defaults(func=_tool_inject)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
