"""Pool status from Deployment rollouts and problems."""

from __future__ import annotations

from typing import Any

from splitserve_operator.status import Problem, Rollout, build_status


def deployment(
    desired: int,
    ready: int,
    *,
    generation: int = 1,
    observed: int = 1,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "replicas": desired,
            "readyReplicas": ready,
            "updatedReplicas": desired,
            "observedGeneration": observed,
            "conditions": conditions or [],
        },
    }


def conditions_of(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_from_rollouts() -> None:
    ready = {"prefill": deployment(2, 2), "decode": deployment(1, 1), "router": deployment(1, 1)}
    status = build_status({}, ready, [], invalid=None, generation=3, endpoint="http://r/v1", now="t")
    assert conditions_of(status) == {
        "Ready": ("True", "Ready"),
        "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["prefill"] == {"replicas": 2, "readyReplicas": 2, "desiredReplicas": 2, "ready": "2/2"}
    assert status["observedGeneration"] == 3 and status["endpoint"] == "http://r/v1"

    scaling = {**ready, "decode": deployment(3, 1, generation=2, observed=1)}
    status = build_status({}, scaling, [], invalid=None, generation=3, endpoint=None, now="t")
    assert conditions_of(status)["Ready"] == ("True", "Ready")
    assert conditions_of(status)["Progressing"] == ("True", "RollingOut")

    stuck = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "timeout",
    }
    stalled = {**ready, "prefill": deployment(1, 0, conditions=[stuck])}
    status = build_status({}, stalled, [], invalid=None, generation=3, endpoint=None, now="t")
    assert conditions_of(status) == {  # decode workers prefill while no prefill pod is ready
        "Ready": ("True", "Ready"),
        "Progressing": ("False", "ProgressDeadlineExceeded"),
        "Degraded": ("True", "ProgressDeadlineExceeded"),
    }
    assert "endpoint" not in status


def test_status_with_problems_keeps_other_writers_conditions() -> None:
    metrics = {
        "type": "MetricsAvailable",
        "status": "False",
        "reason": "NoPrometheus",
        "message": "",
        "lastTransitionTime": "t0",
    }
    invalid = Problem("InvalidSpec", "spec.x: bad")
    status = build_status(
        {"conditions": [metrics]}, {}, [], invalid=invalid, generation=2, endpoint=None, now="t"
    )
    assert status["conditions"][0] == metrics
    assert conditions_of(status)["Ready"] == ("False", "InvalidSpec")
    assert status["prefill"]["ready"] == "0/0"
    missing = build_status(
        {},
        {},
        [Problem("SecretNotFound", "Secret hf not found")],
        invalid=None,
        generation=1,
        endpoint=None,
        now="t",
    )
    assert conditions_of(missing)["Degraded"] == ("True", "SecretNotFound")


def test_rollout_without_generation_tracking() -> None:
    rollout = Rollout.of(
        "decode",
        {"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}},
    )
    assert rollout.done and rollout.summary == "decode 1/1"
    assert not Rollout.of("decode", None).done


def test_prefill_at_zero_is_ready_and_stable() -> None:
    at_zero = {"prefill": deployment(0, 0), "decode": deployment(1, 1), "router": deployment(1, 1)}
    status = build_status({}, at_zero, [], invalid=None, generation=1, endpoint=None, now="t")
    assert conditions_of(status) == {
        "Ready": ("True", "Ready"),
        "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected"),
    }
    starting = {**at_zero, "prefill": deployment(1, 0)}  # back from zero: its pod is not ready yet
    status = build_status({}, starting, [], invalid=None, generation=1, endpoint=None, now="t")
    assert conditions_of(status)["Ready"] == ("True", "Ready")  # the decode workers prefill meanwhile
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "no prefill pod ready: the decode workers prefill" in ready["message"]
    unserved = {**at_zero, "decode": deployment(1, 0)}
    status = build_status({}, unserved, [], invalid=None, generation=1, endpoint=None, now="t")
    assert conditions_of(status)["Ready"] == ("False", "NotReady")
