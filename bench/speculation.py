"""Speculative decoding benchmark: what each tier's speculation buys, at one stream and at sixteen.

For every tier of a config (default: the embedded configs/local.yaml) it starts the tier's own
engine (the engine options, placement and speculation the tier deployment would run, without
Serve in front) in several variants, one at a time:

- off:          no speculation;
- ngram:        n-gram prompt lookup (k=3) at every batch size;
- <method>:     the tier's own speculation at every batch size;
- <method> + rule: the tier's speculation with its load rule (`disable_above_batch_size`);
- ngram + adaptive: n-gram lookup at every batch size to start with, `adaptive` on (the tier
  measures the payoff per batch size and switches k between 3 and 0 on the running engine;
  actors/adaptive.py);
- <method> [+ rule] + adaptive: the tier as configured, when its config turns `adaptive` on.

The notes give what each adaptive variant had decided per batch-size bucket by the end of its run.

Each variant runs two workloads, greedy, up to `--max-tokens` tokens per answer: `chat`
(open-ended questions) and `rag` (a context passage and a question whose answer quotes it, the
case n-gram prompt lookup is built for), at concurrency 1 and 16. Greedy output is identical in
every variant, so the token counts match and tokens/s compare directly.

A distilled draft the config names but the cache lacks falls back to n-gram lookup, as the
tier does; the notes under the table say what each variant really ran.

It also measures the machine's memory bandwidth from one core (the core a tier's model worker is
bound to) and reports single-stream speed as a fraction of the bandwidth limit: a decode step
reads every weight once, so one stream cannot beat bandwidth / weight bytes tokens per second.

    .venv/bin/python bench/speculation.py [--config FILE] [--tiers small quality]
        [--variants off ngram "ngram + adaptive" ...] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tierserve.actors.types import SpeculationStats

REPO = Path(__file__).resolve().parents[1]

CHAT = [
    "Explain how a refrigerator keeps food cold.",
    "What should I pack for a three-day hiking trip?",
    "Describe how bees make honey.",
    "Why do leaves change colour in autumn?",
    "Give me advice for a first job interview.",
    "How does a credit card work?",
    "What is the difference between weather and climate?",
    "Write a short poem about the sea.",
]

PASSAGES = [
    (
        "The Eiffel Tower was built between 1887 and 1889 as the entrance arch to the 1889 World's Fair. "
        "It is 330 metres tall and was the tallest man-made structure in the world until the Chrysler "
        "Building in New York was finished in 1930. Gustave Eiffel's company designed and built the tower.",
        "When was the Eiffel Tower built, and how tall is it?",
    ),
    (
        "Photosynthesis takes place in the chloroplasts of plant cells. Chlorophyll absorbs light, mostly "
        "blue and red, and the plant uses that energy to turn carbon dioxide and water into glucose and "
        "oxygen. The oxygen is released into the air through small pores called stomata.",
        "Where does photosynthesis happen, and what does it produce?",
    ),
    (
        "The Great Barrier Reef lies off the coast of Queensland, Australia. It stretches for over 2,300 "
        "kilometres and is made of about 2,900 individual reefs and 900 islands. It can be seen from outer "
        "space and is the world's biggest single structure made by living organisms.",
        "How long is the Great Barrier Reef and what is it made of?",
    ),
    (
        "Python was created by Guido van Rossum and first released in 1991. Its design philosophy stresses "
        "code readability, using significant indentation. Python supports several programming paradigms, "
        "including structured, object-oriented and functional programming.",
        "Who created Python, when was it released, and what does its design stress?",
    ),
]


def rag_prompt(passage: str, question: str) -> str:
    return f"Answer using the context, quoting it where you can.\n\nContext: {passage}\n\nQuestion: {question}"


WORKLOADS = {"chat": CHAT, "rag": [rag_prompt(p, q) for p, q in PASSAGES]}


@dataclass
class Row:
    tier: str
    variant: str
    workload: str
    concurrency: int
    tokens: int
    wall: float
    speculation: SpeculationStats | None = None
    """What the variant's speculation did during this run (the tier's counters' difference)."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall

    @property
    def acceptance(self) -> str:
        spec = self.speculation
        return f"{spec.acceptance_rate:.2f}" if spec and spec.draft_tokens else "-"

    @property
    def accepted_length(self) -> str:
        spec = self.speculation
        return f"{spec.mean_accepted_length:.2f}" if spec and spec.steps else "-"


def memory_bandwidth_gbs(size_mib: int = 512, repeats: int = 8) -> float:
    """Copy bandwidth of one core (read + write bytes per second), best of `repeats`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * src.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(threads)


def weight_bytes(checkpoint: str) -> int:
    return sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))


async def run_load(engine, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> tuple[int, float]:
    from tierserve.actors.types import GenerateRequest, SamplingOptions
    from tierserve.core.types import ChatMessage

    queue = [prompts[i % len(prompts)] for i in range(requests)]
    tokens = 0

    async def one(prompt: str) -> None:
        nonlocal tokens
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            messages=[ChatMessage("user", prompt)],
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0),
        )
        async for chunk in engine.generate(request):
            tokens += len(chunk.token_ids)

    async def worker() -> None:
        while queue:
            await one(queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - start


def variants(tier) -> list[tuple[str, object]]:
    """(name, tier config) pairs: no speculation; n-gram lookup at every batch size, fixed and
    adaptive; the tier's own speculation at every batch size and with its load rule, both fixed;
    and the tier as configured, when that adds `adaptive` to them."""
    from tierserve.actors.config import AdaptiveSpeculationConfig, SpeculationConfig

    fixed = AdaptiveSpeculationConfig()
    out = [("off", tier.model_copy(update={"speculative": None}))]
    ngram = SpeculationConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=4)
    out.append(("ngram", tier.model_copy(update={"speculative": ngram})))
    adaptive_ngram = ngram.model_copy(update={"adaptive": AdaptiveSpeculationConfig(enabled=True)})
    out.append(("ngram + adaptive", tier.model_copy(update={"speculative": adaptive_ngram})))
    spec = tier.speculative
    if spec is None:
        return out
    has_rule = spec.disable_above_batch_size is not None or spec.tokens_per_batch_size is not None
    always = spec.model_copy(
        update={"disable_above_batch_size": None, "tokens_per_batch_size": None, "adaptive": fixed}
    )
    if always != ngram:
        out.append((spec.method, tier.model_copy(update={"speculative": always})))
    if has_rule:
        ruled = spec.model_copy(update={"adaptive": fixed})
        out.append((f"{spec.method} + rule", tier.model_copy(update={"speculative": ruled})))
    if spec.adaptive.enabled:
        name = f"{spec.method}{' + rule' if has_rule else ''} + adaptive"
        if name != "ngram + adaptive" or spec != adaptive_ngram:
            out.append((name, tier))
    return out


def decisions(buckets) -> str:
    """An adaptive engine's end state: k per batch-size bucket that saw traffic, with its payoff."""
    parts = []
    for b in buckets:
        if not b.speculating_steps and not b.plain_steps:
            continue
        sizes = (
            str(b.first_batch_size)
            if b.first_batch_size == b.last_batch_size
            else f"{b.first_batch_size}-{b.last_batch_size}"
        )
        payoff = f"{b.payoff:.2f}x" if b.payoff is not None else "not measured"
        parts.append(f"batch {sizes}: k={b.num_speculative_tokens} (payoff {payoff}; {b.reason})")
    return "; ".join(parts) or "no decode steps measured"


async def bench_variant(tier_name: str, variant: str, tier, model: str, cache, args) -> tuple[list[Row], str]:
    from tierserve.actors.deployment import engine_options
    from tierserve.actors.engine import VLLMEngine
    from tierserve.actors.speculation import resolve_speculation

    resolved = resolve_speculation(tier.speculative, cache) if tier.speculative else None
    adaptive = tier.speculative.adaptive if tier.speculative else None
    engine = VLLMEngine(model, engine_options(tier, resolved), resolved, adaptive=adaptive)
    engine.start()
    described = resolved.describe() if resolved else "none"
    rows = []
    try:
        await run_load(engine, CHAT[:2], 2, 2, 8)  # warm-up
        for workload, prompts in WORKLOADS.items():
            for c in (1, 16):
                n = args.requests_c1 if c == 1 else args.requests_c16
                before = engine.stats().speculation
                tokens, wall = await run_load(engine, prompts, c, n, args.max_tokens)
                after = engine.stats().speculation
                row = Row(tier_name, variant, workload, c, tokens, wall)
                if after is not None:
                    row.speculation = SpeculationStats(after.method, after.num_speculative_tokens)
                    row.speculation.add(
                        after.steps - before.steps,
                        after.draft_tokens - before.draft_tokens,
                        after.accepted_tokens - before.accepted_tokens,
                    )
                rows.append(row)
                print(
                    f"  {tier_name:8s} {variant:10s} {workload:4s} c={c:<2d} {row.tok_s:6.1f} tok/s  "
                    f"acceptance {row.acceptance}  accepted length {row.accepted_length}",
                    flush=True,
                )
        control = engine.stats().speculation_control
        if control is not None:
            described += f"; adaptive, at the end: {decisions(control)}"
    finally:
        engine.shutdown()
    return rows, described


def table(rows: list[Row], limit_tok_s: dict[str, float]) -> str:
    off = {(r.tier, r.workload, r.concurrency): r.tok_s for r in rows if r.variant == "off"}
    lines = [
        "| tier | speculation | workload | concurrency | output tok/s | vs off | acceptance | "
        "tokens per step | of bandwidth limit |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = off.get((r.tier, r.workload, r.concurrency))
        ratio = f"{r.tok_s / base:.2f}x" if base else "-"
        fraction = f"{r.tok_s / limit_tok_s[r.tier]:.0%}" if r.concurrency == 1 else ""
        lines.append(
            f"| {r.tier} | {r.variant} | {r.workload} | {r.concurrency} | {r.tok_s:.1f} | {ratio} | "
            f"{r.acceptance} | {r.accepted_length} | {fraction} |"
        )
    return "\n".join(lines)


def main() -> None:
    from tierserve.actors.checkpoints import resolve_model
    from tierserve.cluster.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="tierserve YAML (default: the embedded configs/local.yaml)")
    p.add_argument("--tiers", nargs="+", help="tiers to measure (default: all)")
    p.add_argument("--variants", nargs="+", help="variants to run, by name (default: all)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-c1", type=int, default=6)
    p.add_argument("--requests-c16", type=int, default=32)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()

    config = load_config(args.config)
    cache = Path(config.model_cache) if config.model_cache else None
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth, one core: {bandwidth:.1f} GB/s", flush=True)
    rows: list[Row] = []
    limits: dict[str, float] = {}
    notes: list[str] = []
    for tier in config.tiers:
        if args.tiers and tier.name not in args.tiers:
            continue
        os.environ.update(tier.deployment.env)
        model = resolve_model(tier.model, cache)
        limits[tier.name] = bandwidth * 1e9 / weight_bytes(model)
        for variant, config_variant in variants(tier):
            if args.variants and variant not in args.variants:
                continue
            variant_rows, described = asyncio.run(bench_variant(tier.name, variant, config_variant, model, cache, args))
            rows.extend(variant_rows)
            notes.append(f"- {tier.name} / {variant}: speculation {described}")
        notes.append(
            f"- {tier.name}: weights {weight_bytes(model) / 1e6:.0f} MB, bandwidth limit "
            f"{limits[tier.name]:.1f} tok/s for one stream"
        )
    result = table(rows, limits)
    print(result)
    if args.no_write:
        return
    doc = REPO / "docs" / "benchmarks" / "speculation-benchmark.md"
    doc.write_text(
        f"""# Speculative decoding benchmark

Measured by `python bench/speculation.py` on {time.strftime("%Y-%m-%d")}, {platform.machine()},
{os.cpu_count()} cores, no GPU; memory bandwidth of one core {bandwidth:.1f} GB/s (copy, read + write).
Each tier's own engine (the options, placement and speculation its deployment runs), greedy, up
to {args.max_tokens} tokens per answer; {args.requests_c1} requests at concurrency 1 and
{args.requests_c16} at concurrency 16 per workload, after a warm-up. `chat`: open questions;
`rag`: a context passage and a question whose answer quotes it.

- vs off: output tokens/s relative to the same tier without speculation, same workload and concurrency.
- acceptance: accepted / drafted tokens. tokens per step: what a verify step yields per sequence
  (accepted drafts + the target's own token).
- of bandwidth limit: single-stream tokens/s over (one core's memory bandwidth / the target's weight bytes).

{result}

{chr(10).join(notes)}

See docs/speculation.md for how to read this, set `disable_above_batch_size` or turn on `adaptive`.
"""
    )
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
