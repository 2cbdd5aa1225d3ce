"""Applying one child of an InferencePool: create it owned, or patch only the fields that drifted.

Split from reconcile.py, which decides what the children are; this is how one is written, with the
ownership rules (adopt what nobody controls, refuse what another controller owns: ChildConflict) and
the apiserver's transient failures (429, 5xx, unreachable) turned into a retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import aiohttp

from splitserve_operator.diff import covers, strip_nones, with_removals
from splitserve_operator.kube import ApiError, KubeClient
from splitserve_operator.render import Manifest
from splitserve_operator.status import Problem

Object = Mapping[str, Any]


class TransientError(Exception):
    """The apiserver could not be reached or was overloaded: retry the whole reconcile later."""


async def call_api(awaitable: Any) -> Any:
    """Await an API call, turning overload and connection failures into TransientError."""
    try:
        return await awaitable
    except ApiError as exc:
        if exc.status == 429 or exc.status >= 500:
            raise TransientError(str(exc)) from exc
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransientError(f"apiserver unreachable: {exc}") from exc


def comparable(desired: Manifest, autoscaled: bool) -> Manifest:
    """What must match on the live object: replicas of autoscaled pools belong to the autoscaler."""
    want = dict(desired)
    if autoscaled:
        want["spec"] = {k: v for k, v in desired["spec"].items() if k != "replicas"}
    return want


def owner_reference(owner: Object) -> dict[str, Any]:
    """The controller reference that makes the garbage collector delete children with their pool."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


class ConflictError(ApiError):
    """A child's name is taken by an object another controller owns; `live` is that object."""

    def __init__(self, problem: Problem, live: Object) -> None:
        super().__init__(409, problem.reason, problem.message)
        self.live = live


def owner_problem(actual: Object, owner: Object) -> Problem | None:
    uid = owner["metadata"].get("uid")
    for ref in (actual.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") != uid:
            name = actual["metadata"]["name"]
            return Problem(
                "ChildConflict",
                f"{actual.get('kind')} {name} is controlled by "
                f"{ref.get('kind')} {ref.get('name')}; rename or delete it",
            )
    return None


async def apply_child(
    client: KubeClient, desired: Manifest, actual: Object | None, owner: Object, *, autoscaled: bool
) -> tuple[Literal["created", "updated", "unchanged"], Object]:
    """Create the child, or patch the fields that drifted; the second element is the live object."""
    kind, meta = desired["kind"], desired["metadata"]
    ours = owner_reference(owner)
    if actual is None:
        try:
            created = {**desired, "metadata": {**meta, "ownerReferences": [ours]}}
            return "created", await call_api(client.create(strip_nones(created)))
        except ApiError as exc:
            if exc.status != 409:  # 409: our index is behind (it was just created); compare instead
                raise
        actual = await call_api(client.get(kind, meta["namespace"], meta["name"]))
        if actual is None:
            raise TransientError(f"{kind} {meta['name']} conflicted on create but cannot be read")
    if (problem := owner_problem(actual, owner)) is not None:
        raise ConflictError(problem, actual)
    want = comparable(desired, autoscaled)
    refs = list((actual.get("metadata") or {}).get("ownerReferences") or [])
    ours_already = owned(actual, owner)
    if ours_already and covers(actual, want):
        return "unchanged", actual
    want = with_removals(actual, want)
    if not ours_already:  # adopt: a merge patch replaces the list, so keep the references already there
        want["metadata"] = {**want["metadata"], "ownerReferences": [*refs, ours]}
    return "updated", await call_api(client.merge_patch(kind, meta["namespace"], meta["name"], want))


def owned(child: Object, owner: Object) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in (child.get("metadata") or {}).get("ownerReferences") or [])
