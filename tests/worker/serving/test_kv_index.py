"""The router's approximate prefix index, the kv-aware score and migration's resubmitted request: pure
logic, a fake clock for the TTL."""

from __future__ import annotations

import pytest

from splitserve.contract.config import RoutingConfig
from splitserve.engine.params import GenerationRequest, SamplingParams
from splitserve.serving.endpoints import Endpoint
from splitserve.serving.kv_index import DecodePlacement, PrefixIndex, kv_aware_rank
from splitserve.serving.migration import resumed_request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker(name: str, *, in_flight: int = 0, reported: int = 0, usage: float = 0.0) -> Endpoint:
    return Endpoint(
        "decode", name, 1, healthy=True, in_flight=in_flight, reported_load=reported, kv_cache_usage=usage
    )


def test_index_counts_the_leading_run_and_expires_after_its_ttl() -> None:
    clock = Clock()
    index = PrefixIndex(ttl_s=10.0, clock=clock)
    index.record("a", [1, 2, 3])
    assert index.cached_blocks("a", [1, 2, 3, 4]) == 3
    assert index.cached_blocks("a", [1, 9, 3]) == 1  # a chain: past the first miss nothing counts
    assert index.cached_blocks("b", [1, 2, 3]) == 0
    clock.now += 6
    index.record("a", [1, 2])  # routed again: those two live on
    clock.now += 6
    assert index.cached_blocks("a", [1, 2, 3]) == 2  # block 3 expired, and is dropped
    assert index.size("a") == 2
    clock.now += 10
    assert index.cached_blocks("a", [1, 2]) == 0
    index.forget("a")
    assert index.size("a") == 0
    index.record("a", [1])
    index.record("gone", [1])
    index.retain({"a", "new"})  # the pool after a discovery round
    assert (index.size("a"), index.size("gone")) == (1, 0)


def test_index_is_bounded_and_drops_a_chains_tail_first() -> None:
    index = PrefixIndex(ttl_s=60.0, capacity=4, clock=Clock())
    index.record("a", [1, 2, 3])
    index.record("a", [10, 20, 30])
    assert index.size("a") == 4
    assert index.cached_blocks("a", [10, 20, 30]) == 3  # the newest chain whole
    assert index.cached_blocks("a", [1, 2, 3]) == 1  # the older one kept its head only


def test_a_conversation_follows_its_history_until_the_worker_is_swamped() -> None:
    config = RoutingConfig(overload_margin=3)
    holder, idle = worker("holder", in_flight=2), worker("idle")
    cached = {holder.url: 8, idle.url: 0}
    assert kv_aware_rank([holder, idle], cached, 10, config)[0] is holder
    holder.in_flight = 3  # three more than the idle worker: the margin
    assert kv_aware_rank([holder, idle], cached, 10, config)[0] is idle
    holder.in_flight, holder.reported_load = 0, 5  # other routers' sequences count as well
    assert kv_aware_rank([holder, idle], cached, 10, config)[0] is idle


def test_score_weighs_hit_against_load_and_kv_usage() -> None:
    a, b = worker("a", in_flight=1), worker("b", in_flight=1)
    cached = {a.url: 2, b.url: 6}
    assert kv_aware_rank([a, b], cached, 10, RoutingConfig())[0] is b
    b.kv_cache_usage = 0.95  # nearly full: 0.6 - 0.95 loses to 0.2 - 0.5
    assert kv_aware_rank([a, b], cached, 10, RoutingConfig())[0] is a
    assert kv_aware_rank([a, b], cached, 10, RoutingConfig(load_weight=0.0))[0] is b
    # No full block in the prompt, or no credit for cache: the least loaded, then the least recently picked.
    a.kv_cache_usage, b.kv_cache_usage, a.last_pick, b.last_pick = 0.0, 0.0, 2, 1
    assert kv_aware_rank([a, b], cached, 0, RoutingConfig())[0] is b
    assert kv_aware_rank([a, b], cached, 10, RoutingConfig(cache_weight=0.0))[0] is b


def test_placement_remembers_what_it_routed_and_least_loaded_ignores_it() -> None:
    clock = Clock()
    placement = DecodePlacement(RoutingConfig(), model="m", revision=None, block_size=4, clock=clock)
    busy, idle = worker("busy", in_flight=1), worker("idle")
    history = list(range(10, 30))
    assert len(placement.hashes(history)) == 5 and placement.hashes(history[:3]) == []
    placement.remember(busy.url, placement.hashes(history[:16]))
    turn = placement.hashes([*history, 7, 8, 9, 10])
    assert placement.chooser(turn)([busy, idle], set()) is busy
    assert placement.chooser(turn)([busy, idle], {busy.url}) is idle
    busy.healthy = False
    assert placement.chooser(turn)([busy, idle], set()) is idle
    busy.healthy = True
    clock.now += RoutingConfig().index_ttl_seconds
    assert placement.chooser(turn)([busy, idle], set()) is idle  # the entries expired

    plain = DecodePlacement(
        RoutingConfig(strategy="least-loaded"), model="m", revision=None, block_size=4, clock=clock
    )
    assert plain.hashes(history) == []
    plain.remember(busy.url, plain.hashes(history))
    assert plain.chooser(plain.hashes(history))([busy, idle], set()) is idle


def test_resumed_request_continues_with_what_is_left() -> None:
    sampling = SamplingParams(max_tokens=10, min_tokens=4, temperature=0.0, stop=("x",), stop_token_ids=(7,))
    original = GenerationRequest(request_id="r" * 128, prompt_token_ids=(5, 6), sampling=sampling)
    resumed = resumed_request(original, [11, 12, 13], moves=1)
    assert resumed.prompt_token_ids == (5, 6, 11, 12, 13)
    assert (resumed.sampling.max_tokens, resumed.sampling.min_tokens) == (7, 1)
    assert resumed.sampling.stop == ("x",) and resumed.sampling.stop_token_ids == (7,)
    assert resumed.request_id.endswith(".moved1") and len(resumed.request_id) < 128 - len(".retry9")
    assert resumed_request(original, [1] * 6, moves=2).sampling.min_tokens == 0
    with pytest.raises(ValueError, match="nothing to resume"):
        resumed_request(original, [1] * 10, moves=1)
