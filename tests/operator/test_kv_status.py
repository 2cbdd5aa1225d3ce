"""Pure KV-sharing status: counters over the window -> ratios, failures by reason, the Degraded verdict."""

from __future__ import annotations

from splitserve_operator.autoscaling.signals import SignalQuery
from splitserve_operator.kv_status import (
    FAILING_MIN,
    KV_TRANSFERS_FAILING,
    KvFigures,
    kv_events,
    kv_queries,
    recorded_problem,
    status_fields,
    status_patch,
    transfer_problem,
)
from splitserve_operator.status import build_status

from .test_status import conditions_of, deployment


def figures(
    remote: float = 0.0,
    local: float = 0.0,
    hits: float | None = None,
    queries: float | None = None,
    **failed: float,
) -> KvFigures:
    prefills = {"remote": remote, "local": local}
    return KvFigures(60, prefills, prefix_queries=queries, prefix_hits=hits, failures=failed)


def test_queries_read_the_contract_counters_of_the_pool_over_its_window() -> None:
    query = SignalQuery(
        pool="chat", window_seconds=60, ttft_percentile=0.9, itl_percentile=0.9, namespace='a"b'
    )
    exprs = kv_queries(query)
    where = '{pool="chat",namespace="a\\"b"}[60s]'
    assert exprs["prefills"] == f"sum by (placement) (increase(splitserve_prefills_total{where}))"
    assert exprs["failures"] == f"sum by (reason) (increase(splitserve_kv_transfer_failures_total{where}))"
    assert exprs["hits"] == f"sum(increase(splitserve_prefix_cache_hits_total{where}))"
    assert exprs["queries"] == f"sum(increase(splitserve_prefix_cache_queries_total{where}))"


def test_figures_from_prometheus_vectors() -> None:
    vectors = {
        "prefills": {"remote": 30.0, "local": 10.0},
        "queries": {"": 4000.0},
        "hits": {"": 3000.0},
        "failures": {"timeout": 2.4, "checksum": None},  # None: NaN in Prometheus
    }
    got = KvFigures.from_vectors(vectors, 60)
    assert got == KvFigures(60, {"remote": 30.0, "local": 10.0}, 4000.0, 3000.0, {"timeout": 2.4})
    assert status_fields(got) == {
        "remotePrefillRatio": 0.75,
        "prefixHitRatio": 0.75,
        "kvTransferFailures": {"timeout": 2},
    }


def test_no_traffic_is_no_ratio_not_zero() -> None:
    empty = KvFigures.from_vectors({"prefills": {}, "queries": {}, "hits": {}, "failures": {}}, 60)
    assert status_fields(empty) == {
        "remotePrefillRatio": None,
        "prefixHitRatio": None,
        "kvTransferFailures": {},
    }
    # Prefill at zero since the router started: only `local` exists; no hit yet: no hits series.
    only_local = KvFigures.from_vectors({"prefills": {"local": 5.0}, "queries": {"": 100.0}}, 60)
    assert status_fields(only_local) == {
        "remotePrefillRatio": 0.0,
        "prefixHitRatio": 0.0,
        "kvTransferFailures": {},
    }


def test_patch_is_empty_when_nothing_changed_and_drops_what_is_gone() -> None:
    now = figures(remote=9, local=1, hits=50, queries=100, timeout=4)
    current = status_fields(now)
    assert status_patch(current, now) == {}
    assert status_patch({}, figures()) == {}  # nothing seen, nothing recorded: no write
    later = status_patch(current, figures(remote=5, local=0, unavailable=3))
    assert later == {
        "remotePrefillRatio": 1.0,
        "prefixHitRatio": None,
        "kvTransferFailures": {"timeout": None, "unavailable": 3},
    }


def test_degraded_only_while_transfers_keep_failing() -> None:
    assert transfer_problem(figures(remote=100, timeout=FAILING_MIN - 1)) is None  # a worker died, retried
    assert transfer_problem(figures(remote=1000, timeout=FAILING_MIN)) is None  # 0.3% of the transfers
    problem = transfer_problem(figures(remote=40, timeout=8, unavailable=2))
    assert problem is not None and problem.reason == KV_TRANSFERS_FAILING
    assert "(timeout, unavailable)" in problem.message
    assert transfer_problem(figures(remote=10, timeout=30, unavailable=7)) == problem  # same words: no write
    assert transfer_problem(figures(remote=0, local=50, rejected=3)) is not None  # every transfer failed


def test_degraded_condition_from_the_verdict_keeps_the_pool_ready() -> None:
    ready = {"prefill": deployment(1, 1), "decode": deployment(1, 1), "router": deployment(1, 1)}
    problem = transfer_problem(figures(remote=10, timeout=5))
    status = build_status(
        {}, ready, [], invalid=None, generation=1, endpoint=None, now="t", kv_problem=problem
    )
    assert conditions_of(status)["Degraded"] == ("True", KV_TRANSFERS_FAILING)
    assert conditions_of(status)["Ready"] == ("True", "Ready")
    assert recorded_problem(status) == problem  # what a restarted operator carries on with
    assert [(e.type, e.reason) for e in kv_events({}, status["conditions"])] == [
        ("Warning", KV_TRANSFERS_FAILING)
    ]
    assert kv_events(status, status["conditions"]) == []  # once, when it starts
    healthy = build_status(status, ready, [], invalid=None, generation=1, endpoint=None, now="t2")
    assert conditions_of(healthy)["Degraded"] == ("False", "AsExpected")
    assert recorded_problem(healthy) is None
