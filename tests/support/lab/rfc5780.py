"""
An independent RFC 5780 client for the NAT lab: pion's ``stun-nat-behaviour``
(Debian's ``golang-github-pion-stun-dev``), which runs the mapping tests of
RFC 5780 section 4.3 and the filtering tests of section 4.4 against one
STUN server and prints a verdict for each.

What it needs from the server: OTHER-ADDRESS in the answer to its first,
plain Binding request (without it, "NAT discovery feature not supported by
this server" and no verdict); it then sends plain requests to OTHER-ADDRESS's
IP (primary port, then OTHER-ADDRESS's port) and CHANGE-REQUESTs (IP and
port, then port only) to the primary address, taking a timeout for
filtering.  It only prints RESPONSE-ORIGIN (at ``-verbose 2``), and it
does not look at where an answer came from, nor at its class, so
:func:`parse` reads both from its log and the tests check them.

The client is built from Debian's Go sources, offline, by
:func:`client_path` (once per test run, into a temporary directory):
``GO111MODULE=off`` with ``GOPATH`` a temporary directory and
``/usr/share/gocode``, and ``CGO_ENABLED=0`` so that no C compiler is
needed.
"""

import atexit
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from twisted.trial.unittest import SkipTest

#: Where Debian's Go packages put their sources.
GOCODE = "/usr/share/gocode"
#: The client's Go package.
PACKAGE = "github.com/pion/stun/cmd/stun-nat-behaviour"
#: The Debian packages it is built from (scripts/system-packages.txt).
PACKAGES = ("golang-go", "golang-github-pion-stun-dev", "golang-github-pion-logging-dev",
            "golang-github-pion-transport-dev")

#: pion's verdicts in p2pnat's words (p2pnat.protocol.nat).  It cannot say
#: "no NAT": it compares the mapped address with its socket's wildcard one.
VERDICTS = {
    "endpoint independent": "endpoint-independent",
    "endpoint independent (no NAT)": "none",
    "address dependent": "address-dependent",
    "address and port dependent": "address-and-port-dependent",
}

_built = {}


def unavailable_reason():
    """Why the client cannot be built here, or None."""
    if shutil.which("go") is None or not os.path.isdir(os.path.join(GOCODE, "src", PACKAGE)):
        return f"needs pion's stun-nat-behaviour (apt-get install {' '.join(PACKAGES)})"
    return None


def require_client():
    """Skip (fail when ``CI`` is set) unless the client can be built here."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            raise AssertionError(f"{reason} (CI is set: the lab tests must run here)")
        raise SkipTest(reason)


def client_path(timeout=300):
    """
    The path of the built client: built on the first call of the run, into
    a temporary directory removed at exit.  A failed build raises
    AssertionError with go's output.
    """
    if "path" in _built:
        return _built["path"]
    tmp = tempfile.mkdtemp(prefix="p2pnat-stun-nat-behaviour-")
    atexit.register(shutil.rmtree, tmp, True)
    path = os.path.join(tmp, "stun-nat-behaviour")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tmp,
        "GO111MODULE": "off",
        "GOPATH": os.pathsep.join((os.path.join(tmp, "gopath"), GOCODE)),
        "GOCACHE": os.path.join(tmp, "cache"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOENV": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    done = subprocess.run(["go", "build", "-o", path, PACKAGE], env=env, cwd=tmp,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0 or not os.path.exists(path):
        raise AssertionError(f"building {PACKAGE} failed ({done.returncode}):\n"
                             f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    _built["path"] = path
    return path


def argv(server, timeout=1):
    """
    The client's command line against ``server`` (``ip:port``), waiting
    ``timeout`` whole seconds for each answer (a filtering test takes one
    such wait per answer its NAT drops).
    """
    return [client_path(), "-server", server, "-timeout", str(int(timeout)), "-verbose", "2"]


@dataclass
class Exchange:
    """One request the client sent and the answer it got (None: timed out)."""

    to: str
    sent: int
    source: str | None = None
    received: int | None = None
    mapped: str | None = None
    response_origin: str | None = None
    other_address: str | None = None


@dataclass
class Verdict:
    """
    What one run concluded: ``mapping`` and ``filtering`` in p2pnat's words
    (:data:`VERDICTS`), None when the client said "inconclusive"; every
    request and answer in order; the whole output for failure messages.
    """

    mapping: str | None
    filtering: str | None
    exchanges: list = field(default_factory=list)
    output: str = ""


_SENT = re.compile(r"Sending to (\S+): \((\d+) bytes\)")
_RECEIVED = re.compile(r"Response from (\S+): \((\d+) bytes\)")
_ATTR = re.compile(r"\t(XOR-MAPPED-ADDRESS|RESPONSE-ORIGIN|OTHER-ADDRESS):\s+(\S+)")
_VERDICT = re.compile(r"=> NAT (mapping|filtering) behavior: (.+?)\s*$")
_INCONCLUSIVE = re.compile(r"NAT (mapping|filtering) behavior: inconclusive")


def parse(output):
    """A :class:`Verdict` from the client's ``-verbose 2`` output."""
    found = {}
    exchanges = []
    names = {"XOR-MAPPED-ADDRESS": "mapped", "RESPONSE-ORIGIN": "response_origin",
             "OTHER-ADDRESS": "other_address"}
    for line in output.splitlines():
        m = _SENT.search(line)
        if m:
            exchanges.append(Exchange(m.group(1), int(m.group(2))))
            continue
        m = _RECEIVED.search(line)
        if m and exchanges:
            exchanges[-1].source, exchanges[-1].received = m.group(1), int(m.group(2))
            continue
        m = _ATTR.search(line)
        if m and exchanges:
            value = m.group(2)
            setattr(exchanges[-1], names[m.group(1)], None if value == "<nil>" else value)
            continue
        m = _VERDICT.search(line)
        if m:
            verdict = m.group(2)
            if verdict not in VERDICTS:
                raise AssertionError(f"unknown verdict {verdict!r} in:\n{output}")
            found[m.group(1)] = VERDICTS[verdict]
            continue
        m = _INCONCLUSIVE.search(line)
        if m:
            found[m.group(1)] = None
    if "mapping" not in found or "filtering" not in found:
        raise AssertionError(f"no verdict for both tests in:\n{output}")
    return Verdict(found["mapping"], found["filtering"], exchanges, output)


def start(node, server, timeout=1):
    """Start the client in ``node`` against ``server``; a tracked lab process (stdin closed)."""
    return node.popen(argv(server, timeout), stdin=subprocess.DEVNULL)


def finish(proc, timeout=20):
    """Wait for a client from :func:`start` to exit 0; its :class:`Verdict`."""
    proc.wait(timeout)
    if proc.poll() != 0:
        raise AssertionError(f"stun-nat-behaviour failed: {proc.describe(4000)}")
    return parse(proc.stdout())
