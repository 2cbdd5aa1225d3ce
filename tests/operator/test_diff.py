"""Manifest comparison: what counts as a change the operator must apply."""

from __future__ import annotations

from splitserve_operator.diff import covers, merge_diff, with_removals


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
