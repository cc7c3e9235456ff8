"""
A ``redis-server`` of the test's own (Debian's package; no system
service): on 127.0.0.1 (or an address the test gives, e.g. a lab
namespace's) on a free port, with its own config file and data directory
under the test's temporary directory.  Persistence is the test's choice:
none by default (``save ""``, no AOF), or the append-only file the cluster
documentation recommends (C{appendonly=True}: ``appendfsync everysec``).

Tests may L{RedisServer.kill} it (SIGKILL: a crash), L{RedisServer.stop}
it (SIGTERM) and L{RedisServer.start} it again on the same port and data
directory, to test what nodes do while Redis is away and after it returns.
It is always killed in a cleanup.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest

REDIS_SERVER = shutil.which("redis-server")
STARTUP_TIMEOUT = 10.0


def require_redis():
    """Skip the test when redis-server is not installed (it is in system-packages.txt)."""
    if REDIS_SERVER is None:
        raise SkipTest("redis-server is not installed (Debian package redis-server;"
                       " scripts/install-system-packages installs it)")


def free_port(host="127.0.0.1"):
    """A TCP port the kernel just gave out on C{host}, for a server to bind next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """
    One redis-server process for one test.

    @ivar url: ``redis://HOST:PORT/0``, what ``[cluster] redis`` takes.
    """

    def __init__(self, testcase, host="127.0.0.1", port=None, appendonly=False):
        require_redis()
        self.host = host
        self.port = port or free_port(host)
        self.dir = os.path.abspath(testcase.mktemp()) + "-redis"
        os.makedirs(self.dir)
        self.log_path = os.path.join(self.dir, "redis.log")
        self.config_path = os.path.join(self.dir, "redis.conf")
        with open(self.config_path, "w") as f:
            f.write(f"bind {host}\nport {self.port}\ndir {self.dir}\n"
                    f"logfile {self.log_path}\ndaemonize no\nprotected-mode yes\n"
                    'save ""\n'
                    f"appendonly {'yes' if appendonly else 'no'}\nappendfsync everysec\n")
        self.proc = None
        testcase.addCleanup(self.kill)
        self.start()

    @property
    def url(self):
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self):
        return (self.host, self.port)

    def start(self):
        """Start it (again), and wait until it answers PING."""
        if self.running():
            return
        self.proc = subprocess.Popen([REDIS_SERVER, self.config_path], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.command("PING") != b"+PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on {self.url}:"
                                     f" {self.log()}")
            time.sleep(0.02)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL (a crash): what was not persisted is lost."""
        self._signal(signal.SIGKILL)

    def stop(self):
        """SIGTERM: Redis writes its append-only file (if any) and exits."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig):
        if self.running():
            self.proc.send_signal(sig)
        if self.proc is not None:
            self.proc.wait(10)

    def command(self, *args, timeout=2.0):
        """
        One command in the inline protocol, for checks from the test: the
        first line of the answer (bytes), or None when Redis does not answer.
        """
        try:
            with socket.create_connection(self.address, timeout=timeout) as s:
                s.sendall(" ".join(args).encode() + b"\r\n")
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.rstrip(b"\r\n").split(b"\r\n")[0]
        except OSError:
            return None

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log)"
