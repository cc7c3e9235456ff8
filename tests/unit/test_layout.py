"""
The package layout keeps its promises: pure logic in L{p2pnat.protocol}
imports no Twisted, every C{test-case-name} marker names a real test module,
and nothing points at files outside the repository.
"""

import ast
import importlib.util
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from tests.support import procs

PACKAGE = os.path.join(procs.REPO, "p2pnat")
MARKER = re.compile(r"^# -\*- test-case-name: (\S+) -\*-$", re.M)


def _sources(top):
    for root, _, files in os.walk(top):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


class LayoutTests(SynchronousTestCase):
    def test_markers_name_real_test_modules(self):
        missing = []
        for path in _sources(PACKAGE):
            with open(path) as f:
                found = MARKER.search(f.read())
            if found is None:
                if not path.endswith("__init__.py"):  # a package's docstring needs none
                    missing.append(f"{path}: no test-case-name marker")
                continue
            for name in found.group(1).split(","):
                if importlib.util.find_spec(name) is None:
                    missing.append(f"{path}: {name} does not exist")
        self.assertEqual(missing, [])

    def test_protocol_is_pure(self):
        """Codecs and planning import nothing that does I/O or keeps time."""
        banned = ("twisted", "p2pnat.net", "p2pnat.daemon", "p2pnat.relay", "p2pnat.agent",
                  "p2pnat.lobby", "p2pnat.peer", "p2pnat.cli")
        found = [(path, name) for path in _sources(os.path.join(PACKAGE, "protocol"))
                 for name in _imports(path)
                 if any(name == b or name.startswith(b + ".") for b in banned)]
        self.assertEqual(found, [])

    def test_daemons_do_not_import_each_other(self):
        """The agent, the lobby and the peer library never import the relay daemon, etc."""
        daemons = ("relay", "agent", "lobby", "peer")
        found = []
        for d in daemons:
            for path in _sources(os.path.join(PACKAGE, d)):
                for name in _imports(path):
                    for other in daemons:
                        if other != d and name.startswith(f"p2pnat.{other}"):
                            found.append((path, name))
        self.assertEqual(found, [])

    def test_no_reference_outside_the_repository(self):
        found = []
        for top in ("p2pnat", "tests", "docs", "bench"):
            for root, _, files in os.walk(os.path.join(procs.REPO, top)):
                for name in files:
                    if name.endswith((".py", ".rst")):
                        path = os.path.join(root, name)
                        with open(path) as f:
                            if "SPEC" + ".md" in f.read():
                                found.append(path)
        self.assertEqual(found, [])
