"""Conditional disaggregation, the decision: where a decode worker's newly registered prompt is prefilled.

Pure logic (no torch, no I/O), so the rule is tested on its own; the runtime applies it at registration
(`EngineRuntime.register`), after pinning the prompt's cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.contract.names import PrefillPlacement


@dataclass(frozen=True)
class Placement:
    """What a decode registration decided: `cached` leading prompt tokens are held (pinned) here, and
    where the prompt is prefilled (local: by this worker's engine; remote: a prefill worker sends the
    KV of tokens `cached..`)."""

    cached: int
    prefill: PrefillPlacement


def choose_placement(
    prompt_len: int, cached: int, local_max_tokens: int, remote_available: bool
) -> PrefillPlacement:
    """A short uncached rest costs less to compute here, between decode steps, than a handoff
    (bench/results/conditional.json); with no prefill worker available every prompt stays here."""
    if not remote_available or prompt_len - cached <= local_max_tokens:
        return "local"
    return "remote"
