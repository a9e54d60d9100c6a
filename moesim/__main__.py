"""``python -m moesim``: the ``moesim`` command line (see :mod:`moesim.cli`)."""

import sys

from moesim.cli import main

sys.exit(main())
