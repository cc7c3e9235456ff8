"""
Lab processes from the tests' side: waiting on what a process prints (log
lines, ``--json`` events), and running Python modules (daemons' tools, our
own :mod:`~tests.support.lab.tools`) inside a namespace from this source
tree.  Every wait is bounded, and a process that exits ends the wait at
once, with its output in the message.
"""

import json
import re
import time

from tests.support import procs

#: The module of the in-namespace tools (:mod:`tests.support.lab.tools`).
TOOLS = "tests.support.lab"


class LogTimeout(AssertionError):
    """A process did not print what a test waited for."""


def wait_output(proc, find, what, timeout=10.0, stream="stdout"):
    """
    Call ``find`` with everything ``proc`` (a lab process) printed on
    ``stream`` so far, until it returns something true, and return that.
    Raise :class:`LogTimeout`, naming ``what`` and showing the process's
    output, if the process exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None
        # Read after the exit check: what an exited process printed is all there.
        found = find(getattr(proc, stream)())
        if found:
            return found
        if exited:
            raise LogTimeout(f"{proc.describe(4000)}\nexited before {what}")
        if time.monotonic() >= deadline:
            raise LogTimeout(f"no {what} within {timeout}s:\n{proc.describe(4000)}")
        time.sleep(0.02)


def wait_for_log(proc, pattern, start=0, timeout=10.0, stream="stdout"):
    """
    Wait until ``proc``'s ``stream``, from character ``start`` on, matches
    the regular expression ``pattern``; return the match (its ``end()`` is
    an offset in the whole output).
    """
    regex = re.compile(pattern)
    return wait_output(proc, lambda text: regex.search(text, start), f"/{pattern}/ in {stream}",
                       timeout, stream)


def events(text):
    """The JSON event lines of a ``--json`` run's (or a tool's) output."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def first(evs, name):
    """The first event called ``name`` in ``evs``, or None."""
    for e in evs:
        if e.get("event") == name:
            return e
    return None


def wait_event(proc, name, start=0, timeout=20.0, where=None):
    """
    Wait until ``proc`` printed a JSON event ``name`` (after the first
    ``start`` events, and matching ``where(event)`` if given); return it.
    """
    def find(text):
        for e in events(text)[start:]:
            if e.get("event") == name and (where is None or where(e)):
                return e
        return None

    return wait_output(proc, find, f"a {name!r} event", timeout)


def start_python(node, module, *args, **kwargs):
    """Start ``python -m MODULE ARGS`` in ``node`` from this tree; a tracked process."""
    return node.popen(node.python("-m", module, *args), cwd=procs.REPO, env=procs.env(),
                      **kwargs)


def run_python(node, module, *args, timeout=30):
    """
    Run ``python -m MODULE ARGS`` in ``node`` from this tree and return the
    last JSON line it printed; fail unless it exits 0 with one.
    """
    done = node.run(node.python("-m", module, *args), cwd=procs.REPO, env=procs.env(),
                    timeout=timeout)
    evs = events(done.stdout)
    if done.returncode != 0 or not evs:
        raise AssertionError(f"{module} {' '.join(map(str, args))} in {node.name} failed"
                             f" ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    return evs[-1]


def finish_python(proc, timeout=20):
    """
    Wait for a process started by :func:`start_python` (or the probe tool)
    to exit 0 and return the last JSON line it printed; fail otherwise.
    """
    proc.wait(timeout)
    evs = events(proc.stdout())
    if proc.poll() != 0 or not evs:
        raise AssertionError(f"no JSON result: {proc.describe(4000)}")
    return evs[-1]


def start_tool(node, tool, *args, **kwargs):
    """Start ``python -m tests.support.lab TOOL ARGS`` in ``node``; a tracked process."""
    return start_python(node, TOOLS, tool, *args, **kwargs)


def run_tool(node, tool, *args, timeout=30):
    """Run ``python -m tests.support.lab TOOL ARGS`` in ``node``; its last JSON line."""
    return run_python(node, TOOLS, tool, *args, timeout=timeout)
