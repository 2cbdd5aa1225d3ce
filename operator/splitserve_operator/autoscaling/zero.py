"""A prefill pool allowed to stand at zero (`prefill.replicas.min: 0`): when to stop it, when to keep it
stopped, and (by the ordinary feedback) when to bring it back.

While the prefill pool stands at zero, decode workers prefill every prompt themselves (the router sends
them there, chunked between their decode steps), so the router's TTFT still measures what clients see:
it stays the signal, and an absent prefill pool is not missing data (its worker series are simply gone).

- Stop (1 -> 0): TTFT below the tolerance band over a window that shows the current replica, no queue in
  the window, and that replica computed prompts less than IDLE_BUSY of the time: the decode workers take
  on a small share of one replica's work. Like every scale-down it goes through the scale-down
  stabilization window (300 s by default), so a pool stops only after that long of agreement.
- Stay at zero: TTFT not above the band. The planner is not asked: it sizes for the prompts arriving,
  which the decode workers compute now, and would always want one replica back.
- Back (0 -> 1 or more): TTFT above the band; the feedback asks for at least one more replica than the
  pool has, the planner for what the load needs (policy.recommend).
"""

from __future__ import annotations

from splitserve_operator.autoscaling.planner import Observation

# Share of the time the pool's last replica may spend computing prompts for it to be stopped: an almost
# idle replica, whose prompts the decode workers absorb between their steps. Above it the replica stays.
IDLE_BUSY = 0.1


def stays_at_zero(current: int, ratio: float, tolerance: float) -> str | None:
    """Why a pool at zero stays there (TTFT of the decode workers' own prefills not above the band)."""
    if current == 0 and ratio <= 1 + tolerance:
        return "prefill pool at zero: decode workers prefill within target"
    return None


def stops(current: int, obs: Observation, below: bool, settled: bool, queued: bool) -> str | None:
    """Why the pool's last replica may go (the words for status), or None while it must stay."""
    if current != 1 or not below or not settled or queued or obs.busy is None or obs.busy >= IDLE_BUSY:
        return None
    busy = f"{obs.busy:.0%} of the time (< {IDLE_BUSY:.0%})"
    return f"last replica busy {busy}: decode workers take its prompts"
