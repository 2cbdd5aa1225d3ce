"""Fixtures of the engine suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.contract.config import EngineConfig
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[Engine, Engine]:
    """Two engines on the same weights, so a prefill and a decode runtime can run side by side."""
    config = EngineConfig(model=str(tiny_model), threads=1)
    return Engine(load_model(config)), Engine(load_model(config))
