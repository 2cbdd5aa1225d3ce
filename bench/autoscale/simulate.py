"""A one-second-step model of a prefill pool and a decode pool under a load trace.

"Reality" here is a queueing model built on the measured capacity (capacity.py), deliberately not the
planner's own model:
- prefill: a least-loaded router in front of c replicas is an M/G/c queue. A request's TTFT = its own
  prefill time (log-normal prompt lengths) + its wait (with the Erlang C probability, an exponential
  wait whose rate is the spare capacity, scaled by the Lee-Longton M/G/c factor) + the time to drain
  any backlog that overload left behind.
- decode: streams are spread evenly over the replicas, each stepping continuously; step time is the
  measured line over batch size. An inter-token gap is one step at the replica's momentary batch
  (Poisson-like fluctuation around the mean); streams beyond maxNumSeqs per replica wait for a slot,
  and that wait is one long gap.
- replicas that are added serve only after a start-up delay; removed replicas stop at once.

Every second, SAMPLES requests' TTFTs and gaps are drawn from those distributions (each standing for its
share of the second's requests or tokens). Attainment takes exact quantiles of them; the policies see
what Prometheus would report: histogram_quantile over the worker's real bucket edges, summed over the
window, plus the counters and gauges signals.py reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from bench.autoscale.capacity import Capacity
from splitserve.contract.names import ITL_BUCKETS, TTFT_BUCKETS
from splitserve_operator.autoscaling.planner import erlang_c
from splitserve_operator.autoscaling.scrape import histogram_quantile
from splitserve_operator.autoscaling.signals import PoolSignals, SignalQuery, WorkerSignals

SAMPLES = 16  # latency samples per simulated second
TIMEOUT = 60.0  # what a client sees when no replica serves at all


@dataclass(frozen=True)
class Workload:
    prompt_tokens: float = 256.0  # mean
    prompt_cv: float = 0.5  # coefficient of variation (log-normal)
    output_tokens: float = 128.0


@dataclass
class Pool:
    """Replicas of one Deployment: each serves from its ready time on."""

    ready_at: list[float] = field(default_factory=list)

    def ready(self, now: float) -> int:
        return sum(1 for at in self.ready_at if at <= now)

    @property
    def replicas(self) -> int:
        return len(self.ready_at)

    def scale_to(self, replicas: int, now: float, startup: float) -> None:
        if replicas > self.replicas:
            self.ready_at += [now + startup] * (replicas - self.replicas)
        else:  # newest (maybe still starting) go first
            self.ready_at = sorted(self.ready_at)[:replicas]


RECORDS = (
    "arrivals",
    "served",
    "prefill_busy",
    "prefill_waiting",
    "tokens",
    "steps",
    "decode_busy",
    "streams",
    "decode_waiting",
    "finished",
    "ready_p",
    "ready_d",
    "replicas_p",
    "replicas_d",
    "kv_usage",
)


class Simulation:
    """Per-second state and records of both pools; `tick` advances one second."""

    def __init__(self, capacity: Capacity, workload: Workload, rates: NDArray[np.float64], seed: int) -> None:
        self.cap, self.work, self.rates = capacity, workload, rates
        self.rng = np.random.default_rng(seed)
        self.prefill, self.decode = Pool(), Pool()
        self.backlog = 0.0  # prompts queued beyond what the prefill pool drains
        self.waiting = 0.0  # streams waiting for a decode slot
        self.rec = {name: np.zeros(len(rates)) for name in RECORDS}
        self.ttft = np.zeros((len(rates), SAMPLES))
        self.itl = np.zeros((len(rates), SAMPLES))
        self.now = 0
        self.service = capacity.prefill_seconds(workload.prompt_tokens)
        spread = capacity.prefill_per_token * workload.prompt_tokens * workload.prompt_cv
        self.service_cs2 = (spread / self.service) ** 2
        self.sigma = math.sqrt(math.log1p(workload.prompt_cv**2))

    # ---- the plant ----------------------------------------------------------------------------

    def ttft_samples(self, ready: int, rate: float, backlog: float, size: int) -> NDArray[np.float64]:
        if ready == 0:
            return np.full(size, TIMEOUT)
        prompts = self.work.prompt_tokens * self.rng.lognormal(-(self.sigma**2) / 2, self.sigma, size)
        offered = min(rate * self.service, 0.98 * ready)  # beyond this the backlog term takes over
        spare = (ready - offered) / self.service  # requests/s of capacity left over
        scale = (1 + self.service_cs2) / 2 / spare
        waited = self.rng.random(size) < erlang_c(ready, offered)
        waits = np.where(waited, self.rng.exponential(scale, size), 0.0)
        return self.cap.prefill_seconds(prompts) + waits + backlog * self.service / ready

    def decode_capacity(self, ready: int) -> float:
        """Streams per second a decode pool completes with every batch full."""
        full = self.cap.max_num_seqs
        return ready * full / (self.work.output_tokens * self.cap.step_seconds(full))

    def decode_batch(self, ready: int, started: float) -> float:
        """Mean batch per replica when `started` streams/s flow through: the fixed point of
        b = (started / ready) * OSL * step(b) (Little's law), at most maxNumSeqs."""
        if ready == 0 or started <= 0:
            return 0.0
        per_replica = started / ready * self.work.output_tokens
        denominator = 1 - per_replica * self.cap.decode_per_seq
        full = float(self.cap.max_num_seqs)
        return full if denominator <= 0 else min(full, per_replica * self.cap.decode_base / denominator)

    def itl_samples(
        self, ready: int, batch: float, waiting: float, tokens: float, size: int
    ) -> NDArray[np.float64]:
        if ready == 0:
            return np.full(size, TIMEOUT)
        batches = np.clip(self.rng.normal(batch, math.sqrt(max(batch, 1.0)), size), 1, self.cap.max_num_seqs)
        gaps = self.cap.step_seconds(batches)
        if waiting > 0:  # a stream waiting for a slot sees one long gap after its first token
            stalled = self.rng.random(size) < waiting / (waiting + tokens)
            gaps = np.where(stalled, waiting / self.decode_capacity(ready), gaps)
        return gaps

    def tick(self) -> None:
        t, cap, work = self.now, self.cap, self.work
        ready_p, ready_d = self.prefill.ready(t), self.decode.ready(t)
        arrivals = float(self.rng.poisson(self.rates[t]))
        self.backlog += arrivals
        served = min(self.backlog, ready_p / self.service)
        self.backlog -= served
        self.ttft[t] = self.ttft_samples(ready_p, arrivals, self.backlog, SAMPLES)

        # Streams last OSL x step (well under a second here), so each second is close to steady state;
        # what the pool cannot start waits for the next second.
        demand = self.waiting + served
        started = min(demand, self.decode_capacity(ready_d))
        self.waiting = demand - started
        batch = self.decode_batch(ready_d, started)
        streams, tokens = batch * ready_d, started * work.output_tokens
        self.itl[t] = self.itl_samples(ready_d, batch, self.waiting, tokens, SAMPLES)
        active = min(ready_d, math.ceil(streams))
        context = work.prompt_tokens + work.output_tokens / 2
        self._record(
            arrivals=arrivals,
            served=served,
            prefill_busy=served * self.service,
            prefill_waiting=self.backlog,
            tokens=tokens,
            steps=active / cap.step_seconds(batch),
            decode_busy=active,
            streams=streams,
            decode_waiting=self.waiting,
            finished=started,
            ready_p=ready_p,
            ready_d=ready_d,
            replicas_p=self.prefill.replicas,
            replicas_d=self.decode.replicas,
            kv_usage=streams * context / (ready_d * cap.kv_capacity_tokens) if ready_d else 0.0,
        )
        self.now += 1

    def _record(self, **values: float) -> None:
        for name, value in values.items():
            self.rec[name][self.now] = value

    # ---- what Prometheus would report -----------------------------------------------------------

    def signals(self, query: SignalQuery) -> PoolSignals:
        """The window's signals, aggregated the way the PromQL in signals.py aggregates them."""
        lo, hi = max(0, self.now - int(query.window_seconds)), self.now
        span = float(hi - lo)
        if span < 2:
            return PoolSignals()
        r = {name: values[lo:hi] for name, values in self.rec.items()}

        def rate(name: str) -> float:
            return float(r[name].sum() / span)

        def mean(name: str) -> float:
            return float(r[name].mean())

        return PoolSignals(
            ttft=bucketed_quantile(self.ttft[lo:hi], r["arrivals"], TTFT_BUCKETS, query.ttft_percentile),
            itl=bucketed_quantile(self.itl[lo:hi], r["tokens"], ITL_BUCKETS, query.itl_percentile),
            request_rate=rate("finished"),
            prompt_token_rate=rate("arrivals") * self.work.prompt_tokens,
            generation_token_rate=rate("tokens"),
            prefill=WorkerSignals(
                replicas=float(r["ready_p"][-1]),
                running=rate("prefill_busy"),
                waiting=float(r["prefill_waiting"][-1]),
                kv_usage=None,
                busy=rate("prefill_busy"),
                steps=rate("served"),
                tokens=rate("served") * self.work.prompt_tokens,
            ),
            decode=WorkerSignals(
                replicas=float(r["ready_d"][-1]),
                running=mean("streams"),
                waiting=float(r["decode_waiting"][-1]),
                kv_usage=mean("kv_usage"),
                busy=rate("decode_busy"),
                steps=rate("steps"),
                tokens=rate("tokens"),
            ),
        )


def _flatten(
    samples: NDArray[np.float64], weights: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each second's samples, each standing for 1/SAMPLES of that second's weight."""
    return samples.ravel(), np.repeat(weights / samples.shape[1], samples.shape[1])


def bucketed_quantile(
    samples: NDArray[np.float64], weights: NDArray[np.float64], edges: tuple[float, ...], q: float
) -> float | None:
    """What histogram_quantile over the summed bucket counters would say."""
    values, w = _flatten(samples, weights)
    if w.sum() <= 0:
        return None
    counts, _ = np.histogram(values, bins=[-np.inf, *edges, np.inf], weights=w)
    cumulative = np.cumsum(counts)
    result = histogram_quantile(q, list(zip([*edges, math.inf], cumulative.tolist(), strict=True)))
    return None if math.isnan(result) else result


def weighted_quantile(samples: NDArray[np.float64], weights: NDArray[np.float64], q: float) -> float | None:
    """The exact q-quantile of the requests (or tokens) the samples stand for."""
    values, w = _flatten(samples, weights)
    total = float(w.sum())
    if total <= 0:
        return None
    order = np.argsort(values)
    cumulative = np.cumsum(w[order])
    index = min(int(np.searchsorted(cumulative, q * total)), len(values) - 1)
    return float(values[order][index])
