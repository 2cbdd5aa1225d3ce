"""The OpenAI frontend over a `ScriptedBackend` (scripted_backend.py), served on loopback."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.serving.frontend import build_openai_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve
from tests.worker.serving.router_harness import start_router  # noqa: F401 (a fixture for the router tests)
from tests.worker.serving.scripted_backend import (
    MAX_BODY,
    MAX_MODEL_LEN,
    MODEL,
    ScriptedBackend,
    Server,
)


@pytest.fixture
def backend(tokenizer: PreTrainedTokenizerBase) -> ScriptedBackend:
    return ScriptedBackend(tokenizer)


@pytest.fixture
async def server(serve: Serve, backend: ScriptedBackend, tokenizer: PreTrainedTokenizerBase) -> Server:
    metrics = Metrics(pool="test", role="router")
    app = build_openai_app(
        backend,
        tokenizer,
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        metrics=metrics,
        max_body_bytes=MAX_BODY,
    )
    running = await serve(app)
    return Server(backend, running.url, metrics)
