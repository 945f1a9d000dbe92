"""``python -m atpstar.cli``: the same as the ``atpstar`` command."""

import sys

from . import main

sys.exit(main())
