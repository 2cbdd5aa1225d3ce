"""splitserve data plane: engine, KV transfer, router and workers."""

import time

# When this process started, near enough (the package is the first thing the CLI imports): workers
# export the seconds from here to serving, what a new replica costs the autoscaler.
STARTED_AT = time.monotonic()
