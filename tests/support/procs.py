"""
Running p2pnat daemons and commands as processes, from this source tree,
for tests and benchmarks (a lab process runs inside a namespace, so it
cannot share the test's reactor); and a quick command in the test's own
process (L{provision}).
"""

import contextlib
import io
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env():
    """Environment for a child: this tree first on the path, unbuffered."""
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def twistd(daemon, *args):
    """
    argv running ``twistd -n DAEMON ARGS`` in the foreground with no pid
    file, logging to standard output; run it with C{cwd=REPO} (twistd finds
    our plugins in ./twisted/plugins) and C{env=env()}.
    """
    # Not `-m twisted.scripts.twistd`: that module has no __main__ block,
    # so it would import, do nothing and exit 0.
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "--logfile=-", daemon, *args]


def p2pnat(*args):
    """argv running the ``p2pnat`` command."""
    return [sys.executable, "-m", "p2pnat.cli", *args]


def provision(*argv):
    """
    Run a ``p2pnat`` command in this process, quietly; return its standard
    output.

    @raise AssertionError: with its standard error, if it fails.
    """
    from p2pnat import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    if status != 0:
        raise AssertionError(f"p2pnat {' '.join(argv)}: status {status}: {err.getvalue()}")
    return out.getvalue()


def without_certificate(config):
    """
    Make ``client.toml`` a bundle from before client certificates: drop its
    ``cert_file``, ``key_file`` and ``ca_file`` lines.
    """
    with open(config) as f:
        lines = [line for line in f if not line.startswith(("cert_file", "key_file", "ca_file"))]
    with open(config, "w") as f:
        f.writelines(lines)
