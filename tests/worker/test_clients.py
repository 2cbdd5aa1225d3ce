"""The request bodies guidellm, aiperf and inference-perf send, replayed against the router and `both`.

The bodies are data (tests/worker/data/client_requests.json): aiperf's and inference-perf's captured
from their runs in `bench/clients.py`, guidellm's written down from its 0.8.1 source (it is not
installed: it pulls CUDA torch). Each is sent as the client sends it, streamed and not, to a real
router with prefill and decode workers and to a real `both` worker; then once more greedy
(temperature 0 added), where the text must be transformers' `generate()` on the same prompt.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from splitserve.local.pool import LocalPool, LocalProcess, free_port, splitserve_argv
from tests.conftest import Reference, subprocess_env
from tests.worker.test_e2e import start_pool

pytestmark = pytest.mark.slow
DATA = json.loads((Path(__file__).parent / "data" / "client_requests.json").read_text())
CASES = [
    pytest.param(case, id=f"{case['client']}-{case['endpoint']}-{case['mode']}") for case in DATA["requests"]
]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@pytest.fixture(scope="module")
def targets(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Base URLs: the router of a prefill+decode pool, and a colocated `both` worker."""
    workdir = tmp_path_factory.mktemp("clients")
    pool: LocalPool = start_pool(tiny_model, workdir, prefill=1, decode=1)
    port = free_port()
    argv = splitserve_argv("worker", "--role", "both", "--model", str(tiny_model), "--port", str(port))
    argv += ["--served-model-name", "tiny", "--max-model-len", "2048", "--threads", "1"]
    both = LocalProcess("both", port, argv, workdir / "both.log", env=subprocess_env())
    both.start()
    try:

        async def ready() -> None:
            async with aiohttp.ClientSession() as session:
                await both.wait_ready(session)

        asyncio.run(ready())
        yield {"router": pool.url, "both": both.url}
    finally:
        both.stop()
        asyncio.run(pool.stop())


async def post(url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as reply:
        return reply.status, reply.content_type, await reply.read()


def requested_tokens(body: dict[str, Any]) -> int:
    return int(body.get("max_completion_tokens") or body["max_tokens"])


def answer(endpoint: str, streamed: bool, body: dict[str, Any], raw: bytes) -> tuple[str, int]:
    """(text, completion tokens) of a reply, checking its shape the way these clients read it."""
    if not streamed:
        reply = json.loads(raw)
        (choice,) = reply["choices"]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        return text, reply["usage"]["completion_tokens"]
    events = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line.strip()]
    assert events[-1] == b"[DONE]"
    *content, last = [json.loads(event) for event in events[:-1]]
    assert last["choices"] == []  # all three ask for include_usage: the count comes last
    pieces = [_piece(endpoint, chunk["choices"][0]) for chunk in content]
    if body["stream_options"].get("continuous_usage_stats"):  # guidellm: usage on every chunk
        counts = [chunk["usage"]["completion_tokens"] for chunk in content]
        assert counts == sorted(counts) and counts[-1] == requested_tokens(body)
    return "".join(pieces), last["usage"]["completion_tokens"]


def _piece(endpoint: str, choice: dict[str, Any]) -> str:
    return str(choice["delta"].get("content") or "") if endpoint == "chat" else str(choice["text"])


def prompt_ids(tokenizer: PreTrainedTokenizerBase, endpoint: str, body: dict[str, Any]) -> list[int]:
    if endpoint == "completions":
        return list(tokenizer.encode(body["prompt"]))
    messages = [{"role": m["role"], "content": _text(m["content"])} for m in body["messages"]]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def _text(content: str | list[dict[str, str]]) -> str:
    """guidellm sends content as a list of text parts."""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def greedy(reference: Reference, prompt: list[int], length: int, *, masked_eos: bool) -> list[int]:
    """`generate()`'s greedy tokens as ignore_eos gives them: with min_tokens covering the whole
    length, EOS is masked (min_new_tokens); without, EOS may be chosen and generation goes on."""
    if masked_eos:
        return reference.greedy(prompt, length, ignore_eos=True)
    with torch.inference_mode():
        out = reference.model.generate(
            torch.tensor([prompt]), max_new_tokens=length, do_sample=False, eos_token_id=[], pad_token_id=0
        )
    return [int(token) for token in out[0, len(prompt) :]]


@pytest.mark.parametrize("target", ["router", "both"])
@pytest.mark.parametrize("case", CASES)
def test_client_requests_are_answered(
    targets: dict[str, str],
    reference: Reference,
    tokenizer: PreTrainedTokenizerBase,
    case: dict[str, Any],
    target: str,
) -> None:
    body, endpoint = case["body"], case["endpoint"]
    streamed = bool(body.get("stream"))
    url = targets[target] + PATHS[endpoint]
    status, content_type, raw = asyncio.run(post(url, body))
    assert status == 200, raw.decode()
    assert content_type == ("text/event-stream" if streamed else "application/json")
    _, tokens = answer(endpoint, streamed, body, raw)
    assert tokens == requested_tokens(body)  # ignore_eos: every client asks for a fixed length
    greedy_body = {**body, "temperature": 0}
    status, _, raw = asyncio.run(post(url, greedy_body))
    assert status == 200, raw.decode()
    prompt, length = prompt_ids(tokenizer, endpoint, body), requested_tokens(body)
    expected = greedy(reference, prompt, length, masked_eos=body.get("min_tokens", 0) >= length)
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert answer(endpoint, streamed, greedy_body, raw) == (text, len(expected))
