"""Load traces: mean request rate per second of simulated time, deterministic for a given seed.

Arrivals are drawn around these means by the simulator (Poisson), so traces stay smooth and readable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

DAY = 86_400


@dataclass(frozen=True)
class Trace:
    name: str
    rate: NDArray[np.float64]  # requests/s, one entry per simulated second
    step_at: int | None = None  # when a step happens, for the reaction-time check

    @property
    def duration(self) -> int:
        return len(self.rate)


def step(peak: float, rng: np.random.Generator) -> Trace:
    """30 % of peak for 10 minutes, then peak for 20 minutes."""
    rate = np.full(1800, 0.3 * peak)
    rate[600:] = peak
    return Trace("step", rate, step_at=600)


def ramp(peak: float, rng: np.random.Generator) -> Trace:
    """10 % -> peak over 20 minutes, 5 minutes at peak, back down over 20 minutes."""
    up = np.linspace(0.1 * peak, peak, 1200)
    return Trace("ramp", np.concatenate([np.full(300, 0.1 * peak), up, np.full(300, peak), up[::-1]]))


def diurnal(peak: float, rng: np.random.Generator) -> Trace:
    """One day: a trough of 10 % of peak at 04:00, the peak at 16:00, with slow +-5 % wander."""
    t = np.arange(DAY, dtype=np.float64)
    shape = 0.55 - 0.45 * np.cos(2 * np.pi * (t - 4 * 3600) / DAY)
    wander = smooth_noise(rng, DAY, correlation_seconds=600, scale=0.05)
    return Trace("diurnal", peak * np.clip(shape * (1 + wander), 0.0, 1.0))


def burst(peak: float, rng: np.random.Generator) -> Trace:
    """An hour at 35 % of peak with eight bursts to peak lasting 1-3 minutes, at random times."""
    rate = np.full(3600, 0.35 * peak)
    for start in np.sort(rng.choice(np.arange(120, 3300, 60), size=8, replace=False)):
        rate[start : start + int(rng.integers(60, 181))] = peak
    return Trace("burst", rate)


def smooth_noise(
    rng: np.random.Generator, length: int, correlation_seconds: float, scale: float
) -> NDArray[np.float64]:
    """AR(1) noise with the given correlation time and standard deviation."""
    keep = np.exp(-1 / correlation_seconds)
    kicks = rng.normal(0.0, scale * np.sqrt(1 - keep**2), length)
    out = np.empty(length)
    level = 0.0
    for i, kick in enumerate(kicks):
        level = keep * level + kick
        out[i] = level
    return out


TRACES: dict[str, Callable[[float, np.random.Generator], Trace]] = {
    "step": step,
    "ramp": ramp,
    "diurnal": diurnal,
    "burst": burst,
}
