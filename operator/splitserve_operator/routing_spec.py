"""The InferencePool's `routing` block: how the router places requests on the pool's workers.

The router reads these settings as `RoutingConfig` (splitserve.contract.config) from the engine
ConfigMap; every field here is that model's field, with its default, bounds and description, so the
two cannot drift: only the wire names differ (camelCase, `indexTTLSeconds` as Kubernetes spells
acronyms).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.fields import FieldInfo

from splitserve.contract.config import RoutingConfig, RoutingStrategy
from splitserve_operator.api_base import ApiModel


def _as_in_config(name: str, alias: str | None = None) -> Any:
    """RoutingConfig's field `name` (default, bounds, description), under the wire name `alias`."""
    info: FieldInfo = copy.deepcopy(RoutingConfig.model_fields[name])
    if alias is not None:
        info.alias = info.validation_alias = info.serialization_alias = alias
        info.alias_priority = 2
    return info


class RoutingSpec(ApiModel):
    """Prefix-aware routing and conditional disaggregation: a decode worker is scored by the share of
    the prompt it holds against its load; a short uncached prompt is prefilled on it, the rest on a
    prefill worker; a stream whose decode worker dies moves to another one."""

    strategy: RoutingStrategy = _as_in_config("strategy")
    cache_weight: float = _as_in_config("cache_weight")
    load_weight: float = _as_in_config("load_weight")
    overload_margin: int = _as_in_config("overload_margin")
    index_ttl_seconds: float = _as_in_config("index_ttl_seconds", "indexTTLSeconds")
    local_prefill_max_tokens: int = _as_in_config("local_prefill_max_tokens")
    migration_limit: int = _as_in_config("migration_limit")

    def config(self) -> RoutingConfig:
        """The router's model of these settings (the same fields under their Python names)."""
        return RoutingConfig.model_validate(self.model_dump())
