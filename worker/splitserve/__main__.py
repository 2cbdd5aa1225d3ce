"""`python -m splitserve` is the `splitserve` console script (tests and containers use either)."""

import sys

from splitserve.cli import main

sys.exit(main())
