"""The GPU fit check: weights, headroom and a full-context KV cache against the memory vLLM may
use on each GPU, on hand-built cases whose arithmetic is worked out here, the two configs vLLM
would refuse, and the shipped GPU config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tierserve.cluster.config import AppConfig, ConfigError, load_config
from tierserve.cluster.fit import (
    GIB,
    ModelShape,
    check_fit,
    kv_bytes_per_token,
    model_shape,
    require_fit,
    weight_bytes,
)
from tierserve.cluster.manifests import render
from tierserve.cluster.nodes import WorkerGroup
from tierserve.cluster.plan import plan_nodes

REPO = Path(__file__).resolve().parents[2]

ROUND = ModelShape(
    source="by hand",
    parameters=4 * 2**30,
    embedding_parameters=2**30,
    layers=10,
    kv_heads=4,
    head_dim=64,
    hidden=1024,
    intermediate=4096,
    vocab=32768,
    max_position=8192,
    dtype="bfloat16",
)


def test_weights_and_kv_bytes_by_hand():
    assert weight_bytes(ROUND, {}) == 8 * GIB  # bf16 checkpoint, dtype auto: 2 bytes each
    assert weight_bytes(ROUND, {"dtype": "float32"}) == 16 * GIB
    # 4-bit: the 3 Gi linear parameters at 0.53 bytes, the 1 Gi embedding parameters stay 2 bytes
    assert weight_bytes(ROUND, {"quantization": "awq"}) == pytest.approx((3 * 0.53 + 2) * GIB)
    assert weight_bytes(ROUND, {"quantization": "fp8"}) == 5 * GIB
    # 2 (K and V) x 10 layers x 4 heads x 64 x 2 bytes = 10,240 bytes; sharded over 2 ranks, half
    assert kv_bytes_per_token(ROUND, {}, 1) == 10240
    assert kv_bytes_per_token(ROUND, {}, 2) == 5120
    assert kv_bytes_per_token(ROUND, {"kv_cache_dtype": "fp8"}, 2) == 2560
    # 8 ranks over 4 KV heads: each rank keeps a whole head (replicated), not half of one
    assert kv_bytes_per_token(ROUND, {}, 8) == 2560
    # a float32 checkpoint under dtype auto runs in bfloat16 on GPUs
    assert weight_bytes(ModelShape(**{**ROUND.__dict__, "dtype": "float32"}), {}) == 8 * GIB


def app(tier: dict, groups: list[dict], **cluster) -> AppConfig:
    return AppConfig.model_validate(
        {"tiers": [tier], "rag": {"enabled": False}, "cluster": {"worker_groups": groups, **cluster}}
    )


def gpu_tier(tp: int = 1, **engine) -> dict:
    return {"name": "t", "model": "/m", "accelerator": "gpu", "tensor_parallel_size": tp, "engine": engine}


def test_kv_room_is_what_is_left_of_the_usable_memory():
    config = app(
        gpu_tier(max_model_len=8192, gpu_memory_utilization=0.5, enforce_eager=True),
        [{"name": "g", "gpus": 1, "gpu_memory_gb": 40}],
    )
    (fit,) = check_fit(config, config.cluster.worker_groups, {"/m": ROUND}).fits
    assert fit.weights_gib == 8 and fit.draft_gib == 0
    assert 0 < fit.headroom_gib < 2  # activations of 8192 tokens, logits of 256 sequences, the CUDA context
    assert fit.kv_gib == pytest.approx(20 - 8 - fit.headroom_gib)
    assert fit.kv_tokens == int(fit.kv_gib * GIB / 10240)
    assert fit.ok and fit.full_sequences == pytest.approx(fit.kv_tokens / 8192)
    # A group's own figure decides over the table: the same model on 12 GiB GPUs does not start.
    groups = [{"name": "g", "gpus": 1, "gpu_memory_gb": 12}]
    small = app(gpu_tier(max_model_len=8192, gpu_memory_utilization=0.5), groups)
    (fit,) = check_fit(small, small.cluster.worker_groups, {"/m": ROUND}).fits
    assert not fit.ok and fit.kv_gib < 0 and fit.kv_tokens == 0


def test_min_full_context_sequences_raises_the_bar():
    groups = [{"name": "g", "gpus": 1, "gpu_memory_gb": 24}]
    one = app(gpu_tier(max_model_len=8192), groups)
    (fit,) = check_fit(one, one.cluster.worker_groups, {"/m": ROUND}).fits
    assert fit.ok and 100 <= fit.full_sequences < 200  # 12.3 GiB of KV at 10 KiB a token, 8k tokens each
    many = app(gpu_tier(max_model_len=8192), groups, min_full_context_sequences=200)
    (fit,) = check_fit(many, many.cluster.worker_groups, {"/m": ROUND}).fits
    assert not fit.ok and "needs 200" in fit.report()


def test_unknown_models_and_gpus_are_reported_not_guessed():
    config = app(gpu_tier(), [{"name": "g", "gpus": 1}])  # no accelerator_type, no gpu_memory_gb
    report = check_fit(config, config.cluster.worker_groups, {"/m": ROUND})
    assert report.ok and report.fits == [] and "GPU memory unknown" in report.unchecked[0]
    report = check_fit(config, config.cluster.worker_groups, {"/m": None})
    assert "no config.json at /m and not a known checkpoint" in report.unchecked[0]


def test_the_checkpoints_config_json_is_read(tmp_path):
    """A local checkpoint's config.json gives the exact parameter count (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "dtype": "float16",
    }
    (tmp_path / "config.json").write_text(json.dumps(fields))
    shape = model_shape(str(tmp_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    expected = sum(p.numel() for p in model.parameters())
    assert shape.parameters == expected and shape.embedding_parameters == 2 * 1000 * 64
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype) == (3, 2, 16, "float16")
    assert model_shape(str(tmp_path / "absent")) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert model_shape(str(tmp_path)) is None  # listed as not checked, not a crash


def test_known_checkpoints_have_their_published_sizes():
    assert model_shape("/models/Meta-Llama-3.1-8B-Instruct").parameters == 8_030_261_248
    assert model_shape("/models/Llama-3.3-70B-Instruct").parameters == 70_553_706_496
    assert model_shape("/models/Llama-3.2-1B-Instruct").parameters == 1_235_814_400


def llama_tier(name: str, model: str, tp: int, accelerator: str, **engine) -> dict:
    return {
        "name": name,
        "model": f"/models/{model}",
        "accelerator": "gpu",
        "tensor_parallel_size": tp,
        "speculative": {"method": "draft_model", "model": "/models/Llama-3.2-1B-Instruct"},
        "engine": {"dtype": "bfloat16", "gpu_memory_utilization": 0.9, **engine},
        "deployment": {"accelerator_type": accelerator},
    }


def test_70b_at_tp4_on_40gb_a100s_is_refused_with_its_numbers():
    config = app(
        llama_tier("large", "Llama-3.3-70B-Instruct", 4, "A100", max_model_len=32768, max_num_seqs=128),
        [{"name": "a100", "cpus": 96, "gpus": 8, "accelerator_type": "A100"}],
    )
    with pytest.raises(ConfigError) as refused:
        require_fit(config, plan_nodes(config)[1])
    text = str(refused.value)
    # 70.55e9 bf16 parameters over 4 ranks: 32.85 GiB of the 36 GiB usable (0.9 x 40 GiB)
    assert "does not fit" in text and "weights        32.85 GiB per GPU" in text and "usable         36.00" in text
    assert "full-context sequences (32,768 tokens) at once: 0.2 (needs 1)" in text
    assert "suggestion: tensor_parallel_size 8 fits" in text and "suggestion: engine.max_model_len 6144" in text


def test_8b_with_a_1b_draft_and_16k_context_on_an_l4_is_refused():
    config = app(
        llama_tier("fast", "Meta-Llama-3.1-8B-Instruct", 1, "L4", max_model_len=16384),
        [{"name": "l4", "cpus": 16, "gpus": 1, "accelerator_type": "L4"}],
    )
    (fit,) = check_fit(config, config.cluster.worker_groups).fits
    # 8.03e9 x 2 bytes = 14.96 GiB, the draft 1.24e9 x 2 = 2.30 GiB, of 0.9 x 22.49 GiB usable
    assert (round(fit.weights_gib, 2), round(fit.draft_gib, 2)) == (14.96, 2.30)
    # KV per token: 8B 2x32x8x128x2 = 128 KiB, the 1B draft's 2x16x8x64x2 = 32 KiB
    assert fit.kv_bytes_per_token == 160 * 1024
    assert not fit.ok and fit.kv_tokens < 16384
    assert any("a GPU of" in s for s in fit.suggestions)


def test_a_draft_with_another_vocabulary_is_refused():
    other = ModelShape(**{**ROUND.__dict__, "vocab": 50000})
    tier = {**gpu_tier(), "speculative": {"method": "draft_model", "model": "/d"}}
    config = app(tier, [{"name": "g", "gpus": 1, "gpu_memory_gb": 80}])
    with pytest.raises(ValueError, match=r"draft's vocabulary \(50000\) differs from the target's \(32768\)"):
        check_fit(config, config.cluster.worker_groups, {"/m": ROUND, "/d": other})


def test_the_shipped_gpu_config_fits_and_its_check_prints_the_report():
    config = load_config(REPO / "configs" / "gpu.yaml", check_engine=False)
    report = require_fit(config, plan_nodes(config)[1])
    assert report.ok and {(f.tier, f.node) for f in report.fits} == {("llama-8b", "l40s"), ("llama-70b", "a100")}
    out = subprocess.run(
        [sys.executable, "-m", "tierserve.cluster.cli", "config", "check", str(REPO / "configs" / "gpu.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tier 'llama-70b' on a100 (A100, 40 GiB per GPU, tensor_parallel_size 8): fits" in out
    assert out.rstrip().endswith("ok (2 tier(s): llama-8b, llama-70b)")


def test_render_writes_nothing_for_a_tier_that_cannot_start(tmp_path):
    config = app(
        llama_tier("large", "Llama-3.3-70B-Instruct", 4, "A100", max_model_len=32768),
        [WorkerGroup(name="a100", cpus=96, gpus=8, accelerator_type="A100").model_dump()],
    )
    with pytest.raises(ConfigError, match="cannot start"):
        render(config, tmp_path / "out", "test")
    assert not (tmp_path / "out").exists()


def test_more_ranks_are_suggested_only_where_vllm_can_shard_the_kv_heads():
    """6 KV heads split over 2 ranks, not over 4 or 8 (neither divides nor is a multiple of 6)."""
    six = ModelShape(**{**ROUND.__dict__, "kv_heads": 6, "parameters": 12 * 2**30})  # 24 GiB of bf16 weights
    for gib, expected in [(16, "tensor_parallel_size 2 fits"), (8, None)]:
        config = app(gpu_tier(max_model_len=8192), [{"name": "g", "gpus": 8, "gpu_memory_gb": gib}])
        (fit,) = check_fit(config, config.cluster.worker_groups, {"/m": six}).fits
        tp = [s for s in fit.suggestions if s.startswith("tensor_parallel_size")]
        assert not fit.ok and tp == ([f"{expected} (the draft's too)"] if expected else [])
