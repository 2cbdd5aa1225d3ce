"""Status conditions: one writer's change leaves the others' conditions alone."""

from __future__ import annotations

from splitserve_operator.conditions import get_condition, set_condition


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
