"""The packed engine against transformers' `generate()`, and the pieces it is made of."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.contract.config import EngineConfig
from splitserve.engine.attention import _causal_mask
from splitserve.engine.forward import Engine, Work
from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.loader import LoadedModel, kv_layout, load_model
from tests.conftest import Reference, random_prompt


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(load_model(EngineConfig(model=str(tiny_model), threads=1)))


def greedy_generate(engine: Engine, prompts: list[list[int]], max_new: int, chunk: int) -> list[list[int]]:
    """Prefill each prompt in chunks, then decode all of them together in one batch."""
    pool = engine.new_pool(block_size=16, budget_bytes=1 << 24)
    kvs = [pool.sequence() for _ in prompts]
    next_tokens = []
    for kv, prompt in zip(kvs, prompts, strict=True):
        for start in range(0, len(prompt), chunk):
            logits = engine.prefill(kv, prompt[start : start + chunk])
        next_tokens.append(int(logits.argmax()))
    outputs = [[token] for token in next_tokens]
    for _ in range(max_new - 1):
        next_tokens = engine.decode_one_token(kvs, next_tokens).argmax(-1).tolist()
        for output, token in zip(outputs, next_tokens, strict=True):
            output.append(token)
    return outputs


@pytest.mark.parametrize("chunk", [1, 16, 4096])
def test_chunked_prefill_and_batched_decode_match_generate(
    engine: Engine, reference: Reference, chunk: int
) -> None:
    prompts = [random_prompt(n, seed=n) for n in (1, 5, 37, 300)]
    ours = greedy_generate(engine, prompts, max_new=20, chunk=chunk)
    for prompt, output in zip(prompts, ours, strict=True):
        assert output == reference.greedy(prompt, 20, ignore_eos=True)


def test_mixed_step_of_prompt_chunk_and_decode_tokens(engine: Engine, reference: Reference) -> None:
    """One forward carrying a decode token of one sequence and a prompt chunk of another."""
    first, second = random_prompt(40, seed=1), random_prompt(50, seed=2)
    pool = engine.new_pool(block_size=16, budget_bytes=1 << 24)
    kv_first, kv_second = pool.sequence(), pool.sequence()
    token = int(engine.prefill(kv_first, first).argmax())
    logits = engine.forward([Work(kv_first, [token]), Work(kv_second, second[:25])])
    engine.prefill(kv_second, second[25:])
    expected = reference.greedy(first, 2, ignore_eos=True)
    assert [token, int(logits[0].argmax())] == expected
    assert kv_first.length == 41 and kv_second.length == 50


def test_causal_mask_with_offset_and_sliding_window() -> None:
    mask = _causal_mask(start=3, length=2, begin=1, end=5, window=3, device=torch.device("cpu"))
    assert mask is not None
    # query positions 3 and 4 over key positions 1..4, window 3: keys in (q-3, q]
    assert mask.tolist() == [[True, True, True, False], [False, True, True, True]]


def test_kv_layout_follows_the_formula() -> None:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert layout.bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token, Llama-3-8B


@pytest.mark.parametrize(
    "architecture",
    [
        pytest.param({"model_type": "qwen2", "use_sliding_window": False}, id="qwen2-qkv-bias"),
        pytest.param({"model_type": "mistral", "sliding_window": 8}, id="mistral-sliding-window"),
    ],
)
def test_other_architectures_match_generate(tmp_path: Path, architecture: dict[str, object]) -> None:
    """The engine drives any transformers causal LM that supports pluggable attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        **architecture,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="splitserve_ragged").eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=None,  # type: ignore[arg-type]
        layout=kv_layout(model.config.get_text_config(), torch.float32),
        device=torch.device("cpu"),
        max_model_len=256,
        eos_token_ids=frozenset(),
        kv_budget_bytes=1 << 24,
    )
    prompt = random_prompt(30, seed=3)
    ours = greedy_generate(Engine(loaded), [prompt], max_new=12, chunk=7)[0]
    assert ours == Reference(tmp_path).greedy(prompt, 12, ignore_eos=True)


def test_scattered_blocks_are_read_like_contiguous_ones(engine: Engine, reference: Reference) -> None:
    """Steal the block after each sequence's last one whenever it is full, so that no sequence grows
    into its neighbour block: contexts are gathered block by block instead of read in place."""
    pool = engine.new_pool(block_size=4, budget_bytes=1 << 22)
    prompts = [random_prompt(n, seed=n) for n in (9, 30)]
    kvs = [pool.sequence() for _ in prompts]

    def steal_next_blocks() -> None:
        for kv in kvs:
            if kv.block_table and kv.length == kv.capacity:
                pool.allocator.allocate(1, after=kv.block_table[-1])

    outputs = []
    for kv, prompt in zip(kvs, prompts, strict=True):
        for start in range(0, len(prompt), 4):
            steal_next_blocks()
            logits = engine.prefill(kv, prompt[start : start + 4])
        outputs.append([int(logits.argmax())])
    for _ in range(11):
        steal_next_blocks()
        next_tokens = engine.decode_one_token(kvs, [out[-1] for out in outputs]).argmax(-1).tolist()
        for output, token in zip(outputs, next_tokens, strict=True):
            output.append(token)
    assert not any(kv.contiguous for kv in kvs)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference.greedy(prompt, 12, ignore_eos=True)
