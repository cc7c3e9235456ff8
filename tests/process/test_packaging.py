"""
The project as users get it: the wheel ``pip wheel .`` builds, installed
with ``pip install WHEEL`` into a fresh virtualenv, run from a directory
that is not the source tree.

These tests need the package index: the build requirements
(setuptools, wheel) and the dependencies (Twisted, pyOpenSSL, ...) come
from it.  The wheel is built and the virtualenv installed once per test
run, on first use, and shared by the tests below; with a warm pip cache
this takes about 40 s here (build 10 s, with the virtualenv made
meanwhile, install 28 s).  The tests are SynchronousTestCases, on which
trial enforces no timeout: every step is a subprocess with its own time
limit instead.

The wheel is built from a copy of the tree (the files git tracks or would
track), so the build leaves no ``build/`` or ``*.egg-info`` in the work
tree.
"""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent import futures

from p2pnat import __version__
from tests.process.test_daemons import LOOPBACK, DaemonTestCase
from tests.support import procs

ETC = os.path.join(procs.REPO, "etc")
BUILD_TIMEOUT = 600  # seconds, for each of: build, venv creation, install
PLUGINS = ("p2pnat_lobby.py", "p2pnat_relay.py", "p2pnat_device_agent.py", "p2pnat_endpoints.py")

_made = {}  # what was built once: name -> value, or the exception it raised
timings = {}  # step -> seconds, for the curious (see the module docstring)


def _workdir():
    if "workdir" not in _made:
        path = tempfile.mkdtemp(prefix="p2pnat-packaging-")
        atexit.register(shutil.rmtree, path, True)
        _made["workdir"] = path
    return _made["workdir"]


def _once(name, make):
    """C{make()} once per run; a failure is raised again for every caller."""
    if name not in _made:
        start = time.monotonic()
        try:
            _made[name] = make()
        except Exception as e:
            _made[name] = e
        timings[name] = time.monotonic() - start
    if isinstance(_made[name], Exception):
        raise _made[name]
    return _made[name]


def _run(argv, timeout=BUILD_TIMEOUT, **kw):
    """Run C{argv}; its output, or AssertionError with the output."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(argv)}: not done in {timeout}s:\n"
                             f"{(e.output or b'').decode('utf-8', 'replace')}")
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit status {p.returncode}:\n{out}")
    return out


def _tree_files():
    """The files of the work tree a commit would hold: tracked, or new and not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=procs.REPO, stdout=subprocess.PIPE, check=True, timeout=60).stdout
    return [name for name in out.decode().split("\0") if name]


def _source_copy():
    src = os.path.join(_workdir(), "src")
    if os.path.isdir(os.path.join(procs.REPO, ".git")) and shutil.which("git"):
        for name in _tree_files():
            path = os.path.join(procs.REPO, name)
            if not os.path.isfile(path):  # deleted in the work tree
                continue
            os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
            shutil.copy2(path, os.path.join(src, name))
    else:  # an unpacked source archive
        shutil.copytree(procs.REPO, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "_trial_temp*", "__pycache__",
            "dropin.cache"))
    return src


def wheel():
    """The path of the wheel built from a copy of the tree."""
    def build():
        dist = os.path.join(_workdir(), "dist")
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
              "-w", dist, _source_copy()])
        [name] = os.listdir(dist)
        return os.path.join(dist, name)

    return _once("wheel", build)


def venv():
    """The bin directory of a fresh virtualenv with the wheel installed."""
    def make():
        path = os.path.join(_workdir(), "venv")
        _run([sys.executable, "-m", "venv", path])
        return os.path.join(path, "bin")

    def install():
        # The virtualenv is made while the wheel builds: neither needs the other.
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            made = pool.submit(_once, "venv", make)
            built = wheel()
            bin_dir = made.result()
        _run([os.path.join(bin_dir, "python"), "-m", "pip", "install",
              "--disable-pip-version-check", built])
        return bin_dir

    return _once("install", install)


def installed_env():
    """The environment for the installed programs: nothing of the source tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WheelTests(DaemonTestCase):
    def test_contents(self):
        """
        The wheel holds the three plugin modules in twisted/plugins, and
        neither an __init__.py there (it would hide every other plugin of
        the install) nor a dropin.cache.
        """
        with zipfile.ZipFile(wheel()) as z:
            names = set(z.namelist())
            entry_points = next(z.read(n).decode() for n in names
                                if n.endswith(".dist-info/entry_points.txt"))
        for plugin in PLUGINS:
            self.assertIn(f"twisted/plugins/{plugin}", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual([n for n in names if n.endswith("dropin.cache")], [])
        self.assertEqual([n for n in names if n.startswith("twisted/")
                          and not n.startswith("twisted/plugins/p2pnat_")], [])
        for module in ("p2pnat/__init__.py", "p2pnat/relay/tap.py", "p2pnat/lobby/tap.py",
                       "p2pnat/agent/tap.py", "p2pnat/cli/__init__.py"):
            self.assertIn(module, names)
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
        self.assertRegex(entry_points, r"(?m)^p2pnat\s*=\s*p2pnat\.cli:main$")
        self.assertIn(f"p2pnat-{__version__}-", os.path.basename(wheel()))


class InstalledTests(DaemonTestCase):
    """The fresh virtualenv's programs, run from an empty directory."""

    def setUp(self):
        super().setUp()
        self.bin = venv()
        self.cwd = self.tmpdir()

    def run_installed(self, program, *args):
        return _run([os.path.join(self.bin, program), *args], cwd=self.cwd, env=installed_env(),
                    timeout=120)

    def test_installed_copy_is_used(self):
        out = self.run_installed("python", "-c", "import p2pnat; print(p2pnat.__file__)")
        self.assertTrue(out.strip().startswith(os.path.dirname(self.bin)), out)

    def test_twistd_lists_the_daemons(self):
        out = self.run_installed("twistd", "--help")
        for name, words in (("device-agent", "p2pnat device agent"),
                            ("lobby", "p2pnat lobby"), ("relay", "p2pnat relay")):
            self.assertRegex(out, rf"(?m)^\s+{re.escape(name)}\s+{words}", out)

    def test_p2pnat_help(self):
        out = self.run_installed("p2pnat", "--help")
        self.assertIn("usage: p2pnat", out)
        for group in ("relay", "device", "client"):
            self.assertIn(group, out)
        self.assertEqual(self.run_installed("p2pnat", "--version").strip(),
                         f"p2pnat {__version__}")

    def test_daemons_start_and_stop(self):
        """
        Each installed daemon starts with its etc/ config file (ports,
        state and key files overridden) and stops cleanly on SIGTERM; the
        device agent, provisioned with the installed ``p2pnat`` command,
        reports to the relay.
        """
        state = os.path.join(self.tmpdir(), "relay")
        bundle = os.path.join(self.tmpdir(), "dev-1")
        self.run_installed("p2pnat", "relay", "init", "--state-dir", state,
                           "--hostname", "relay.localhost")
        self.run_installed("p2pnat", "device", "add", "dev-1", "--state-dir", state,
                           "--relay", "127.0.0.1:7478", "--service", "127.0.0.1:9",
                           "--out", bundle)

        def start(name, *args):
            argv = [os.path.join(self.bin, "twistd"), "-n", "--pidfile=", "--logfile=-", name,
                    "--config", os.path.join(ETC, f"{name}.toml"), *args]
            return self.start(name, argv=argv, cwd=self.cwd, env=installed_env())

        relay = start("relay", "--relay-state-dir", state, "--udp-listen", f"{LOOPBACK}:0",
                      "--terminal-https", f"tcp:0:interface={LOOPBACK}",
                      "--tunnel-listen", f"tcp:0:interface={LOOPBACK}")
        lobby = start("lobby", "--lobby-state-dir", os.path.join(self.tmpdir(), "lobby"),
                      "--udp-listen", f"{LOOPBACK}:0")
        relay_port = int(relay.wait_for(r"notifies on 127\.0\.0\.1:(\d+)").group(1))
        in_bundle = lambda name: os.path.join(bundle, name)  # noqa: E731
        agent = start("device-agent", "--agent-device-id", "dev-1",
                      "--agent-relay", f"{LOOPBACK}:{relay_port}",
                      "--agent-relay-hostname", "relay.localhost",
                      "--agent-mac-key-file", in_bundle("mac.key"),
                      "--agent-cert-file", in_bundle("device.crt"),
                      "--agent-key-file", in_bundle("device.key"),
                      "--agent-ca-file", in_bundle("ca.crt"),
                      "--udp-listen", f"{LOOPBACK}:0")
        lobby.wait_for(r"ControlProtocol starting on \d+")
        agent_port = int(agent.wait_for(r"ControlProtocol starting on (\d+)").group(1))
        relay.wait_for(re.escape(f"device dev-1 online at {LOOPBACK}:{agent_port}"))
        for daemon in (agent, lobby, relay):
            python = daemon.wait_for(r"twistd \S+ \((\S+) [\d.]+\) starting up").group(1)
            self.assertTrue(python.startswith(os.path.dirname(self.bin)), python)
            self.assert_clean_stop(daemon)
