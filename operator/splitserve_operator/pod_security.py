"""Pod and container security contexts that the `restricted` Pod Security Standard admits.

Every pod the operator renders (router, prefill, decode) gets them, so pools run in namespaces that
enforce `pod-security.kubernetes.io/enforce: restricted`. The uid is the worker image's own user
(worker/Dockerfile), so runAsNonRoot holds for any image built from it; fsGroup lets that user write
the model cache volume. `spec.podSecurityContext` overrides the pod-level fields one by one (e.g. a
custom image's uid) and `spec.imagePullSecrets` names the secrets of a private registry.
"""

from __future__ import annotations

from typing import Any

from splitserve_operator.models import InferencePoolSpec

Manifest = dict[str, Any]

WORKER_UID = 10001  # `USER 10001` in worker/Dockerfile


def container_security_context() -> Manifest:
    """A fresh dict per container: manifests are plain data that callers may change."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(spec: InferencePoolSpec) -> Manifest:
    """The restricted defaults with the spec's override merged over them, field by field."""
    defaults: Manifest = {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        # Re-own the model cache only when its root is not ours yet: a recursive chown of a filled
        # cache on every pod start would cost what the cache saves.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {**defaults, **(spec.pod_security_context or {})}


def image_pull_secrets(spec: InferencePoolSpec) -> list[Manifest] | None:
    """None (absent) when the spec names none, so a merge patch removes a list a previous spec set."""
    return [{"name": secret.name} for secret in spec.image_pull_secrets] or None
