"""`splitserve make-tiny-model DIR`: a small random Llama and a real tokenizer, written without network.

Tests, CI and the offline demo need a model that loads through the same `from_pretrained` path as a
hub model, with a byte-level BPE tokenizer (so streaming detokenization meets multi-byte tokens) and
a chat template. Weights are random, so the text is gibberish; shapes and code paths are real.
"""

from __future__ import annotations

from pathlib import Path

# A few sentences to learn BPE merges from: enough for multi-character tokens, small enough to be instant.
_CORPUS = (
    "Prefill runs the whole prompt at once, is compute bound and decides the time to first token. "
    "Decode emits one token at a time from the KV cache, is memory bandwidth bound and decides the "
    "inter-token latency. On one server a single huge prefill stalls every decode stream, so we run "
    "prefill and decode on separate pools and ship the KV cache from prefill to decode. "
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today? "
    "Once upon a time there was a small model that answered every question with random words. "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 The cat sat on the mat. She sells sea shells by the sea shore. "
)

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"

# ChatML, the template most open chat models use; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shapes: small enough for CPU tests, with GQA (8 query heads share 4 KV heads) so the KV formula and
# the attention path meet the general case; 8k positions so prompts of ~4k tokens fit.
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 688
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 4
MAX_POSITIONS = 8192
VOCAB_TARGET = 1024
# Wider than transformers' 0.02 default: random weights then give varied greedy text and top-2 logit
# gaps of ~1e-2 or more, so exact comparisons with `generate()` are not decided by rounding noise.
INIT_STD = 0.2


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write config, safetensors weights, tokenizer and generation config to `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=[BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS], trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    eos_ids = [int(tokenizer.convert_tokens_to_ids(token)) for token in (EOS, IM_END)]  # type: ignore[arg-type]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id, eos_token_id=eos_ids, pad_token_id=config.pad_token_id
    ).save_pretrained(directory)
    return directory
