"""Weights fetched once: hub pools (the default source) keep their Hugging Face cache on a claim that
every pod of the pool mounts, so a scale-up loads from the claim instead of the hub."""

from __future__ import annotations

from typing import Any

from splitserve_operator import naming
from splitserve_operator.render import build_children

from .test_render import by_kind, pool


def pod_volumes(children: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        child["metadata"]["name"]: child["spec"]["template"]["spec"]["volumes"]
        for child in children
        if child["kind"] == "Deployment"
    }


def test_the_default_hub_source_caches_on_a_claim_of_the_pool_that_every_pod_mounts() -> None:
    children = build_children(pool(), pod_monitor=False)
    claim = by_kind(children)["PersistentVolumeClaim", "llama-model-cache"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "100Gi"}},
    }
    assert claim["metadata"]["labels"][naming.POOL_LABEL] == "llama", "watched, owned and GC'd as a child"
    kinds = [child["kind"] for child in children]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment"), "the claim exists before pods"
    cache = {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "llama-model-cache"}}
    for name, volumes in pod_volumes(children).items():
        assert cache in volumes, name


def test_cache_settings_an_existing_claim_and_opting_out() -> None:
    sized = {"size": "40Gi", "storageClassName": "nfs", "accessMode": "ReadWriteOnce"}
    children = build_children(
        pool({"model": {"name": "m", "source": {"hub": {"cache": sized}}}}), pod_monitor=False
    )
    assert by_kind(children)["PersistentVolumeClaim", "llama-model-cache"]["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "40Gi"}},
        "storageClassName": "nfs",
    }
    shared = build_children(
        pool({"model": {"name": "m", "source": {"hub": {"cache": {"claimName": "team-cache"}}}}}),
        pod_monitor=False,
    )
    assert "PersistentVolumeClaim" not in [child["kind"] for child in shared], "the user's claim is not ours"
    for volumes in pod_volumes(shared).values():
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "team-cache"}} in volumes
    nothing_to_download = [
        {"name": "m", "source": {"hub": {"cache": {"enabled": False}}}},
        {"name": "m", "source": {"pvc": {"claimName": "weights"}}},
        {"name": "/opt/splitserve/models/tiny"},  # baked into the image (examples/tiny-cpu.yaml)
    ]
    for model in nothing_to_download:
        children = build_children(pool({"model": model}), pod_monitor=False)
        assert "PersistentVolumeClaim" not in [child["kind"] for child in children], model
