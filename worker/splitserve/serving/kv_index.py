"""Which decode worker probably holds a prompt's KV blocks, and the pick that weighs it against load.

Approximate on purpose (llm-d's "approximate" mode): the router remembers the full-block hash chain of
every prompt (and, once a stream ends, of prompt + answer) it routed to a worker, for
`index_ttl_seconds`, in an LRU of bounded size. An exact index would need every worker to publish
block stored/evicted events and the router to stay consistent with that stream through restarts and
lost messages; routing history needs nothing from the workers and is exact enough for conversations,
whose next turn resends what this router itself sent and received. Being wrong is cheap: the worker
looks the prompt up in its own cache, so a stale entry costs a recompute, never a wrong token.

Everything here is pure (no I/O, an injectable clock): the router calls it around its own picks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from splitserve.contract.config import RoutingConfig
from splitserve.engine.block_hash import block_hashes, cache_salt
from splitserve.serving.endpoints import Endpoint, pick_least_loaded

# Blocks remembered per worker: at 16 tokens a block, a million tokens, more than a CPU or GPU worker's
# KV cache holds (the index only needs to cover what the worker can still have); about 100 bytes each.
INDEX_BLOCKS_PER_WORKER = 1 << 16


class PrefixIndex:
    """Per worker URL, the block hashes routed there and when each entry expires, least recent first."""

    def __init__(
        self,
        ttl_s: float,
        capacity: int = INDEX_BLOCKS_PER_WORKER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s, self._capacity, self._clock = ttl_s, capacity, clock
        self._workers: dict[str, OrderedDict[int, float]] = {}

    def record(self, worker: str, hashes: Sequence[int]) -> None:
        """`worker` now holds this chain. Recorded tail first, so that the LRU cap drops a chain's tail
        before its head, as the workers' own caches do: a head without its tail is still a hit."""
        entries = self._workers.setdefault(worker, OrderedDict())
        expires = self._clock() + self._ttl_s
        for content in reversed(hashes):
            entries[content] = expires
            entries.move_to_end(content)
        while len(entries) > self._capacity:
            entries.popitem(last=False)

    def cached_blocks(self, worker: str, hashes: Iterable[int]) -> int:
        """How many leading blocks of the chain `worker` is believed to hold (an expired one ends it)."""
        entries = self._workers.get(worker)
        if not entries:
            return 0
        now, count = self._clock(), 0
        for content in hashes:
            expires = entries.get(content)
            if expires is None:
                break
            if expires <= now:
                del entries[content]
                break
            count += 1
        return count

    def forget(self, worker: str) -> None:
        """The worker lost its cache (it died)."""
        self._workers.pop(worker, None)

    def retain(self, workers: set[str]) -> None:
        """Only these workers are in the pool: the others' entries go (pods come and go with new
        addresses, and an address that is never looked up again would never expire)."""
        for worker in self._workers.keys() - workers:
            del self._workers[worker]

    def size(self, worker: str) -> int:
        return len(self._workers.get(worker, ()))


def sequences(endpoint: Endpoint) -> int:
    """Running + waiting sequences: this router's own count is always current, the worker's report (which
    includes other routers' requests) lags a poll; the larger of the two, as their sum would count this
    router's requests twice."""
    return max(endpoint.in_flight, endpoint.reported_load)


def kv_aware_rank(
    candidates: Sequence[Endpoint], cached: dict[str, int], blocks: int, config: RoutingConfig
) -> list[Endpoint]:
    """Candidates best first by RoutingConfig's score (see its docstring); `cached[url]` is how many of
    the prompt's `blocks` full blocks the worker is believed to hold. Ties go to the least loaded, then
    to the least recently picked, as in `pick_least_loaded`."""
    counts = {endpoint.url: sequences(endpoint) for endpoint in candidates}
    least, busiest = min(counts.values(), default=0), max(counts.values(), default=0)

    def score(endpoint: Endpoint) -> float:
        running = counts[endpoint.url]
        swamped = running - least >= config.overload_margin
        hit = 0.0 if swamped or blocks == 0 else cached.get(endpoint.url, 0) / blocks
        # Over the busiest candidate's count once this request joins it: always below 1, so a full hit on
        # a busy worker still beats an idle worker's cold cache until the margin says it is swamped.
        load = max(endpoint.kv_cache_usage, running / (busiest + 1))
        return config.cache_weight * hit - config.load_weight * load

    return sorted(
        candidates,
        key=lambda e: (-score(e), e.in_flight, e.reported_load, e.last_pick),
    )


class DecodePlacement:
    """The router's decode-worker choice: kv-aware (index + score) or least-loaded, per RoutingConfig."""

    def __init__(
        self,
        config: RoutingConfig,
        *,
        model: str,
        revision: str | None,
        block_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self._block_size = config, block_size
        # The router's own salt: its hashes never meet the workers', they only have to agree with themselves.
        self._salt = cache_salt(model, revision, "router-index")
        self.index = PrefixIndex(config.index_ttl_seconds, clock=clock)

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        """The chain of `tokens`' full blocks (empty when the index is not used)."""
        if self.config.strategy != "kv-aware":
            return []
        return block_hashes(tokens, self._block_size, self._salt)

    def chooser(self, hashes: Sequence[int]) -> Callable[[Iterable[Endpoint], set[str]], Endpoint | None]:
        """The pick for `EndpointPool.acquire` of a prompt whose chain is `hashes`."""
        if not hashes:
            return pick_least_loaded

        def choose(endpoints: Iterable[Endpoint], exclude: set[str]) -> Endpoint | None:
            candidates = [e for e in endpoints if e.healthy and e.url not in exclude]
            cached = {e.url: self.index.cached_blocks(e.url, hashes) for e in candidates}
            ranked = kv_aware_rank(candidates, cached, len(hashes), self.config)
            return ranked[0] if ranked else None

        return choose

    def remember(self, worker: str, hashes: Sequence[int]) -> None:
        """`worker` got (or computed) the KV of the chain `hashes` (from `hashes()`)."""
        if hashes:
            self.index.record(worker, hashes)

    def forget(self, worker: str) -> None:
        self.index.forget(worker)
