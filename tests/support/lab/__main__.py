"""``python -m tests.support.lab TOOL ...``: see :mod:`tests.support.lab.tools`."""

import sys

from tests.support.lab.tools import main

sys.exit(main())
