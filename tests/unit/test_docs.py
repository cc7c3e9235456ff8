"""
The product's docs (README.rst, docs/*.rst, bench/README.rst) parse as
reStructuredText without a warning: a stray merge marker, a short title
underline or a broken list shows up here, not on a reader's screen.
"""

import io
import pathlib

from docutils.core import publish_doctree
from twisted.trial import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _documents():
    yield ROOT / "README.rst"
    yield ROOT / "bench" / "README.rst"
    yield from sorted((ROOT / "docs").glob("*.rst"))


class DocsTests(unittest.TestCase):
    def test_every_document_parses_cleanly(self):
        problems = []
        for path in _documents():
            errors = io.StringIO()
            publish_doctree(
                path.read_text(),
                source_path=str(path),
                settings_overrides={
                    "report_level": 2,
                    "halt_level": 5,
                    "warning_stream": errors,
                    "syntax_highlight": "none",
                },
            )
            if errors.getvalue():
                problems.append(errors.getvalue())
        self.assertEqual(problems, [])

    def test_no_merge_markers(self):
        for path in _documents():
            previous = ""
            for number, line in enumerate(path.read_text().splitlines(), 1):
                # "=======" is a merge marker unless it underlines a title of
                # its own length or stands alone (an overline or transition);
                # docutils reads it glued to a paragraph as more text.
                marker = line.startswith(("<<<<<<< ", ">>>>>>> ")) or (
                    line == "=======" and len(previous.rstrip()) > 7
                )
                self.assertFalse(marker, f"{path.name}:{number}: merge marker {line!r}")
                previous = line
