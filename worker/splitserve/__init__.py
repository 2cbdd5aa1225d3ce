"""splitserve data plane: engine, KV transfer, router and workers."""
