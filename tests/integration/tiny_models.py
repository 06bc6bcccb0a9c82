"""Tiny random-weight checkpoints: Llama with the embedded model's tokenizer, for shapes the
embedded model does not have (head counts that split over 2 ranks, a draft smaller than the
target), and Qwen2 with a tokenizer of its own, for tiers that tokenize differently. They load
through the same path as real checkpoints; random weights make greedy decoding deterministic
but meaningless, which is all a same-output test needs."""

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


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2(out: Path, texts: list[str], *, vocab: int, hidden: int, layers: int, seed: int) -> Path:
    """A float32 Qwen2ForCausalLM (4 heads: `hidden` 128 gives the 32-wide heads vLLM's CPU
    attention supports) with a tokenizer of its own: byte-level BPE trained on `texts`
    to `vocab` entries (a small vocabulary cuts text into many more tokens than the embedded
    model's 49,152), ChatML chat template, `<|im_end|>` as end of sequence."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64 * -(-len(tokenizer) // 64),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        dtype="float32",
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return out


def tiny_tier(name: str, model: Path, max_num_seqs: int = 8, **fields: object) -> dict:
    """A tier config of a tiny checkpoint: float32, eager, 512 tokens of context, one logical CPU
    and 1 GiB of KV cache."""
    return {
        "name": name,
        "model": str(model),
        "engine": {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": max_num_seqs},
        "deployment": {"num_cpus": 1, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        **fields,
    }
