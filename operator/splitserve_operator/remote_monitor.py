"""A pool's PodMonitor in another namespace: where kube-prometheus-stack's Prometheus looks for them.

The operator's --pod-monitor-namespace (the chart's podMonitor.namespace) puts every pool's PodMonitor
there. An ownerReference cannot point across namespaces (the garbage collector takes such an owner as
missing and deletes the dependent), so this PodMonitor has no owner and the operator removes it itself:
- the pool records where its PodMonitor lives in its POD_MONITOR_ANNOTATION, "<namespace>/<name>";
- a reconcile that wants it elsewhere, or nowhere (the setting changed or was removed), deletes the
  recorded one;
- deleting a pool that carries the annotation deletes its PodMonitor first (handlers.py: an on-delete
  handler filtered on it, under the finalizer kopf keeps on every pool for its timers).
The live object is read at most once per resync (and on each spec change or operator start), so a
steady pool costs no request here between resyncs; a hand edit is undone within resync_seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from splitserve_operator import naming
from splitserve_operator.diff import covers, strip_nones, with_removals
from splitserve_operator.kube import ApiError, KubeClient
from splitserve_operator.render import Manifest, Pool, build_remote_pod_monitor
from splitserve_operator.settings import OperatorSettings
from splitserve_operator.status import Problem

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
KIND = "PodMonitor"


def place_of(monitor: Manifest) -> str:
    """The annotation's value for a PodMonitor: "<namespace>/<name>"."""
    return f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"


async def delete_recorded(client: KubeClient, place: str) -> None:
    """Delete the PodMonitor at "<namespace>/<name>"; one already gone (or its CRD) is fine. One the
    operator may no longer delete (a chart upgrade that moved podMonitor.namespace took the Role there
    along) is logged and left, so that it never blocks the pool's deletion or its new PodMonitor."""
    namespace, _, name = place.partition("/")
    if not namespace or not name:
        return
    try:
        await client.delete(KIND, namespace, name)
    except ApiError as exc:
        if exc.status != 403:
            raise
        log.warning("%s %s not deleted (%s): delete it by hand", KIND, place, exc.message)


def _foreign(live: Object, pool: Pool) -> bool:
    """Whether the object at the PodMonitor's place belongs to someone else (not labelled as this pool's)."""
    labels = (live.get("metadata") or {}).get("labels") or {}
    return (
        labels.get(naming.POOL_LABEL) != pool.name
        or labels.get(naming.POOL_NAMESPACE_LABEL) != pool.namespace
    )


class RemoteMonitors:
    """Applies pools' PodMonitors in the monitoring namespace and deletes the ones left elsewhere."""

    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings
        # Pool -> (when its PodMonitor was last read or written, and where).
        self._applied: dict[tuple[str, str], tuple[float, str]] = {}

    def forget(self, namespace: str, name: str) -> None:
        self._applied.pop((namespace, name), None)

    async def reconcile(
        self, meta: Object, pool: Pool, *, pod_monitor: bool, recheck: bool
    ) -> tuple[dict[str, str | None], Problem | None]:
        """One reconcile's part (`meta`: the pool's metadata): the pool annotations to change and a
        problem for its status. Overload and outages (429, 5xx) are raised for the caller to retry."""
        recorded = (meta.get("annotations") or {}).get(naming.POD_MONITOR_ANNOTATION)
        desired = build_remote_pod_monitor(pool, pod_monitor=pod_monitor)
        try:
            place, problem = await self.apply(pool, recorded, desired, recheck=recheck)
        except ApiError as exc:
            if exc.status == 429 or exc.status >= 500:
                raise
            return {}, Problem("ApplyFailed", f"{KIND}: {exc.message}")
        return ({naming.POD_MONITOR_ANNOTATION: place} if place != recorded else {}), problem

    async def apply(
        self, pool: Pool, recorded: str | None, desired: Manifest | None, *, recheck: bool
    ) -> tuple[str | None, Problem | None]:
        """Make the PodMonitor what `desired` says (None: there is none) and delete the one `recorded`
        at another place. Returns where the pool's PodMonitor now lives (for the annotation: None when
        it has none of its own) and a ChildConflict when another object holds the name."""
        key = (pool.namespace, pool.name)
        place = place_of(desired) if desired is not None else None
        if recorded is not None and recorded != place:
            await delete_recorded(self.client, recorded)
        if desired is None or place is None:
            self._applied.pop(key, None)
            return None, None
        cached = self._applied.get(key)
        fresh = cached is not None and time.monotonic() - cached[0] < self.settings.resync_seconds
        if cached is not None and fresh and not recheck and cached[1] == place:
            return place, None  # as applied within the last resync
        meta = desired["metadata"]
        live = await self.client.get(KIND, meta["namespace"], meta["name"])
        if live is None:
            try:
                live = await self.client.create(strip_nones(desired))
            except ApiError as exc:
                if exc.status != 409:  # 409: created meanwhile; compare with what is there
                    raise
                live = await self.client.get(KIND, meta["namespace"], meta["name"])
                if live is None:
                    raise
        if _foreign(live, pool):
            self._applied.pop(key, None)
            return None, Problem("ChildConflict", f"{KIND} {place} exists and is not this pool's; delete it")
        if not covers(live, desired):
            patch = with_removals(live, desired)
            live = await self.client.merge_patch(KIND, meta["namespace"], meta["name"], patch)
        self._applied[key] = (time.monotonic(), place)
        return place, None
