"""A hostile client against the real stack: the router's and `both`'s OpenAI API, and the workers'
internal prefill/decode API, fuzzed with hypothesis. Two invariants, per example:

- no answer is a 5xx (neither a status nor an error event inside a stream): bad input is the
  client's error, and whatever is admitted runs;
- a valid greedy request sent beside the fuzzed ones completes with exactly `generate()`'s tokens.

Examples are few and small (the tiny model, a 256-token window) so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from splitserve.engine.params import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from splitserve.serving.internal_api import CACHED_TOKENS_HEADER, KV_PORT_HEADER
from tests.conftest import Reference, random_prompt
from tests.worker.serving.live_stack import MODEL, LiveStack

pytestmark = pytest.mark.slow
FUZZ = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, CI time is stable
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# The valid request beside the fuzzed ones: EOS masked (min_tokens) as generate()'s min_new_tokens.
GREEDY_PROMPT = random_prompt(12, seed=1)
GREEDY_TOKENS = 12

_EDGY_INTS = [-(2**70), -5000, -1, 0, 345, 346, 2**31, 2**63, 2**64, 2**70]
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
)
ints = st.integers(-2, 8) | st.sampled_from(_EDGY_INTS)
valid_ids = st.lists(st.integers(4, 300), min_size=1, max_size=8)
token_ids = st.lists(st.integers(4, 300) | st.sampled_from(_EDGY_INTS), max_size=6)
stops = (
    st.text(max_size=3)
    | st.lists(st.text(max_size=3), max_size=MAX_STOP_STRINGS + 2)
    | st.just("x" * (MAX_STOP_CHARS + 1))
    | st.just("y" * 200_000)  # ~200 KB: refused by the limit, not by a body size downstream
)

# Requests are valid but for one to three hostile fields, so most of them get past parsing and
# reach the engine: what the 502s needed (an id outside the vocabulary while min_tokens
# masks, a temperature that overflows). Each fragment is one hostile change.
SAMPLING_FRAGMENTS = {
    "temperature": st.fixed_dictionaries(
        {"temperature": st.sampled_from([0, 1e-45, 5e-324, 1e-38, 1e-4, 1e-3, 0.7, 2, 100, 101, -1, "1"])},
        optional={"seed": ints},
    ),
    "top_p": st.fixed_dictionaries(
        {"top_p": st.sampled_from([0, 1e-300, 0.5, 1, 1.5]), "temperature": st.sampled_from([0.5, 1e-3])}
    ),
    "top_k": st.fixed_dictionaries({"top_k": ints, "temperature": st.just(1.0)}),
    "seed": st.fixed_dictionaries({"seed": ints, "temperature": st.just(1.0)}),
    "lengths": st.fixed_dictionaries({"max_tokens": ints, "min_tokens": ints}),
    "ignore_eos": st.fixed_dictionaries({"ignore_eos": st.booleans() | junk}),
    "stop": st.fixed_dictionaries({"stop": stops | junk}),
    "stop_token_ids": st.fixed_dictionaries(
        {
            "stop_token_ids": token_ids | st.just(list(range(MAX_STOP_TOKEN_IDS + 1))) | junk,
            "min_tokens": st.integers(0, 4),
        }
    ),
}
OPENAI_FRAGMENTS = {
    **SAMPLING_FRAGMENTS,
    "model": st.fixed_dictionaries({"model": st.sampled_from(["other", ""]) | junk}),
    "n": st.fixed_dictionaries({"n": ints | junk}, optional={"best_of": ints}),
    "logit_bias": st.fixed_dictionaries(
        {"logit_bias": st.dictionaries(st.sampled_from(["5", "-1", "x"]), st.floats(-200, 200), max_size=2)}
    ),
    "stream": st.fixed_dictionaries(
        {"stream": st.booleans()},
        optional={
            "stream_options": st.just({"include_usage": True}) | junk,
            "return_token_ids": st.booleans(),
        },
    ),
    "unsupported": st.fixed_dictionaries(
        {"logprobs": st.booleans() | junk, "presence_penalty": st.just(1.5)}
    ),
    "surprise": st.fixed_dictionaries({"surprise": junk}),
    "prompt": st.fixed_dictionaries(
        {"prompt": st.text(max_size=30) | token_ids | st.lists(token_ids, max_size=3) | junk}
    ),
    "messages": st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "tool", ""]),
                        "content": st.text(max_size=30) | junk,
                    }
                ),
                max_size=3,
            )
        }
    ),
}


def hostile(base: st.SearchStrategy[dict[str, Any]], fragments: dict[str, st.SearchStrategy[Any]]) -> Any:
    """A valid `base` with one to three of `fragments` merged over it."""
    chosen = st.lists(st.sampled_from(sorted(fragments)), min_size=1, max_size=3, unique=True)
    changes = chosen.flatmap(lambda names: st.tuples(*(fragments[name] for name in names)))
    return st.tuples(base, changes).map(
        lambda pair: {k: v for part in (pair[0], *pair[1]) for k, v in part.items()}
    )


small = st.integers(1, 6)
completion = hostile(
    st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": st.text(min_size=1, max_size=20) | valid_ids, "max_tokens": small}
    ),
    {name: fragment for name, fragment in OPENAI_FRAGMENTS.items() if name != "messages"},
)
chat = hostile(
    st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "messages": st.just([{"role": "user", "content": "hi"}]),
            "max_tokens": small,
        }
    ),
    {name: fragment for name, fragment in OPENAI_FRAGMENTS.items() if name != "prompt"},
)
openai_calls = st.lists(
    st.tuples(st.just("/v1/completions"), completion) | st.tuples(st.just("/v1/chat/completions"), chat),
    min_size=1,
    max_size=4,
)


def _internal(call: dict[str, Any]) -> dict[str, Any]:
    """Sampling fields moved into `sampling`, as the internal API nests them."""
    top = {"request_id", "prompt_token_ids", "surprise"}
    return {
        **{k: v for k, v in call.items() if k in top},
        "sampling": {k: v for k, v in call.items() if k not in top},
    }


internal_calls = st.lists(
    hostile(
        st.fixed_dictionaries(
            {"request_id": st.just("r"), "prompt_token_ids": valid_ids, "max_tokens": small}
        ),
        {
            **SAMPLING_FRAGMENTS,
            "prompt": st.fixed_dictionaries({"prompt_token_ids": token_ids | junk}),
            "request_id": st.fixed_dictionaries({"request_id": st.text(max_size=140)}),
            "surprise": st.fixed_dictionaries({"surprise": junk}),
        },
    ).map(_internal),
    min_size=1,
    max_size=3,
)


# The attacks that got 502s before (issue 16), each in every example run, whatever hypothesis draws.
ATTACKS: list[dict[str, Any]] = [
    {"temperature": 1e-45, "max_tokens": 4},
    {"temperature": 5e-324, "max_tokens": 4, "seed": 3},
    {"stop_token_ids": [346], "min_tokens": 2, "max_tokens": 4},
    {"stop_token_ids": [-5000], "min_tokens": 2, "max_tokens": 4},
    {"stop_token_ids": [2**70], "min_tokens": 2, "max_tokens": 4},
    {"stop": "y" * 200_000, "max_tokens": 4},
]
BASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.fixture(scope="module")
def stack(tiny_model: Path) -> Iterator[LiveStack]:
    with LiveStack(tiny_model).serving() as live:
        yield live


@pytest.fixture(scope="module")
def expected(reference: Reference) -> list[int]:
    return reference.greedy(GREEDY_PROMPT, GREEDY_TOKENS, ignore_eos=True)


def _no_server_error(status: int, body: bytes, what: object) -> None:
    """A status under 500, and no error event of a 5xx inside an SSE body."""
    assert status < 500, (status, body[:300], what)
    for line in body.splitlines():
        if line.startswith(b"data: {") and b'"error"' in line:
            code = json.loads(line[6:])["error"].get("code")
            assert not (isinstance(code, int) and code >= 500), (line[:300], what)


async def _post(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as reply:
        return reply.status, await reply.read()


async def _greedy_via_openai(session: aiohttp.ClientSession, url: str) -> list[int]:
    body = {
        "model": MODEL,
        "prompt": GREEDY_PROMPT,
        "max_tokens": GREEDY_TOKENS,
        "min_tokens": GREEDY_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    status, reply = await _post(session, url + "/v1/completions", body)
    assert status == 200, reply
    return list(json.loads(reply)["choices"][0]["token_ids"])


@pytest.mark.parametrize("target", ["router", "both"])
def test_openai_api_fuzz(stack: LiveStack, expected: list[int], target: str) -> None:
    url = stack.urls[target]

    @FUZZ
    @given(calls=openai_calls)
    @example(calls=[(path, {**base, **attack}) for path, base in BASES for attack in ATTACKS])
    def run(calls: list[tuple[str, dict[str, Any]]]) -> None:
        async def exchange() -> list[int]:
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                greedy = asyncio.ensure_future(_greedy_via_openai(session, url))
                replies = await asyncio.gather(*(_post(session, url + path, body) for path, body in calls))
                for (status, reply), call in zip(replies, calls, strict=True):
                    _no_server_error(status, reply, call)
                return await greedy

        assert asyncio.run(exchange()) == expected

    run()


async def _internal_call(
    session: aiohttp.ClientSession, stack: LiveStack, call: dict[str, Any]
) -> list[int] | None:
    """What the router does: register with decode, prefill into its KV port, read the stream.

    Every answer must be under 500; returns the streamed tokens when both workers accepted the call.
    """
    prompt = call.get("prompt_token_ids")
    registration = {
        "request_id": call["request_id"],
        "prompt_token_ids": prompt,
        "sampling": call.get("sampling", {}),
        **({"surprise": call["surprise"]} if "surprise" in call else {}),
    }
    decode = await session.post(stack.urls["decode"] + "/internal/decode", json=registration)
    try:
        if decode.status != 200:
            _no_server_error(decode.status, await decode.read(), registration)
            return None
        kv_port = int(decode.headers[KV_PORT_HEADER])
        held = int(decode.headers[CACHED_TOKENS_HEADER])  # its cached prefix: not sent again
        prefill_body = {**call, "kv_target": f"127.0.0.1:{kv_port}", "skip_tokens": held}
        status, reply = await _post(session, stack.urls["prefill"] + "/internal/prefill", prefill_body)
        _no_server_error(status, reply, prefill_body)
        if status != 200:
            return None  # closing the registration aborts it
        tokens: list[int] = []
        async for line in decode.content:
            data = json.loads(line)
            assert "error" not in data or int(data["error"]["code"]) < 500, (data, call)
            tokens += data.get("token_ids", [])
        return tokens
    finally:
        decode.close()


def test_internal_api_fuzz(stack: LiveStack, expected: list[int]) -> None:
    sampling = {"temperature": 0.0, "max_tokens": GREEDY_TOKENS, "min_tokens": GREEDY_TOKENS}
    examples = iter(range(10**6))

    @FUZZ
    @given(calls=internal_calls)
    @example(
        calls=[
            _internal({"request_id": rid, "prompt_token_ids": [5, 6], **attack})
            for rid, attack in [("r", attack) for attack in ATTACKS]
            + [(rid, {"max_tokens": 2}) for rid in ("é" * 100, "\ud800", "a b")]
        ]
    )
    def run(calls: list[dict[str, Any]]) -> None:
        number = next(examples)  # request ids unique across examples: no clash with one still closing

        async def exchange() -> list[int] | None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                valid = {
                    "request_id": f"greedy{number}",
                    "prompt_token_ids": GREEDY_PROMPT,
                    "sampling": sampling,
                }
                results = await asyncio.gather(
                    _internal_call(session, stack, valid),
                    *(
                        _internal_call(
                            session, stack, {**call, "request_id": f"{number}.{i}{call['request_id']}"}
                        )
                        for i, call in enumerate(calls)
                    ),
                )
                return results[0]

        assert asyncio.run(exchange()) == expected

    run()


def test_internal_apis_take_what_the_router_admits(stack: LiveStack) -> None:
    """Over aiohttp's 1 MiB default: a refusal for its content (400 naming the field), never a 413."""
    body = {
        "request_id": "big",
        "prompt_token_ids": [100_000] * 200_000,  # 1.6 MB of JSON
        "sampling": {"max_tokens": 1},
        "kv_target": "127.0.0.1:1",
    }

    async def post() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            status, reply = await _post(session, stack.urls["prefill"] + "/internal/prefill", body)
            return status, json.loads(reply)

    status, reply = asyncio.run(post())
    assert status == 400 and reply["error"]["param"] == "prompt", reply
