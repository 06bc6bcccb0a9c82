"""Tiny random-weight Llama checkpoints with the embedded model's tokenizer, for shapes the
embedded model does not have (head counts that split over 2 ranks, a draft smaller than the
target). They load through the same path as real checkpoints; random weights make greedy
decoding deterministic but meaningless, which is all a same-output test needs."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def build_tiny_llama(
    out: Path, tokenizer_from: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, seed: int
) -> Path:
    """A float32 LlamaForCausalLM with `tokenizer_from`'s vocabulary, written to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # Large weights spread the logits, so no two tokens tie for argmax under batching noise.
        initializer_range=0.2,
        dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, out / name)
    return out
