"""Names, label keys, annotation keys and condition types of the operator's children.

Children have fixed names derived from the pool's, so a reconcile can find them without a lookup
and a second run of the same handler addresses the same objects.
"""

from __future__ import annotations

import re
from typing import Final

# The keys and ports the worker image and the operator agree on, from the shared contract.
from splitserve.contract.names import (
    COMPONENT_ROLES,
    DRAIN_EXIT_MARGIN_SECONDS,
    ENGINE_CONFIG_DIR,
    ENGINE_CONFIG_KEY,
    GROUP,
    HTTP_PORT,
    POOL_LABEL,
    ROLE_LABEL,
    WORKER_ROLES,
    ComponentRole,
)

__all__ = [
    "COMPONENT_ROLES",
    "DRAIN_EXIT_MARGIN_SECONDS",
    "ENGINE_CONFIG_DIR",
    "ENGINE_CONFIG_KEY",
    "GROUP",
    "HTTP_PORT",
    "POOL_LABEL",
    "ROLE_LABEL",
    "WORKER_ROLES",
    "ComponentRole",
]

# Recommended labels on every child.
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "splitserve-operator"
NAME_LABEL: Final = "app.kubernetes.io/name"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"

# Annotations.
SPEC_HASH_ANNOTATION: Final = f"{GROUP}/spec-hash"  # on children: hash of what the operator rendered
CONFIG_HASH_ANNOTATION: Final = f"{GROUP}/engine-config-hash"  # on pod templates: rolls pods on change
# On a pool: "<namespace>/<name>" of its PodMonitor in another namespace (no ownerReference can point
# there, so the operator deletes it itself; remote_monitor.py).
POD_MONITOR_ANNOTATION: Final = f"{GROUP}/pod-monitor"
# On such a PodMonitor: the namespace of its pool (its own namespace is the monitoring one).
POOL_NAMESPACE_LABEL: Final = f"{GROUP}/pool-namespace"

# Condition types (status.conditions[].type).
READY: Final = "Ready"
PROGRESSING: Final = "Progressing"
DEGRADED: Final = "Degraded"
METRICS_AVAILABLE: Final = "MetricsAvailable"  # written by the autoscaler

# A Service name is a DNS-1035 label of at most 63 characters; the longest suffix is "-prefill".
MAX_POOL_NAME: Final = 63 - len("-prefill")
POOL_NAME_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAMESPACE_PATTERN: Final = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"  # a DNS-1123 label
NAME_TOO_LONG: Final = f"name must be at most {MAX_POOL_NAME} characters (Services are named <name>-prefill)"
NAME_NOT_DNS: Final = "name must be a DNS-1035 label: lowercase letters, digits and '-', from a letter"


def child_name(pool: str, role: ComponentRole) -> str:
    """Deployment and Service name of one role: `{pool}-{role}`."""
    return f"{pool}-{role}"


def remote_monitor_name(namespace: str, pool: str) -> str:
    """The PodMonitor of a pool that lives in the monitoring namespace: `{namespace}.{pool}`, unique
    across namespaces (a namespace name has no dot) and a valid object name (a DNS subdomain)."""
    return f"{namespace}.{pool}"


def engine_config_name(pool: str) -> str:
    return f"{pool}-engine"


def selector_labels(pool: str, role: ComponentRole) -> dict[str, str]:
    """The immutable Deployment selector and the Service selector of one role."""
    return {POOL_LABEL: pool, ROLE_LABEL: role}


def common_labels(pool: str, role: ComponentRole | None = None) -> dict[str, str]:
    """Labels on every child: the pool selector, plus recommended app.kubernetes.io ones.

    Not app.kubernetes.io/instance: Argo CD tracks applications by that label.
    """
    labels = {POOL_LABEL: pool, NAME_LABEL: "splitserve", MANAGED_BY_LABEL: MANAGED_BY}
    if role is not None:
        labels[ROLE_LABEL] = role
        labels[COMPONENT_LABEL] = role
    return labels


def pool_name_problem(name: str) -> str | None:
    """Why `name` cannot name a pool (its children would be invalid), or None; mirrors the CRD rule."""
    if len(name) > MAX_POOL_NAME:
        return NAME_TOO_LONG
    if not re.match(POOL_NAME_PATTERN, name):
        return NAME_NOT_DNS
    return None
