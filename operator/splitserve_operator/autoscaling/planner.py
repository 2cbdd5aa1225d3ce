"""Predictive sizing, after an SLA planner: replicas for the forecast load at the latency target.

Feedback on latency acts only once the SLO is already missed, and a windowed percentile lags by about
half a window. The planner instead forecasts the load (Holt's level + trend, the trend only where it
stands out of its own noise) as far ahead as a new replica takes to serve, and sizes the pool for it,
plus headroom for what no forecast knows, from a capacity learned online from the workers' own
counters, with a correction factor (observed / modelled latency, as in NVIDIA Dynamo's SLA planner) for
what the model leaves out:

- prefill: prompt tokens a replica computes per busy second (token rate / step-seconds rate) give the
  service time of an average prompt; the pool behind a least-loaded router is an M/D/c queue (Erlang C),
  and the planner takes the fewest replicas whose modelled TTFT percentile meets target / correction
  at the forecast arrival rate plus PREFILL_HEADROOM.
- decode: step time as a line over batch size, fitted online on (mean batch, mean step) pairs, solved
  for the largest batch whose step stays within target / correction (correction = observed ITL
  percentile / modelled step, see DecodePlanner.learn), capped by maxNumSeqs, the KV cache and twice
  the largest batch ever seen (no blind extrapolation); streams in flight (Little's law) plus
  DECODE_SIGMAS of their Poisson spread, over that batch, give the replicas.

Everything here is pure: state is plain data that the policy carries from one evaluation to the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from splitserve_operator.autoscaling.backlog import QueueWatch, Startups, drain_replicas

# How fast learned values follow new samples (per evaluation); windowed rates are already smooth.
LEARN_RATE = 0.3
# A correction factor outside this range means the signals are garbage, not that the model is off.
CORRECTION_RANGE = (0.5, 4.0)
# Share of the target above which observed latency calibrates the model.
NEAR_TARGET = 0.5
# Busy replica-seconds per second below which token/busy ratios are too noisy to learn from.
MIN_BUSY = 0.02
# Forgetting factor of the decode step-time regression, per sample (memory of ~100 evaluations).
FORGET = 0.99
# Batch-size variance below which the regression cannot tell the slope from the intercept.
MIN_BATCH_VARIANCE = 0.25
# Headroom kept in the KV cache when it caps the batch.
KV_HEADROOM = 0.9
# Margins for what the forecast cannot know; the three are calibrated on the bench/autoscale replays
# (docs/autoscaling.md has the alternatives measured).
# Standard errors of its own estimate that a load trend must exceed before it is extrapolated.
TREND_SIGMAS = 3.0
# Share of the forecast arrival rate a prefill pool is sized above it: load wanders away from any
# forecast during a start-up in proportion to its size (the M/D/c model already covers Poisson arrivals).
PREFILL_HEADROOM = 0.06
# Standard deviations of the streams in flight a decode pool is sized above the forecast: their number
# is Poisson (M/G/infinity), so sqrt(streams) is their spread, large for small pools, small for large.
DECODE_SIGMAS = 1.0


@dataclass(frozen=True)
class Observation:
    """One pool's signals over the window; None where a series is absent or NaN."""

    latency: float | None  # TTFT (prefill) or ITL (decode) at the SLO percentile
    request_rate: float | None  # requests/s finishing at the router
    demand: float | None  # prompt tokens/s (prefill) or generation tokens/s (decode) at the router
    ready: int | None = None  # replicas reporting metrics
    running: float | None = None  # requests in the pool's batches, summed over replicas
    waiting: float | None = None  # requests queued at the pool's engines, summed
    kv_usage: float | None = None  # mean KV cache usage ratio of the pool's replicas
    busy: float | None = None  # step-seconds per second, summed (busy replicas)
    steps: float | None = None  # engine steps per second, summed
    tokens: float | None = None  # tokens the pool's steps computed per second, summed
    startup: float | None = None  # seconds a replica's process took to serve (its own measurement)
    upstream: float | None = None  # requests queued upstream (at prefill, for decode) bound for this pool


@dataclass(frozen=True)
class Sizing:
    """What the planner sizes for: one pool's target and the policy's timing."""

    target: float  # latency target, seconds
    percentile: float  # of the target
    horizon: float  # seconds ahead to forecast the load
    drain: float  # seconds after a replica asked for now serves, by which a queue should be drained
    max_num_seqs: int  # decode batch limit
    startups: Startups = field(default_factory=Startups)  # replicas ready and starting, start-up time


@dataclass(frozen=True)
class Plan:
    """What the planner asks for; replicas None when it cannot size the pool yet (see note)."""

    replicas: int | None
    load: float | None
    note: str
    steady: int | None = None  # replicas for the arrivals alone, without draining a queue


def ewma(previous: float | None, sample: float, rate: float = LEARN_RATE) -> float:
    return sample if previous is None else previous + rate * (sample - previous)


def has_queue(obs: Observation) -> bool:
    """More requests waiting at the pool's engines than one per ready replica: a standing queue, not
    the Poisson noise of a busy pool."""
    return (obs.waiting or 0.0) > max(obs.ready or 0, 1)


def queue_ahead(obs: Observation) -> bool:
    """A standing queue at the pool, or upstream of it (prefill's, which decode receives next)."""
    return has_queue(obs) or (obs.upstream or 0.0) > max(obs.ready or 0, 1)


def near_target(latency: float, sizing: Sizing) -> bool:
    """Whether a latency is close enough to the target to calibrate the model where it is used. Far
    below it, histogram buckets and fixed costs dominate the ratio; learning there would feed back
    (more replicas, lower latency, a larger correction, more replicas)."""
    return latency >= NEAR_TARGET * sizing.target


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def replicas_for(load: float, per_replica: float) -> int:
    """Ceil of load / per-replica capacity, tolerant to float noise (3.0000001 is 3), at least 1."""
    return max(1, math.ceil(load / per_replica - 1e-6))


@dataclass
class Forecaster:
    """Holt's linear smoothing over irregular samples: level plus trend per second, never negative.

    The trend is extrapolated only by what exceeds TREND_SIGMAS standard errors of its estimate (a soft
    threshold): a ramp is followed, while the trend of a load that merely wanders, mostly noise, is not
    multiplied by the horizon (on the diurnal bench trace that nearly doubled the forecast error).
    """

    alpha: float = 0.7  # the windowed rates it is fed are smooth already
    beta: float = 0.3
    level: float | None = None
    trend: float = 0.0
    time: float | None = None
    trend_variance: float = 0.0  # of the per-sample trend estimates around the smoothed trend

    def update(self, now: float, value: float) -> None:
        if self.level is None or self.time is None or now <= self.time:
            self.level, self.time = value, now
            return
        dt = now - self.time
        predicted = self.level + self.trend * dt
        level = self.alpha * value + (1 - self.alpha) * predicted
        deviation = (level - self.level) / dt - self.trend
        self.trend_variance += self.beta * (deviation * deviation - self.trend_variance)
        self.trend += self.beta * deviation
        self.level, self.time = level, now

    def significant_trend(self) -> float:
        """The trend less TREND_SIGMAS standard errors (an EWMA of weight beta over samples of variance v
        has variance v * beta / (2 - beta)), zero where the trend is within them."""
        error = math.sqrt(self.trend_variance * self.beta / (2 - self.beta))
        return math.copysign(max(0.0, abs(self.trend) - TREND_SIGMAS * error), self.trend)

    def forecast(self, horizon: float) -> float:
        return max(0.0, (self.level or 0.0) + self.significant_trend() * horizon)


# ---- prefill ------------------------------------------------------------------------------------


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (offered load in Erlangs), via Erlang B."""
    if offered >= servers:
        return 1.0
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    return blocking / (1 - offered / servers * (1 - blocking))


def prefill_ttft(replicas: int, arrivals: float, service: float, percentile: float) -> float:
    """TTFT percentile of a pool behind a least-loaded router, modelled as M/D/c: the service time plus
    the wait's percentile. An arrival waits with the Erlang C probability, then for an exponential time
    at the spare capacity's rate; deterministic service halves the M/M/c wait (Lee-Longton)."""
    offered = arrivals * service
    if offered >= replicas:
        return math.inf
    waits = erlang_c(replicas, offered)
    if waits <= 1 - percentile:
        return service
    return service + math.log(waits / (1 - percentile)) * service / (2 * (replicas - offered))


def replicas_for_ttft(arrivals: float, service: float, target: float, percentile: float) -> int | None:
    """Fewest replicas whose modelled TTFT percentile meets the target; None if one prompt alone misses."""
    if service >= target:
        return None
    replicas = max(1, math.floor(arrivals * service) + 1)
    while prefill_ttft(replicas, arrivals, service, percentile) > target:
        replicas += 1
    return replicas


class Planner(Protocol):
    def learn(self, obs: Observation, now: float, sizing: Sizing, settled: bool) -> None: ...

    def plan(self, obs: Observation, sizing: Sizing) -> Plan: ...


@dataclass
class PrefillPlanner:
    tokens_per_busy_second: float | None = None
    prompt_tokens: float | None = None  # per request, learned while no queue stands
    correction: float = 1.0
    demand: Forecaster = field(default_factory=Forecaster)
    queue: QueueWatch = field(default_factory=QueueWatch)

    def service_time(self) -> float | None:
        """Seconds one average prompt keeps a prefill replica busy."""
        if self.prompt_tokens is None or self.tokens_per_busy_second is None:
            return None
        return self.prompt_tokens / self.tokens_per_busy_second

    def learn(self, obs: Observation, now: float, sizing: Sizing, settled: bool) -> None:
        """Capacity from every sample; the correction only from a settled pool without a backlog, where
        the observed latency belongs to the current replicas and load (not to a queue being drained)."""
        if obs.demand is not None:
            self.demand.update(now, obs.demand)
        if obs.busy is not None and obs.tokens is not None and obs.busy >= MIN_BUSY and obs.tokens > 0:
            self.tokens_per_busy_second = ewma(self.tokens_per_busy_second, obs.tokens / obs.busy)
        # Prompt tokens per request from the router's counters; not while a queue stands, since then
        # requests finishing lag the prompts arriving and the ratio overstates a prompt.
        if obs.demand and obs.request_rate and not has_queue(obs):
            self.prompt_tokens = ewma(self.prompt_tokens, obs.demand / obs.request_rate)
        service = self.service_time()
        throughput = obs.ready / service if service and obs.ready else None
        self.queue.update(now, obs.waiting or 0.0, throughput, obs.ready or 0)
        if (
            not settled
            or service is None
            or obs.latency is None
            or not obs.request_rate
            or not obs.ready
            or has_queue(obs)
        ):
            return
        if obs.request_rate * service <= 0.95 * obs.ready and near_target(obs.latency, sizing):
            modelled = prefill_ttft(obs.ready, obs.request_rate, service, sizing.percentile)
            self.correction = clamp(ewma(self.correction, obs.latency / modelled), *CORRECTION_RANGE)

    def plan(self, obs: Observation, sizing: Sizing) -> Plan:
        capacity, service, prompt_tokens = (
            self.tokens_per_busy_second,
            self.service_time(),
            self.prompt_tokens,
        )
        if capacity is None or service is None or prompt_tokens is None or not obs.demand:
            return Plan(None, None, "prefill capacity not learned yet")
        # Arrivals: what a standing queue shows now (a step, a window before the rates do), else the
        # forecast (extrapolating the windowed rate's climb after a step would overshoot it).
        arrivals = self.queue.arrivals or self.demand.forecast(sizing.horizon) / prompt_tokens
        budget = sizing.target / self.correction
        steady = replicas_for_ttft(arrivals * (1 + PREFILL_HEADROOM), service, budget, sizing.percentile)
        if steady is None:
            return Plan(None, None, f"one prompt takes {service:.3g}s, over the TTFT budget {budget:.3g}s")
        drain, backlog = drain_replicas(
            obs.waiting or 0.0, arrivals, 1 / service, sizing.startups, sizing.drain
        )
        load = arrivals * prompt_tokens
        note = (
            f"{load:.4g} prompt tokens/s forecast (+{PREFILL_HEADROOM:.0%}), {capacity:.4g} tokens/s per "
            f"busy replica, modelled TTFT within {budget:.3g}s"
        )
        if drain > steady:
            note += f"; {drain} drain {backlog:.4g} prompts queued when new replicas serve"
            note += f" within {sizing.drain:g}s"
        return Plan(max(steady, drain), load, note, steady=steady)


# ---- decode -------------------------------------------------------------------------------------


@dataclass
class StepModel:
    """Exponentially forgetting least squares of decode step time over mean batch size."""

    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0
    largest_batch: float = 0.0
    line: tuple[float, float] | None = None  # (intercept, slope) of the last informative fit

    def add(self, batch: float, step: float) -> None:
        self.weight = FORGET * self.weight + 1
        self.sum_x = FORGET * self.sum_x + batch
        self.sum_y = FORGET * self.sum_y + step
        self.sum_xx = FORGET * self.sum_xx + batch * batch
        self.sum_xy = FORGET * self.sum_xy + batch * step
        self.largest_batch = max(batch, self.largest_batch)
        self.line = self._fit() or self.line

    def _fit(self) -> tuple[float, float] | None:
        """The line, once batch sizes have varied enough to tell the slope from the intercept.

        Without that spread (steady load) the last informative line stands: guessing a slope from
        one point would feed back on itself (more replicas, smaller batches, a steeper guess).
        """
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if variance < MIN_BATCH_VARIANCE:
            return None
        slope = (self.sum_xy / self.weight - mean_x * mean_y) / variance
        intercept = mean_y - slope * mean_x
        return (intercept, slope) if slope > 0 and intercept >= 0 else None


@dataclass
class DecodePlanner:
    steps: StepModel = field(default_factory=StepModel)
    correction: float = 1.0
    demand: Forecaster = field(default_factory=Forecaster)
    queue: QueueWatch = field(default_factory=QueueWatch)

    def learn(self, obs: Observation, now: float, sizing: Sizing, settled: bool) -> None:
        """Step times from every sample; the correction (ITL percentile over modelled step) only from a
        settled pool where no stream waits for a slot (a wait is one long gap, not a slow step)."""
        if obs.demand is not None:
            self.demand.update(now, obs.demand)
        # The queue ahead of decode: streams waiting for a slot and prompts still queued at prefill.
        queued = (obs.waiting or 0.0) + (obs.upstream or 0.0)
        self.queue.update(now, queued, obs.request_rate, obs.ready or 0)
        if not obs.steps or obs.busy is None or obs.tokens is None or obs.tokens <= 0:
            return
        batch, step = obs.tokens / obs.steps, obs.busy / obs.steps
        if batch < 0.5 or step <= 0:
            return
        self.steps.add(batch, step)
        line, ready = self.steps.line, obs.ready or 1
        if (
            settled
            and line is not None
            and obs.latency is not None
            and not obs.waiting
            and near_target(obs.latency, sizing)
        ):
            # The window's mean batch is a sample: over `ready` replicas holding Poisson streams it has a
            # spread of sqrt(batch / ready). Calibrating against the step one spread above it leaves the
            # pool-level spread to the planner's DECODE_SIGMAS margin instead of counting it twice.
            modelled = line[0] + line[1] * (batch + math.sqrt(batch / ready))
            self.correction = clamp(ewma(self.correction, obs.latency / modelled), *CORRECTION_RANGE)

    def plan(self, obs: Observation, sizing: Sizing) -> Plan:
        if self.steps.line is None:
            return Plan(None, None, "decode step time over batch size not learned yet")
        intercept, slope = self.steps.line
        step_budget = sizing.target / self.correction
        if step_budget <= intercept:
            return Plan(None, None, f"a decode step takes >= {intercept:.3g}s, over the ITL target")
        limits = {
            "ITL target": (step_budget - intercept) / slope,
            "maxNumSeqs": float(sizing.max_num_seqs),
            "extrapolation": 2 * self.steps.largest_batch,
        }
        if obs.kv_usage and obs.kv_usage > 0.05 and obs.running and obs.ready:
            limits["KV cache"] = KV_HEADROOM * obs.running / obs.ready / obs.kv_usage
        bound, batch = min(limits.items(), key=lambda item: item[1])
        if batch < 1:
            return Plan(None, None, f"{bound} allows less than one stream per replica")
        # Streams in flight = token rate x seconds per token (Little's law), at the arrivals a standing
        # queue shows, else at the forecast; the queue drains at the same per-stream pace.
        output_tokens = (obs.demand or 0.0) / obs.request_rate if obs.request_rate else 0.0
        step = intercept + slope * batch
        token_rate = self.demand.forecast(sizing.horizon)
        if self.queue.arrivals is not None and output_tokens > 0:
            token_rate = self.queue.arrivals * output_tokens
        streams = token_rate * step
        spread = DECODE_SIGMAS * math.sqrt(streams)
        steady = replicas_for(streams + spread, batch)
        note = f"{streams:.4g} streams forecast (+{spread:.3g}), {batch:.3g} per replica ({bound})"
        if output_tokens <= 0:
            return Plan(steady, streams, note, steady=steady)
        queued = (obs.waiting or 0.0) + (obs.upstream or 0.0)
        per_replica = batch / (output_tokens * step)  # requests/s one replica completes at that batch
        drain, backlog = drain_replicas(
            queued, token_rate / output_tokens, per_replica, sizing.startups, sizing.drain
        )
        if drain > steady:
            note += f"; {drain} drain {backlog:.4g} requests queued when new replicas serve"
            note += f" within {sizing.drain:g}s"
        return Plan(max(steady, drain), streams, note, steady=steady)
