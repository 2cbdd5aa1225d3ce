"""Queue-aware sizing: replicas that drain the work already waiting by a deadline, instead of chasing it.

A windowed rate shows a load step a window late, and latency feedback during a backlog measures the
queue's age, not what the pool lacks: sized on either, a pool hit by a burst kept asking for more
replicas while the first ones were still starting (the bench's step trace reached 27 prefill replicas
for a peak that needs 10) and held them through the scale-down window. Instead the planner counts what
is already known:

- the work waiting: requests queued at the pool's engines and, for decode, those queued upstream at
  prefill, which reach decode as prefill catches up;
- the arrival rate a growing queue reveals at once (a pool with a queue serves at full speed, so
  arrivals = its throughput + the queue's growth), ahead of the windowed rate;
- the replicas already starting and when they will serve (from the start-up time learned on this pool).

It projects the queue to the moment a replica asked for now would serve and asks for the replicas that
serve the arrivals and drain that projected queue within a deadline after it. Once the replicas in
flight suffice (the projected queue is empty) it asks for nothing beyond the arrivals' own size: the
drain does not overshoot, and the stabilization history, which holds only that size, lets the drain
replicas go as soon as the queue is gone.

Pure: `QueueWatch` is plain state the planner carries between evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Startups:
    """A pool's replicas by readiness, and how long start-ups take (all as of this evaluation)."""

    ready: int = 0  # serving now
    pending: int = 0  # asked for, not serving yet
    pending_in: float = 0.0  # seconds until the pending ones serve
    startup: float = 0.0  # seconds until a replica asked for now serves (learned on this pool)


def projected_queue(queued: float, arrivals: float, per_replica: float, pool: Startups) -> float:
    """Work still queued when a replica asked for now serves: the queue grows (or drains) at the
    arrivals less the ready replicas' throughput until the pending ones serve, then less theirs too."""
    first = min(pool.pending_in, pool.startup)
    then = max(0.0, queued + (arrivals - pool.ready * per_replica) * first)
    return max(0.0, then + (arrivals - (pool.ready + pool.pending) * per_replica) * (pool.startup - first))


def drain_replicas(
    queued: float, arrivals: float, per_replica: float, pool: Startups, deadline: float
) -> tuple[int, float]:
    """(replicas, projected queue): the replicas that serve the arrivals and drain the projected queue
    within `deadline` seconds after a replica asked for now serves; 0 replicas when the ones ready and
    pending drain it before then. `per_replica` is one replica's full-speed throughput, in the units
    of `arrivals` per second."""
    backlog = projected_queue(queued, arrivals, per_replica, pool)
    if backlog <= 0:
        return 0, 0.0
    return math.ceil((arrivals + backlog / deadline) / per_replica - 1e-9), backlog


@dataclass
class QueueWatch:
    """Arrivals as a pool's queue shows them, between windowed rates: while a queue stands, the pool
    serves at full speed, so what arrives is its throughput plus the queue's growth (negative while it
    drains)."""

    queued: float | None = None
    time: float | None = None
    arrivals: float | None = None  # the last estimate; None without a standing queue

    def update(self, now: float, queued: float, throughput: float | None, ready: int) -> None:
        """Take this evaluation's queue and full-speed throughput. A queue of one request per ready
        replica or less is Poisson noise, not a standing queue, and gives no estimate."""
        previous, then = self.queued, self.time
        self.queued, self.time = queued, now
        standing = queued > max(ready, 1)
        if not standing or previous is None or then is None or now <= then or throughput is None:
            self.arrivals = None
            return
        self.arrivals = max(0.0, throughput + (queued - previous) / (now - then))
