"""Fixtures shared by every suite: the tiny offline model, and how to start our CLI as a subprocess."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = [str(REPO / "operator"), str(REPO / "worker")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with a real BPE tokenizer, written once per test session."""
    from splitserve.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def splitserve_command(*args: str) -> list[str]:
    """`splitserve ARGS...` run from this checkout's sources, whether or not it is pip-installed."""
    return [sys.executable, "-m", "splitserve", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*SOURCE_ROOTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def without_packages(folder: Path, *packages: str) -> dict[str, str]:
    """A subprocess environment in which `import PACKAGE` fails for each of `packages`, as in an image
    that never installed them: a `sitecustomize` (run by every interpreter at start-up) blocks them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["import sys", *(f"sys.modules[{name!r}] = None" for name in packages)]
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    return env


class Reference:
    """transformers' own `generate()` on the same weights: the ground truth for greedy output."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def greedy(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
        import torch

        extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **extra
            )
        return [int(token) for token in out[0, len(prompt) :]]


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> Reference:
    return Reference(tiny_model)


def random_prompt(length: int, seed: int, vocab: int = 300) -> list[int]:
    """Token ids clear of the tiny tokenizer's special tokens (ids 0..3)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(length)]
