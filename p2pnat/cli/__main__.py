# -*- test-case-name: tests.process.test_demo -*-
"""``python -m p2pnat.cli``: the ``p2pnat`` command without its script."""

import sys

from p2pnat.cli import main

sys.exit(main())
