"""`python -m splitserve_operator`: the operator image's entrypoint (no data-plane imports)."""

import sys

from splitserve_operator.main import main

sys.exit(main())
