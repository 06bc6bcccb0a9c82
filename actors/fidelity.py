"""Fidelity: does a served tier compute what its checkpoint computes?

A small model is fragile to reduced-precision kernels: vLLM on CPU in bfloat16 can answer a
plain question differently from the same checkpoint in transformers. This module measures it.
The reference is the checkpoint in transformers, float32, greedy; the candidate is whatever
produced greedy tokens with their top-k logprobs on the same prompt token ids (a tier's engine,
a served tier through its deployment handle, or another transformers model).

Per prompt, in the style of vLLM's own `check_logprobs_close`, with one tolerance
(`tolerance`, in nats):

* **agreement**: the tokens both produced before the first divergence;
* **closeness**: over the agreeing prefix, every token both sides rank in their top-k has
  logprobs within `tolerance` of each other;
* at the **first divergence**, each side's token must be among the other's top-k, and the
  reference must rank the two within `2 * tolerance` (noise of `tolerance` on each could swap
  them): a flip between two tokens the reference ranks further apart is an error, not noise.

A check passes when every prompt passes. Agreement is reported, not required: one near tie
flipped early in a long answer changes every token after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is 12 plus 30?",
    "Name the largest planet in the solar system.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that returns the square of a number.",
    "Who wrote Romeo and Juliet?",
    "List three primary colours.",
    "What is the boiling point of water in Celsius?",
    "Give one tip for sleeping better.",
    "Summarise in one sentence: the cat sat on the mat all afternoon and ignored the dog.",
    "What does CPU stand for?",
    "Write a haiku about autumn leaves.",
)
"""Fixed chat questions, each sent as the only user turn through the model's chat template."""
MAX_TOKENS = 32
TOP_K = 5
TOLERANCE = 0.1
"""Nats: how far a served top-k logprob may be from the reference's (a probability within about
10%). Float32 kernels stay within 1e-4 of the reference; bfloat16 moved them by up to 0.28 and
changed half the answers (docs/benchmarks/fidelity.md)."""


@dataclass
class Greedy:
    """One greedy generation: its tokens and, per position, the top-k token ids' logprobs
    (always including the chosen token's)."""

    token_ids: list[int]
    top: list[dict[int, float]]


@dataclass
class PromptResult:
    prompt: str
    reference_tokens: int
    agreed: int
    """Tokens both produced before the first divergence."""
    diverged_at: int | None
    """Position of the first divergence; None when the two generations are identical."""
    reason: str | None
    """Why the divergence fails the check; None when it passes (identical, or a near tie)."""
    max_logprob_diff: float
    """Largest |logprob difference| of a token in both top-k lists over the agreeing prefix."""
    reference_text: str = ""
    candidate_text: str = ""

    @property
    def passed(self) -> bool:
        return self.reason is None


@dataclass
class FidelityReport:
    label: str
    results: list[PromptResult]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def agreement(self) -> float:
        """Agreeing tokens as a share of the reference's tokens, over all prompts."""
        total = sum(r.reference_tokens for r in self.results)
        return sum(r.agreed for r in self.results) / total if total else 1.0

    @property
    def identical(self) -> int:
        return sum(1 for r in self.results if r.diverged_at is None)

    @property
    def max_logprob_diff(self) -> float:
        return max((r.max_logprob_diff for r in self.results), default=0.0)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [f"{r.prompt!r}: {r.reason}" for r in self.results if r.reason]

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "passed": self.passed,
            "agreement": self.agreement,
            "identical": self.identical,
            "prompts": len(self.results),
            "max_logprob_diff": self.max_logprob_diff,
            "failures": self.failures(),
            **self.details,
            "results": [dataclasses.asdict(r) for r in self.results],
        }


def compare(
    prompt: str,
    reference: Greedy,
    candidate: Greedy,
    tolerance: float = TOLERANCE,
) -> PromptResult:
    """Compare one candidate generation with the reference's (see the module docstring)."""
    worst = 0.0
    far = None
    """The first position whose logprobs are further apart than `tolerance`, as a reason."""
    common = min(len(reference.token_ids), len(candidate.token_ids))
    for i in range(common):
        ref_tok, cand_tok = reference.token_ids[i], candidate.token_ids[i]
        ref_top, cand_top = reference.top[i], candidate.top[i]
        if ref_tok == cand_tok:
            diff, token = max((abs(ref_top[t] - cand_top[t]), t) for t in ref_top.keys() & cand_top.keys())
            worst = max(worst, diff)
            if diff > tolerance and far is None:
                far = f"position {i}: token {token}'s logprob is {diff:.3f} nats from the reference's"
            continue
        reason = far
        if cand_tok not in ref_top:
            reason = f"position {i}: token {cand_tok} is not in the reference's top-{len(ref_top)}"
        elif ref_tok not in cand_top:
            reason = f"position {i}: the reference's token {ref_tok} is not in the candidate's top-{len(cand_top)}"
        elif (gap := ref_top[ref_tok] - ref_top[cand_tok]) > 2 * tolerance:
            reason = f"position {i}: the reference ranks its token {gap:.2f} nats above the candidate's"
        return PromptResult(prompt, len(reference.token_ids), i, i, reason, worst)
    if len(reference.token_ids) != len(candidate.token_ids):
        # Both sides keep the end-of-sequence token they stop at, so a generation that is a
        # strict prefix of the other ended without choosing one.
        reason = f"position {common}: one side ended, the other went on"
        return PromptResult(prompt, len(reference.token_ids), common, common, reason, worst)
    return PromptResult(prompt, len(reference.token_ids), common, None, far, worst)


def check(
    label: str,
    prompts: Sequence[str],
    references: Sequence[Greedy],
    candidates: Sequence[Greedy],
    tokenizer: Any = None,
    tolerance: float = TOLERANCE,
) -> FidelityReport:
    """Compare candidate generations with the reference's, prompt by prompt."""
    results = []
    for prompt, ref, cand in zip(prompts, references, candidates, strict=True):
        result = compare(prompt, ref, cand, tolerance)
        if tokenizer is not None:
            result.reference_text = tokenizer.decode(ref.token_ids, skip_special_tokens=True)
            result.candidate_text = tokenizer.decode(cand.token_ids, skip_special_tokens=True)
        results.append(result)
    return FidelityReport(label, results)


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str] = PROMPTS) -> list[list[int]]:
    """Each question as the only user turn, through the chat template, as a tier tokenizes it."""
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def stop_token_ids(model: Any) -> set[int]:
    """The end-of-sequence ids a greedy generation stops at (the generation config's, as vLLM)."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = model.config.eos_token_id
    return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])


def transformers_greedy(
    model: Any, prompts_ids: Sequence[list[int]], max_tokens: int = MAX_TOKENS, top_k: int = TOP_K
) -> list[Greedy]:
    """Greedy generations of a transformers model, one token at a time with its KV cache,
    stopping at end of sequence like vLLM; logprobs are computed in float32."""
    import torch

    stops = stop_token_ids(model)
    out = []
    with torch.inference_mode():
        for ids in prompts_ids:
            tokens: list[int] = []
            top: list[dict[int, float]] = []
            inputs = torch.tensor([ids])
            past = None
            for _ in range(max_tokens):
                step = model(input_ids=inputs, past_key_values=past, use_cache=True)
                past = step.past_key_values
                logprobs = torch.log_softmax(step.logits[0, -1].float(), dim=-1)
                values, indices = torch.topk(logprobs, top_k)
                chosen = int(indices[0])
                top.append({int(i): float(v) for v, i in zip(values, indices)})
                tokens.append(chosen)
                if chosen in stops:
                    break
                inputs = torch.tensor([[chosen]])
            out.append(Greedy(tokens, top))
    return out


def load_reference(checkpoint: str, dtype: str = "float32") -> tuple[Any, Any]:
    """The checkpoint in transformers (the reference implementation) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
    model.eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def chunks_greedy(chunks: Sequence[Any]) -> Greedy:
    """A `Greedy` from one request's `TokenChunk`s (greedy, with `logprobs` = top-k)."""
    tokens, top = [], []
    for chunk in chunks:
        for item in chunk.logprobs or []:
            tokens.append(item.token_id)
            ranked = {a.token_id: a.logprob for a in item.top}
            ranked[item.token_id] = item.logprob
            top.append(ranked)
    return Greedy(tokens, top)


def greedy_request(request_id: str, ids: list[int], max_tokens: int = MAX_TOKENS, top_k: int = TOP_K) -> Any:
    """The `GenerateRequest` a candidate answers: greedy, from prompt token ids, with top-k logprobs."""
    from tierserve.actors.types import GenerateRequest, SamplingOptions

    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, logprobs=top_k)
    return GenerateRequest(request_id, sampling, prompt_token_ids=list(ids))


async def engine_greedy(
    engine: Any, prompts_ids: Sequence[list[int]], max_tokens: int = MAX_TOKENS, top_k: int = TOP_K
) -> list[Greedy]:
    """Greedy generations of a started `VLLMEngine` (all prompts at once, as a tier batches)."""

    async def one(i: int, ids: list[int]) -> Greedy:
        request = greedy_request(f"fidelity-{i}", ids, max_tokens, top_k)
        return chunks_greedy([chunk async for chunk in engine.generate(request)])

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts_ids))))


@dataclass
class Reference:
    """The reference's greedy generations for a prompt set, computed once per checkpoint."""

    checkpoint: str
    prompts: tuple[str, ...]
    prompts_ids: list[list[int]]
    generations: list[Greedy]
    tokenizer: Any


def reference(checkpoint: str, prompts: Sequence[str] = PROMPTS, max_tokens: int = MAX_TOKENS) -> Reference:
    """The checkpoint's greedy generations in transformers, float32."""
    model, tokenizer = load_reference(checkpoint)
    ids = prompt_token_ids(tokenizer, prompts)
    generations = transformers_greedy(model, ids, max_tokens)
    return Reference(checkpoint, tuple(prompts), ids, generations, tokenizer)


@contextlib.asynccontextmanager
async def tier_engine(tier: Any, dtype: str | None = None, cache_dir: Path | None = None) -> AsyncIterator[Any]:
    """The tier's `VLLMEngine`, started in this process as its deployment would start it (engine
    options, speculation, environment), with `dtype` in place of its own if given. On CPU it is
    bound to every core this process may use, unless the environment already binds it. Started
    inside the running event loop, the one its requests must use."""
    from tierserve.actors.checkpoints import resolve_model
    from tierserve.actors.deployment import engine_options
    from tierserve.actors.engine import VLLMEngine
    from tierserve.actors.placement import BIND_ENV, binding_spec
    from tierserve.actors.speculation import resolve_speculation

    model = resolve_model(tier.model, cache_dir, progress=False)
    speculation = resolve_speculation(tier.speculative, cache_dir) if tier.speculative else None
    options = engine_options(tier, speculation)
    if dtype is not None:
        options["dtype"] = dtype
    env = dict(tier.deployment.env)
    if tier.accelerator == "cpu":
        env[BIND_ENV] = binding_spec([sorted(os.sched_getaffinity(0))])
    added = {k: v for k, v in env.items() if k not in os.environ}  # the caller's environment wins
    os.environ.update(added)
    engine = VLLMEngine(model, options, speculation, tier.max_completion_tokens)
    try:
        engine.start()
        yield engine
    finally:
        engine.shutdown()
        for k in added:
            os.environ.pop(k, None)


async def check_tier(
    tier: Any, ref: Reference, dtype: str | None = None, cache_dir: Path | None = None
) -> FidelityReport:
    """Start the tier's engine (`tier_engine`) and check it against the reference."""
    started = time.perf_counter()
    async with tier_engine(tier, dtype, cache_dir) as engine:
        start_s = time.perf_counter() - started
        generations = await engine_greedy(engine, ref.prompts_ids)
        dtype = engine.options.get("dtype", "auto")
    report = check(f"{tier.name} ({dtype})", ref.prompts, ref.generations, generations, ref.tokenizer)
    report.details = {"dtype": dtype, "start_s": start_s}
    return report
