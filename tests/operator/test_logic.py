"""Pure helpers: quantities, diffs, conditions, status."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from splitserve_operator.conditions import get_condition, set_condition
from splitserve_operator.diff import covers, merge_diff, with_removals
from splitserve_operator.models import KvTransferSpec, ResourceRequirements
from splitserve_operator.quantity import cpu_threads, parse_quantity, quantity_bytes, same_quantity
from splitserve_operator.reconcile import validation_message
from splitserve_operator.status import Problem, Rollout, build_status


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 << 30),
        ("500m", Decimal("0.5")),
        ("1e3", 1000),
        ("2G", 2 * 10**9),
        (".5Ki", 512),
        (3, 3),
        ("+1", 1),
    ],
)
def test_parse_quantity(text: str | int, value: Decimal | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1..2", "Gi", "1GB", "1 Gi", "-"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_quantity_helpers_and_model() -> None:
    assert quantity_bytes("1.5Ki") == 1536 and quantity_bytes("1500m") == 2
    assert cpu_threads("500m") == 1 and cpu_threads("3.9") == 3
    assert same_quantity("1", "1000m") and same_quantity(2, "2") and not same_quantity("1", "1Ki")
    assert not same_quantity(True, "1")
    assert ResourceRequirements.model_validate({"limits": {"nvidia.com/gpu": 1}}).limits == {
        "nvidia.com/gpu": "1"
    }
    with pytest.raises(ValidationError):
        KvTransferSpec(max_transfer_bytes="1..2")


def test_covers_ignores_server_defaults_and_spelling() -> None:
    desired = {
        "spec": {
            "replicas": 2,
            "template": {
                "containers": [{"name": "w", "resources": {"limits": {"cpu": "1000m", "memory": "1Gi"}}}]
            },
            "nodeSelector": None,
            "tolerations": [],
        }
    }
    actual = {
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 10,
            "template": {
                "containers": [
                    {
                        "name": "w",
                        "terminationMessagePath": "/dev/termination-log",
                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    }
                ]
            },
        }
    }
    assert covers(actual, desired)
    assert not covers({**actual, "spec": {**actual["spec"], "nodeSelector": {"a": "b"}}}, desired)
    assert not covers({"spec": {"replicas": 3}}, {"spec": {"replicas": 2}})
    assert not covers({"a": [1, 2]}, {"a": [1]})
    assert not covers({"a": 1}, {"a": True})


def test_label_selectors_must_match_exactly() -> None:
    desired = {"metadata": {"labels": {"a": "1"}}, "spec": {"selector": {"a": "1"}}}
    actual = {"metadata": {"labels": {"a": "1", "team": "x"}}, "spec": {"selector": {"a": "1", "b": "2"}}}
    assert not covers(actual, desired)
    assert covers({**actual, "spec": {"selector": {"a": "1"}}}, desired), "extra labels are fine"
    assert with_removals(actual, desired) == {
        "metadata": {"labels": {"a": "1"}},
        "spec": {"selector": {"a": "1", "b": None}},
    }


def test_merge_diff_is_minimal_and_leaves_unknown_keys() -> None:
    current = {"prefill": {"replicas": 1, "observedLatencySeconds": 0.4}, "endpoint": "x", "gone": 1}
    desired = {"prefill": {"replicas": 2}, "endpoint": "x", "gone": None}
    assert merge_diff(current, desired) == {"prefill": {"replicas": 2}, "gone": None}
    assert merge_diff(current, {"prefill": {"replicas": 1}}) == {}


def test_set_condition_moves_time_only_on_flips() -> None:
    others = [
        {
            "type": "MetricsAvailable",
            "status": "True",
            "reason": "Ok",
            "message": "",
            "lastTransitionTime": "t0",
        }
    ]
    first = set_condition(others, "Ready", "False", "NotReady", "waiting", now="t1")
    assert first[0] == others[0] and get_condition(first, "Ready")["lastTransitionTime"] == "t1"
    same = set_condition(first, "Ready", "False", "NotReady", "still waiting", now="t2")
    assert get_condition(same, "Ready")["lastTransitionTime"] == "t1"
    assert get_condition(same, "Ready")["message"] == "still waiting"
    flipped = set_condition(same, "Ready", "True", "Ready", "ok", now="t3", observed_generation=4)
    assert get_condition(flipped, "Ready") == {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "ok",
        "lastTransitionTime": "t3",
        "observedGeneration": 4,
    }
    assert set_condition(flipped, "Ready", "True", "Ready", "ok", now="t9", observed_generation=4) == flipped


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
    assert conditions_of(status) == {
        "Ready": ("False", "NotReady"),
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


def test_validation_message_uses_wire_paths() -> None:
    from splitserve_operator.models import InferencePoolSpec

    with pytest.raises(ValidationError) as info:
        InferencePoolSpec.model_validate(
            {"model": {"name": "m", "maxModelLen": 1}, "prefill": {"replicas": {"min": 0}}}
        )
    message = validation_message(info.value)
    assert "spec.model.maxModelLen: Input should be greater than or equal to 16" in message
    assert "spec.prefill.replicas.min" in message
