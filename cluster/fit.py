"""Whether each GPU tier's engine can start on the GPUs of the nodes it may land on.

vLLM starts an engine only if, within `gpu_memory_utilization` of each GPU's memory, the
weights, the peak activations of a profiling forward pass, CUDA graphs and the CUDA context
leave a KV cache that holds at least one sequence of `max_model_len` tokens; otherwise it
refuses to start ("... larger than the maximum number of tokens that can be stored in KV
cache"). This module makes that estimate from the checkpoint's architecture before anything
is deployed, per tier and per node type Ray may place the tier on, so that a config that
cannot start is refused by `tierserve config check` with the numbers and a way out.

Per GPU, with t = tensor_parallel_size:

    usable   = gpu_memory_utilization x the GPU's memory
    weights  = parameters x bytes per parameter / t       (the draft's the same, over its ranks)
    headroom = activations of max_num_batched_tokens + logits of max_num_seqs
               + CUDA graphs (unless enforce_eager) + CUDA context (+ NCCL when t > 1)
    KV/token = 2 x layers x max(1, kv_heads / t) x head_dim x KV bytes   (+ the draft's layers)
    tokens   = (usable - weights - headroom) / KV/token

The headroom is an estimate (vLLM measures it at start-up); the check says so, and sizing
should keep a margin above `min_full_context_sequences` full sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.actors.config import TierConfig
from tierserve.cluster.config import AppConfig, ConfigError
from tierserve.cluster.nodes import WorkerGroup
from tierserve.cluster.plan import shortfall, tier_demand

GIB = 2**30
logger = logging.getLogger("tierserve.cluster")

ACCELERATOR_MEMORY_GIB: dict[str, float] = {
    "T4": 15.0,
    "V100": 15.78,  # the 16 GB part; set the worker group's gpu_memory_gb for a 32 GB one
    "A10G": 22.49,
    "L4": 22.49,
    "L40S": 44.99,
    "A100": 40.0,  # Ray names both A100 parts "A100"; set gpu_memory_gb: 80 for the 80 GB one
    "A100-40G": 40.0,
    "A100-80G": 80.0,
    "H100": 79.65,
    "H20": 95.58,
    "H200": 140.4,
    "B200": 179.06,
    "RTX-PRO-6000": 95.59,
    "AMD-Instinct-MI300X-OAM": 192.0,
}
"""Memory of one GPU in GiB as the driver reports it, by Ray's accelerator type name. A worker
group's `gpu_memory_gb` overrides it."""

KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "meta-llama-3.1-8b-instruct": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    "llama-3.3-70b-instruct": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    "llama-3.2-1b-instruct": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
}
"""The architecture fields of public checkpoints' config.json, by directory name (lowercase),
for checking a config on a machine that does not hold the checkpoint. A checkpoint directory
with a config.json on this machine is read instead."""

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
QUANTIZED_BYTES = {"awq": 0.53, "awq_marlin": 0.53, "gptq": 0.53, "gptq_marlin": 0.53, "bitsandbytes": 0.53}
"""Bytes per parameter of a quantised linear layer: 4-bit weights plus a 16-bit scale per 128
(embeddings stay in the model's dtype); 8-bit methods are one byte (`FP8_METHODS`)."""
FP8_METHODS = {"fp8", "fbgemm_fp8", "modelopt", "compressed-tensors", "experts_int8"}

CUDA_CONTEXT_GIB = 0.5
"""What a GPU process holds outside PyTorch's allocator: the CUDA context and cuBLAS workspaces."""
NCCL_GIB = 0.25
"""NCCL's buffers when the model is sharded over more than one GPU."""
CUDA_GRAPHS_GIB = 0.5
"""Captured CUDA graphs, unless `enforce_eager`."""
DEFAULT_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class ModelShape:
    """What the fit check needs of a checkpoint's architecture."""

    source: str
    """Where it came from: a config.json path, or 'known checkpoint <name>'."""
    parameters: int
    embedding_parameters: int
    """Of `parameters`, the input and (untied) output embeddings, which quantisation leaves alone."""
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_position: int
    dtype: str
    quantization: str | None = None

    @classmethod
    def from_hf_config(cls, config: Any, source: str) -> ModelShape:
        """Count parameters by building the model on PyTorch's meta device (no memory, exact)."""
        import torch
        from transformers import AutoModelForCausalLM

        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        parameters = sum(p.numel() for p in model.parameters())
        tied = getattr(text, "tie_word_embeddings", False)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None) or "float32"
        quantization = (getattr(config, "quantization_config", None) or {}).get("quant_method")
        return cls(
            source=source,
            parameters=parameters,
            embedding_parameters=text.vocab_size * text.hidden_size * (1 if tied else 2),
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
            vocab=text.vocab_size,
            max_position=getattr(text, "max_position_embeddings", 0) or 0,
            dtype=str(dtype).removeprefix("torch."),
            quantization=quantization,
        )


def model_shape(model: str) -> ModelShape | None:
    """The architecture of a tier's `model`: its config.json when this machine has the
    checkpoint directory, else a known public checkpoint of that directory name; None when
    neither (the fit is then not checked, and the check says so)."""
    from transformers import AutoConfig

    path = Path(model)
    if (path / "config.json").is_file():
        try:
            return ModelShape.from_hf_config(AutoConfig.from_pretrained(path), str(path / "config.json"))
        except Exception as exc:  # an architecture transformers cannot build here (remote code, say)
            logger.warning("fit check: cannot read %s/config.json (%s); not checked", path, exc)
            return None
    known = KNOWN_CHECKPOINTS.get(path.name.lower())
    if known is None:
        return None
    fields = dict(known)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return ModelShape.from_hf_config(config, f"known checkpoint {path.name}")


def _dtype_bytes(dtype: str, shape: ModelShape) -> float:
    """Bytes of one weight in the engine's dtype: 'auto' keeps a 16-bit checkpoint's and runs a
    float32 one in bfloat16 (vLLM's rule on GPUs)."""
    if dtype == "auto":
        return min(2, DTYPE_BYTES.get(shape.dtype, 2))
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"engine.dtype {dtype!r} is not one of {', '.join(sorted(DTYPE_BYTES))} or auto")
    return DTYPE_BYTES[dtype]


def weight_bytes(shape: ModelShape, engine: dict[str, Any]) -> float:
    """The model's weights in memory, quantisation aware (the engine's `quantization` or the checkpoint's)."""
    dense = _dtype_bytes(str(engine.get("dtype", "auto")), shape)
    method = engine.get("quantization") or shape.quantization
    if method is None:
        return shape.parameters * dense
    per_param = 1.0 if method in FP8_METHODS else QUANTIZED_BYTES.get(method)
    if per_param is None:
        raise ValueError(f"quantization {method!r}: the fit check knows {', '.join(sorted(QUANTIZED_BYTES))} and fp8")
    linear = shape.parameters - shape.embedding_parameters
    return linear * per_param + shape.embedding_parameters * dense


def kv_bytes_per_token(shape: ModelShape, engine: dict[str, Any], ranks: int) -> float:
    """One token's keys and values on one GPU of `ranks` (KV heads are replicated when fewer than ranks)."""
    kv_dtype = str(engine.get("kv_cache_dtype", "auto"))
    per_value = 1 if kv_dtype.startswith("fp8") else _dtype_bytes(str(engine.get("dtype", "auto")), shape)
    return 2 * shape.layers * max(1, math.ceil(shape.kv_heads / ranks)) * shape.head_dim * per_value


def headroom_bytes(shape: ModelShape, engine: dict[str, Any], ranks: int) -> float:
    """What vLLM's profiling run and the CUDA runtime take besides weights and KV cache (estimate)."""
    dense = _dtype_bytes(str(engine.get("dtype", "auto")), shape)
    tokens = int(engine.get("max_num_batched_tokens") or DEFAULT_BATCHED_TOKENS)
    seqs = int(engine.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
    # per token: the MLP's gate/up and activation outputs, q/k/v, and two hidden-size buffers
    per_token = 3 * shape.intermediate / ranks + (shape.hidden + 2 * shape.kv_heads * shape.head_dim) / ranks
    activations = tokens * (per_token + 2 * shape.hidden) * dense
    logits = seqs * shape.vocab * 4 * 2  # float32 logits and probabilities of every running sequence
    graphs = 0 if engine.get("enforce_eager") else CUDA_GRAPHS_GIB
    runtime = CUDA_CONTEXT_GIB + (NCCL_GIB if ranks > 1 else 0) + graphs
    return activations + logits + runtime * GIB


@dataclass(frozen=True)
class Fit:
    """One tier's memory on one GPU of one node type."""

    tier: str
    node: str
    accelerator: str
    gpu_gib: float
    utilization: float
    ranks: int
    weights_gib: float
    draft_gib: float
    headroom_gib: float
    kv_bytes_per_token: float
    max_model_len: int
    max_num_seqs: int
    min_sequences: int
    suggestions: list[str] = field(default_factory=list)

    @property
    def kv_gib(self) -> float:
        return self.gpu_gib * self.utilization - self.weights_gib - self.draft_gib - self.headroom_gib

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_gib * GIB / self.kv_bytes_per_token))

    @property
    def full_sequences(self) -> float:
        """Sequences of `max_model_len` tokens the KV cache holds at once."""
        return self.kv_tokens / self.max_model_len

    @property
    def ok(self) -> bool:
        return self.full_sequences >= self.min_sequences

    def report(self) -> str:
        """The arithmetic, one line per term, as `tierserve config check` prints it."""
        lines = [
            f"tier {self.tier!r} on {self.node} ({self.accelerator}, {self.gpu_gib:g} GiB per GPU, "
            f"tensor_parallel_size {self.ranks}): {'fits' if self.ok else 'does not fit'}",
            f"    usable       {self.gpu_gib * self.utilization:7.2f} GiB  "
            f"(gpu_memory_utilization {self.utilization:g})",
            f"    weights      {self.weights_gib:7.2f} GiB per GPU",
        ]
        if self.draft_gib:
            lines.append(f"    draft        {self.draft_gib:7.2f} GiB per GPU")
        lines += [
            f"    headroom     {self.headroom_gib:7.2f} GiB  (activations, logits, CUDA graphs and context; estimated)",
            f"    KV cache     {self.kv_gib:7.2f} GiB = {self.kv_tokens:,} tokens at "
            f"{self.kv_bytes_per_token / 1024:g} KiB per token",
            f"    full-context sequences ({self.max_model_len:,} tokens) at once: {self.full_sequences:.1f} "
            f"(needs {self.min_sequences}); {self.max_num_seqs} sequences at once get "
            f"{self.kv_tokens // max(1, self.max_num_seqs):,} tokens each",
        ]
        lines += [f"    suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def estimate(
    tier: TierConfig,
    node: str,
    accelerator: str,
    gpu_gib: float,
    shape: ModelShape,
    draft: ModelShape | None,
    min_sequences: int,
    ranks: int | None = None,
) -> Fit:
    """The tier's fit on one GPU of `gpu_gib` (`ranks` in place of its own, for suggestions)."""
    engine = tier.engine
    ranks = ranks or tier.tensor_parallel_size
    draft_ranks = ranks  # vLLM's draft-model proposer shards the draft like the target
    kv = kv_bytes_per_token(shape, engine, ranks)
    draft_gib = 0.0
    if draft is not None:
        draft_gib = weight_bytes(draft, engine) / draft_ranks / GIB
        kv += kv_bytes_per_token(draft, engine, draft_ranks)
    return Fit(
        tier=tier.name,
        node=node,
        accelerator=accelerator,
        gpu_gib=gpu_gib,
        utilization=float(engine.get("gpu_memory_utilization", 0.9)),
        ranks=ranks,
        weights_gib=weight_bytes(shape, engine) / ranks / GIB,
        draft_gib=draft_gib,
        headroom_gib=headroom_bytes(shape, engine, ranks) / GIB,
        kv_bytes_per_token=kv,
        max_model_len=int(engine.get("max_model_len") or shape.max_position),
        max_num_seqs=int(engine.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS),
        min_sequences=min_sequences,
    )


def _suggestions(tier: TierConfig, fit: Fit, shape: ModelShape, draft: ModelShape | None) -> list[str]:
    """Ways out of a fit that fails: a shorter context, more ranks, a larger GPU."""
    args = (tier, fit.node, fit.accelerator, fit.gpu_gib, shape, draft, fit.min_sequences)
    out = []
    longest = (fit.kv_tokens // fit.min_sequences) // 1024 * 1024
    if longest >= 1024:
        out.append(f"engine.max_model_len {longest} (or less) fits at tensor_parallel_size {fit.ranks}")
    for ranks in (2, 4, 8, 16):
        # vLLM shards KV heads evenly, or replicates them when the ranks are a multiple of them
        shardable = shape.kv_heads % ranks == 0 or ranks % shape.kv_heads == 0
        if ranks > fit.ranks and shardable and estimate(*args, ranks=ranks).ok:
            out.append(f"tensor_parallel_size {ranks} fits (the draft's too)")
            break
    larger = sorted((gib, name) for name, gib in ACCELERATOR_MEMORY_GIB.items() if gib > fit.gpu_gib)
    for gib, name in larger:
        if estimate(tier, fit.node, name, gib, shape, draft, fit.min_sequences).ok:
            out.append(f"a GPU of {gib:g} GiB ({name}) fits at tensor_parallel_size {fit.ranks}")
            break
    return out


def gpu_memory_gib(group: WorkerGroup) -> float | None:
    """The memory of one GPU of the group: its `gpu_memory_gb`, else the table's for its accelerator type."""
    if group.gpu_memory_gb is not None:
        return group.gpu_memory_gb
    return ACCELERATOR_MEMORY_GIB.get(group.accelerator_type or "")


@dataclass
class FitReport:
    """Every GPU tier's fit on every node type it may land on, and what could not be checked."""

    fits: list[Fit] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.fits)

    def text(self) -> str:
        return "\n".join([f.report() for f in self.fits] + [f"not checked: {why}" for why in self.unchecked])


def check_fit(
    config: AppConfig, groups: list[WorkerGroup], shapes: dict[str, ModelShape | None] | None = None
) -> FitReport:
    """The fit of each GPU tier on each worker group whose nodes Ray may place it on (`groups`,
    as `plan_nodes` returns them). `shapes` maps model paths to their shape (tests pass their
    own); missing ones are looked up with `model_shape`."""
    shapes = dict(shapes or {})

    def shape_of(model: str) -> ModelShape | None:
        if model not in shapes:
            shapes[model] = model_shape(model)
        return shapes[model]

    report = FitReport()
    for tier in config.tiers:
        if tier.accelerator != "gpu":
            continue
        shape = shape_of(tier.model)
        if shape is None:
            report.unchecked.append(
                f"tier {tier.name!r}: no config.json at {tier.model} and not a known checkpoint "
                "(run the check where the checkpoint is)"
            )
            continue
        draft = None
        spec = tier.speculative
        if spec is not None and spec.method == "draft_model" and spec.model:
            draft = shape_of(spec.model)
            if draft is None:
                report.unchecked.append(f"tier {tier.name!r}: the draft {spec.model} (its weights and KV not counted)")
            elif draft.vocab != shape.vocab:
                raise ValueError(
                    f"tier {tier.name!r}: the draft's vocabulary ({draft.vocab}) differs from the target's "
                    f"({shape.vocab}); vLLM's draft-model speculation needs the same tokenizer"
                )
        demand = tier_demand(tier)
        for group in groups:
            if not group.gpus or shortfall(demand, group):
                continue
            gib = gpu_memory_gib(group)
            if gib is None:
                report.unchecked.append(
                    f"tier {tier.name!r} on {group.name}: GPU memory unknown (set the group's gpu_memory_gb "
                    "or an accelerator_type the table knows)"
                )
                continue
            accelerator = group.accelerator_type or "GPU"
            fit = estimate(tier, group.name, accelerator, gib, shape, draft, config.cluster.min_full_context_sequences)
            if not fit.ok:
                fit = dataclasses.replace(fit, suggestions=_suggestions(tier, fit, shape, draft))
            report.fits.append(fit)
    return report


def require_fit(config: AppConfig, groups: list[WorkerGroup]) -> FitReport:
    """The fit report on the cluster's worker groups (as `plan_nodes` returns them); ConfigError
    with the report when a GPU tier cannot start on a node type Ray may place it on."""
    report = check_fit(config, groups)
    if not report.ok:
        raise ConfigError("a GPU tier's engine cannot start (vLLM would refuse):\n" + report.text())
    return report
