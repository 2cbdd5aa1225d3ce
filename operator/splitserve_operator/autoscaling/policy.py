"""The autoscaling policy: one pool's latency and load over the window -> desired replicas, explained.

Pure: no I/O, no clock; everything it remembers lives in `PoolState`, which the caller keeps.

Per evaluation and pool (prefill tracks TTFT, decode tracks ITL):
1. Missing data (no request rate, no latency while requests flow, no signals at all) holds the current
   replicas; garbage never moves a pool to zero or to max.
2. Idle (no requests over the window, nothing running or queued) recommends `min`. A prefill pool whose
   `min` is 0 also stops, and stays stopped, on TTFT (zero.py).
3. Otherwise HPA-style feedback on the latency ratio r = observed / target with a tolerance band:
   outside target*(1±tol) it asks for ceil(ready * r) (at least one more above the band), inside it
   holds, and it acts only on a window that shows the current replicas (all ready for a window).
   The predictive planner (planner.py) sizes the pool for the forecast load: above or within the band
   the larger of feedback and planner wins, so load growing faster than latency reacts is met before
   the breach; below the band the planner decides how far to shrink, since latency near saturation
   says little about how many replicas can go.
   With a standing queue (here, or at prefill for decode) the planner's queue-aware size decides
   (backlog.py): latency then measures the queue's age. The replicas that drain it are a floor outside
   the stabilization history, held while the queue stands; afterwards a burst memory keeps at least the
   size the burst's arrivals needed for scaleDown.burstMemorySeconds.
4. The recommendation goes through the HPA `behavior` machinery: scale-up acts on the lowest
   recommendation of its stabilization window, scale-down on the highest of its own (300 s by
   default, which is what stops flapping), each limited to max(maxStep, ceil(current*maxStepPercent%))
   per evaluation (a queue's drain floor excepted: it comes at once), and the result is clamped to
   min..max (behavior.py).
5. `propose` decides, `commit` remembers: between them a shared budget (budget.py) may cap the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from splitserve.contract.names import WorkerRole
from splitserve_operator.autoscaling.backlog import Startups
from splitserve_operator.autoscaling.behavior import limit_step, stabilize, step_limit
from splitserve_operator.autoscaling.planner import (
    DecodePlanner,
    Observation,
    Plan,
    Planner,
    PrefillPlanner,
    Sizing,
    ewma,
    has_queue,
    queue_ahead,
)
from splitserve_operator.autoscaling.zero import stays_at_zero, stops
from splitserve_operator.autoscaling_spec import ScalingRules
from splitserve_operator.models import InferencePoolSpec

SIGNAL: dict[WorkerRole, str] = {"prefill": "TTFT", "decode": "ITL"}


@dataclass(frozen=True)
class PoolPolicy:
    """One pool's autoscaling settings, flattened from the InferencePool spec."""

    role: WorkerRole
    target: float
    percentile: float
    min_replicas: int
    max_replicas: int
    tolerance: float
    interval: float
    window: float
    predictive: bool
    scale_up: ScalingRules
    scale_down: ScalingRules
    max_num_seqs: int
    burst_memory: float = 0.0  # seconds a burst's size is kept after draining its queue

    @classmethod
    def from_spec(cls, spec: InferencePoolSpec, role: WorkerRole) -> PoolPolicy:
        auto = spec.autoscaling
        pool = spec.prefill if role == "prefill" else spec.decode
        target = spec.prefill.slo.ttft_seconds if role == "prefill" else spec.decode.slo.itl_seconds
        return cls(
            role=role,
            target=target,
            percentile=pool.slo.percentile,
            min_replicas=pool.replicas.min,
            max_replicas=pool.replicas.max,
            tolerance=auto.tolerance,
            interval=auto.interval_seconds,
            window=auto.window_seconds,
            predictive=auto.predictive,
            scale_up=auto.scale_up,
            scale_down=auto.scale_down,
            max_num_seqs=spec.decode.max_num_seqs,
            burst_memory=auto.scale_down.burst_memory_seconds,
        )

    def sizing(self, startups: Startups) -> Sizing:
        """Size for the target itself (the tolerance band is the feedback's, not a margin), as far ahead
        as a replica asked for now takes to serve: the learned start-up time plus two intervals, since
        the decision already lags the data by up to one, plus half a window, since a rate over the
        window measures the load at the window's middle. Drain a queue within an interval of the new
        replicas serving (backlog.py; a window and half of one were tried: fewer intervals met)."""
        return Sizing(
            target=self.target,
            percentile=self.percentile,
            horizon=2 * self.interval + self.window / 2 + startups.startup,
            drain=self.interval,
            max_num_seqs=self.max_num_seqs,
            startups=startups,
        )

    def bound(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)

    def describe_latency(self, latency: float) -> str:
        return f"{SIGNAL[self.role]} p{self.percentile * 100:g} {latency:.3g}s"


@dataclass
class PoolState:
    """What one pool's policy remembers between evaluations (in memory; see docs/autoscaling.md)."""

    planner: Planner
    history: list[tuple[float, int]] = field(default_factory=list)
    last_scale_time: float | None = None
    started: float | None = None
    settled_since: float | None = None  # since when every replica asked for has been serving
    startup: float | None = None  # learned seconds from a scale-up decision to its replicas serving
    scaling_up: tuple[float, int] | None = None  # (when, to how many) of the scale-up in flight
    queued_at: float | None = None  # when a standing queue (here or upstream) was last seen
    bursts: list[tuple[float, int]] = field(default_factory=list)  # sizes asked for while draining a queue

    def track_startup(self, ready: int | None, now: float) -> None:
        """Learn the start-up delay from the last scale-up that completed undisturbed."""
        if self.scaling_up is not None and ready is not None and ready >= self.scaling_up[1]:
            self.startup = ewma(self.startup, now - self.scaling_up[0], 0.5)
            self.scaling_up = None

    def startups(self, current: int, ready: int | None, now: float, window: float) -> Startups:
        """Replicas ready and starting, with the start-up time learned on this pool (a window until one
        scale-up was seen): the pending ones serve a start-up after they were asked for."""
        startup = self.startup if self.startup is not None else window
        serving = min(ready, current) if ready is not None else current
        asked = self.scaling_up[0] if self.scaling_up is not None else now
        pending_in = max(0.0, startup - (now - asked))
        return Startups(ready=serving, pending=current - serving, pending_in=pending_in, startup=startup)

    def settle(self, current: int, ready: int | None, now: float, window: float) -> bool:
        """Whether the latency window shows the current replicas: all of them have served for a whole
        window. Until then latency-ratio feedback must not add more (the last step has not shown yet)."""
        if ready is not None and ready < current:
            self.settled_since = None
            return False
        if self.settled_since is None:
            # First look (e.g. after an operator restart): replicas that are all ready count as settled,
            # and so does a pool at zero (no replica left to show).
            first_look = self.started == now and (ready is not None or current == 0)
            self.settled_since = now - window if first_look else now
        return now - self.settled_since >= window

    @classmethod
    def new(cls, role: WorkerRole, last_scale_time: float | None = None) -> PoolState:
        planner = PrefillPlanner() if role == "prefill" else DecodePlanner()
        return cls(planner=planner, last_scale_time=last_scale_time)


@dataclass(frozen=True)
class Decision:
    """One pool's outcome, with everything needed to explain it in status."""

    role: WorkerRole
    current: int
    desired: int
    target: float
    observed_latency: float | None
    predicted_replicas: int | None
    predicted_load: float | None
    reason: str
    last_scale_time: float | None
    metrics_available: bool = True
    startup: float | None = None  # the start-up estimate the planner sized for
    needed: int | None = None  # replicas the arrivals alone need (no queue to drain), when known
    burst: int | None = None  # the size the last burst needed, while remembered
    draining: bool = False  # the pool has a standing queue of its own


def feedback(
    policy: PoolPolicy, current: int, obs: Observation, latency: float, settled: bool
) -> tuple[int, bool, str]:
    """HPA target tracking on the latency ratio r = observed / target: ceil(ready * r) outside the
    tolerance band, the current replicas inside it. Returns (answer, below the band, words)."""
    ratio, tol = latency / policy.target, policy.tolerance
    observed = policy.describe_latency(latency)
    # Size from the replicas that produced the latency: pods still starting have not helped yet.
    base = min(obs.ready, current) if obs.ready else current
    if ratio > 1 + tol:
        words = f"{observed} above target {policy.target:.3g}s+{tol:.0%}"
        if not settled:  # the replicas last added are not in the window yet: wait for them
            return current, False, words + " (waiting for the last scale-up to show)"
        return max(math.ceil(base * ratio - 1e-9), current + 1), False, words
    if ratio < 1 - tol:
        words = f"{observed} below target {policy.target:.3g}s-{tol:.0%}"
        # Latency is not proportional to load near saturation: shrink on it only once it shows the
        # current replicas (the planner, when it has an answer, overrides this).
        return (math.ceil(base * ratio - 1e-9) if settled else current), True, words
    return current, False, f"{observed} within target {policy.target:.3g}s±{tol:.0%}"


def missing(obs: Observation | None, role: WorkerRole) -> str | None:
    """Why these signals cannot drive a decision, or None when they can."""
    if obs is None:
        return "no signals"
    if obs.request_rate is None:
        return "no request rate at the router"
    if obs.latency is None and obs.request_rate:
        return f"no {SIGNAL[role]} samples although requests are flowing"
    return None


def is_idle(obs: Observation) -> bool:
    return obs.request_rate == 0 and not obs.running and not obs.waiting


def recommend(
    policy: PoolPolicy,
    state: PoolState,
    current: int,
    obs: Observation,
    settled: bool,
    sizing: Sizing,
    queue_in_window: bool,
) -> tuple[int, int, Plan | None, str]:
    """The raw (unstabilized) recommendation, a floor that bypasses stabilization (the replicas that
    drain a queue: held only while it lasts), the planner's answer and the words for all.
    `queue_in_window`: the latency window saw a queue, so latency measures its age."""
    if is_idle(obs):
        return policy.min_replicas, 0, None, f"idle: no requests over {policy.window:g}s"
    if obs.latency is None:  # no arrivals and no samples, yet work in flight over the window: let it drain
        return current, 0, None, f"draining: no new requests over {policy.window:g}s, work still in flight"
    fb, below, words = feedback(policy, current, obs, obs.latency, settled)
    if policy.min_replicas == 0:  # may stand at zero (zero.py): TTFT decides, the planner is not asked
        zero = stays_at_zero(current, obs.latency / policy.target, policy.tolerance) or stops(
            current, obs, below, settled, queue_in_window or queue_ahead(obs)
        )
        if zero is not None:
            return 0, 0, None, f"{words}; {zero}"
    predicted = state.planner.plan(obs, sizing) if policy.predictive else None
    pred = predicted.replicas if predicted else None
    steady = predicted.steady if predicted and predicted.steady is not None else pred
    floor = 0
    if pred is not None and steady is not None and (pred > steady or queue_in_window or queue_ahead(obs)):
        # A queue: latency measures its age, not what the pool lacks; the planner sizes for draining it,
        # and the replicas it counted on stay until it is gone.
        rec, floor = steady, max(pred, current) if queue_ahead(obs) else pred
    elif not below:  # above or within the band: the larger answer, so load outruns latency no more
        rec = max(fb, pred or 0)
    elif pred is None:  # below it without a planner: HPA's ratio
        rec = fb
    else:  # below it: the planner's size; the scale-down window keeps noise from shrinking the pool
        rec = pred
    parts = [words]
    if fb != current and not floor:
        parts.append(f"feedback {fb}")
    if predicted is not None:
        parts.append(f"predictive {pred} ({predicted.note})" if pred is not None else predicted.note)
    return rec, floor, predicted, "; ".join(parts)


def propose(
    policy: PoolPolicy,
    state: PoolState,
    current: int,
    obs: Observation | None,
    now: float,
    unavailable: str | None = None,
) -> Decision:
    """One pool's decision before it is committed (`commit`): a shared budget may still cap it."""
    if state.started is None:
        state.started = now
    why_not = unavailable or missing(obs, policy.role)
    if why_not is not None or obs is None:
        desired = policy.bound(current)
        reason = f"holding {current}: {why_not}"
        if desired != current:
            reason += f"; moved into bounds {policy.min_replicas}..{policy.max_replicas}"
        return Decision(
            policy.role,
            current,
            desired,
            policy.target,
            None,
            None,
            None,
            reason,
            state.last_scale_time,
            metrics_available=False,
            startup=state.startup,
        )

    if queue_ahead(obs):
        state.queued_at = now
    # Latency over a window that saw a queue measures the queue's age: no feedback or calibration on it
    # (the queue seen last may have lasted up to an interval longer).
    queue_in_window = state.queued_at is not None and now - state.queued_at < policy.window + policy.interval
    settled = state.settle(current, obs.ready, now, policy.window) and not queue_in_window
    if state.startup is None:  # until a scale-up is timed, start from what the replicas measured
        state.startup = obs.startup
    state.track_startup(obs.ready, now)
    sizing = policy.sizing(state.startups(current, obs.ready, now, policy.window))
    state.planner.learn(obs, now, sizing, settled)
    raw, floor, predicted, reason = recommend(policy, state, current, obs, settled, sizing, queue_in_window)
    rec = policy.bound(raw)
    state.history.append((now, rec))
    keep = max(policy.scale_up.stabilization_window_seconds, policy.scale_down.stabilization_window_seconds)
    state.history = [(time, r) for time, r in state.history if time >= now - keep]

    if queue_ahead(obs):  # a burst the pool could not absorb: remember the size its arrivals needed
        state.bursts.append((now, rec))
    state.bursts = [(time, r) for time, r in state.bursts if time >= now - policy.burst_memory]
    held = stabilize(state.history, current, now, policy, state.started)
    # The burst memory only holds replicas the pool has (never scales up by itself).
    burst = max((r for _, r in state.bursts), default=0)
    remembered = min(current, burst)
    stable = max(held, policy.bound(floor), remembered)
    # The replicas that drain a measured queue come at once, past the step limit (Knative's panic mode):
    # the limit guards against chasing a noisy latency ratio, and each limited step costs a start-up.
    limited = max(limit_step(current, stable, policy), min(stable, policy.bound(floor)))
    desired = policy.bound(limited)
    words = _explain(policy, current, (rec, held, stable, limited, desired), (floor, remembered))
    reason += f" -> {words}"
    return Decision(
        policy.role,
        current,
        desired,
        policy.target,
        obs.latency,
        predicted.replicas if predicted else None,
        predicted.load if predicted else None,
        reason,
        state.last_scale_time,
        startup=state.startup,
        needed=policy.bound(predicted.steady) if predicted and predicted.steady is not None else None,
        burst=policy.bound(burst) if burst else None,
        draining=has_queue(obs),
    )


def commit(state: PoolState, decision: Decision, now: float) -> Decision:
    """Remember a decision as made: when the pool last scaled, and the scale-up now in flight."""
    current, desired = decision.current, decision.desired
    if desired != current:
        state.last_scale_time = now
    if desired > current:
        state.settled_since = None  # new replicas: latency will show them only later
        state.scaling_up = (now, desired)
    elif desired < current:
        state.scaling_up = None
    return replace(decision, last_scale_time=state.last_scale_time)


def decide(
    policy: PoolPolicy,
    state: PoolState,
    current: int,
    obs: Observation | None,
    now: float,
    unavailable: str | None = None,
) -> Decision:
    """Evaluate one pool on its own. `unavailable` (why the signals could not be read) forces a hold."""
    return commit(state, propose(policy, state, current, obs, now, unavailable), now)


def _explain(
    policy: PoolPolicy, current: int, steps: tuple[int, int, int, int, int], floors: tuple[int, int]
) -> str:
    """Words for how the recommendation became the desired replicas: steps are (recommended,
    stabilized, floored, step-limited, bounded), floors (the queue's drain, the burst memory)."""
    rec, held, stable, limited, desired = steps
    floor, remembered = floors
    words = f"{desired}" if desired == current else f"{current} to {desired}"
    if stable > held:
        words += " (burst memory)" if stable == remembered and stable > floor else " (draining a queue)"
    elif rec > held:
        words += f" (scale-up stabilized over {policy.scale_up.stabilization_window_seconds}s)"
    elif rec < held:
        words += f" (scale-down stabilized over {policy.scale_down.stabilization_window_seconds}s)"
    if limited != stable:
        rules = policy.scale_up if stable > current else policy.scale_down
        words += f" (limited to {step_limit(current, rules)} per evaluation)"
    if desired != limited:
        words += f" (bounds {policy.min_replicas}..{policy.max_replicas})"
    return words
