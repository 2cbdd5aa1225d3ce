"""The inference core: one forward pass over a packed batch of prompt chunks and decode tokens.

gpt-fast's vocabulary: `prefill` runs prompt tokens into a sequence's KV cache, `decode_one_token`
extends every running sequence by one token, `sample` (sampling.py) picks the tokens. Both are the
same packed forward (attention.py), so a step can mix them (chunked prefill, Sarathi-Serve style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.attention import BATCH_KWARG, PackedBatch, Segment
from splitserve.engine.kv_cache import KVPool, SequenceKV
from splitserve.engine.loader import LoadedModel


@dataclass(frozen=True)
class Work:
    """New tokens of one sequence for this step: a prompt chunk, or its last sampled token."""

    kv: SequenceKV
    token_ids: list[int]


class Engine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device

    def new_pool(self, block_size: int, budget_bytes: int | None = None, salt: bytes | None = None) -> KVPool:
        """A block pool for this model on this device; `budget_bytes` defaults to the loaded budget,
        `salt` (block_hash.cache_salt) turns the prefix cache on."""
        budget = self.loaded.kv_budget_bytes if budget_bytes is None else budget_bytes
        return KVPool.for_budget(self.loaded.layout, budget, block_size, self.device, salt)

    def prefill(self, kv: SequenceKV, token_ids: list[int]) -> torch.Tensor:
        """Run one prompt chunk; logits `[V]` of its last token."""
        return self.forward([Work(kv, token_ids)])[0]

    def decode_one_token(self, kvs: list[SequenceKV], token_ids: list[int]) -> torch.Tensor:
        """Extend each sequence by its last sampled token; logits `[S, V]`."""
        return self.forward([Work(kv, [token]) for kv, token in zip(kvs, token_ids, strict=True)])

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        """One model forward over every item of `work`; logits `[S, V]` at each item's last token.

        Every item's sequence takes the blocks its new tokens need first: NoFreeBlocksError (raised before
        anything is computed) is the scheduler's cue to preempt.
        """
        for item in work:
            item.kv.grow(item.kv.length + len(item.token_ids))
        pools = {id(item.kv.pool): item.kv.pool for item in work}
        if len(pools) != 1:
            raise ValueError("every sequence of one forward must live in the same KV pool")
        (pool,) = pools.values()
        batch = PackedBatch(pool, [Segment(item.kv, item.kv.length, len(item.token_ids)) for item in work])
        input_ids = torch.tensor(
            [token for item in work for token in item.token_ids], device=self.device
        ).unsqueeze(0)  # [1, N]
        output = self.model(
            input_ids=input_ids,
            position_ids=batch.position_ids(self.device),
            logits_to_keep=batch.last_token_indices(self.device),
            use_cache=False,
            **{BATCH_KWARG: batch},
        )
        for item in work:
            item.kv.advance(item.token_ids)
        logits: torch.Tensor = output.logits[0]  # [S, V]
        return logits
