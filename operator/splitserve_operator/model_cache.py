"""The model cache: hub downloads kept on a PersistentVolumeClaim, so weights are fetched once.

Without it every pod downloads the model into its own emptyDir: ~16 GB per scale-up for an 8B model,
minutes an autoscaler planning for start-ups of about a minute does not have. With it, the first pod
fills the claim (huggingface_hub locks each file, so pods starting together do not corrupt it) and
every later pod only reads. The default claim is a child of the pool (ReadWriteMany, so pods on any
node mount it); `cache.claimName` names a claim of the user's instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitserve.contract.config import looks_like_path
from splitserve_operator import naming
from splitserve_operator.models import HubSource, ModelCache

if TYPE_CHECKING:
    from splitserve_operator.render import Pool

Manifest = dict[str, Any]


def hub_cache(pool: Pool) -> ModelCache | None:
    """The cache of a hub-sourced pool (the default source), or None: no cache, or nothing downloaded
    (a pvc or hostPath source, or a model path inside the image)."""
    source = pool.spec.model.source
    if source.pvc is not None or source.host_path is not None or looks_like_path(pool.spec.model.name):
        return None
    cache = (source.hub or HubSource()).cache
    return cache if cache.enabled else None


def claim_name(pool: Pool) -> str | None:
    """The claim pods mount as their Hugging Face cache, or None (a per-pod emptyDir)."""
    cache = hub_cache(pool)
    if cache is None:
        return None
    return cache.claim_name or f"{pool.name}-model-cache"


def build_model_cache_claim(pool: Pool) -> Manifest | None:
    """The claim the operator creates (none when the spec names its own). Unset fields are left out,
    not rendered as removal markers: the apiserver defaults storageClassName and binds volumeName,
    and a claim's spec may not change after that."""
    cache = hub_cache(pool)
    if cache is None or cache.claim_name is not None:
        return None
    spec: Manifest = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": f"{pool.name}-model-cache",
            "namespace": pool.namespace,
            "labels": naming.common_labels(pool.name),
        },
        "spec": spec,
    }
