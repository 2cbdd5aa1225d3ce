"""Streams that survive a dead decode worker: what the router resubmits, and where.

When a decode worker dies after a stream's first token (its connection resets, or its stream ends
without a finish), the client has already seen part of the answer. Like Dynamo's `--migration-limit`,
the router then sends prompt + every token produced so far to another decode worker as a new prompt,
asks only for what is left, and relays the continuation into the same client stream: the client sees
no seam. Greedy output is that of an undisturbed run (the new worker recomputes the same prefix and
takes the same argmax); a seeded sampled stream continues with fresh randomness, as it would after a
preemption. Stop strings are matched by the frontend on the text of the whole stream and stop ids by
the worker on every new token, so both work across the seam; the client's usage counts the original
prompt, which the frontend knows, not the resubmitted one.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.params import GenerationError, GenerationRequest

MAX_ID_STEM = 100  # of the client's request id; room for ".moved<N>" and a retry's suffix within 128


class StreamLostError(GenerationError):
    """A decode worker's stream broke after its first token: the request may move to another worker."""

    def __init__(self, message: str, *, worker: str) -> None:
        super().__init__(message, status=502)
        self.worker = worker


def resumed_request(original: GenerationRequest, produced: Sequence[int], moves: int) -> GenerationRequest:
    """The request that continues `original` after `produced` tokens, on its `moves`-th worker change.

    The token budget is what is left of max_tokens (at least one: a stream that had them all would have
    finished), and min_tokens shrinks by as many, so EOS is masked exactly as long as it would have been.
    """
    sampling = original.sampling
    done = len(produced)
    if done >= sampling.max_tokens:
        raise ValueError(f"{done} tokens produced of {sampling.max_tokens}: nothing to resume")
    return GenerationRequest(
        request_id=f"{original.request_id[:MAX_ID_STEM]}.moved{moves}",
        prompt_token_ids=(*original.prompt_token_ids, *produced),
        sampling=sampling.model_copy(
            update={
                "max_tokens": sampling.max_tokens - done,
                "min_tokens": max(0, sampling.min_tokens - done),
            },
        ),
    )
