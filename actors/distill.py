"""Distil a small speculative-decoding draft from a target model, on CPU.

vLLM's draft/target speculative decoding proposes tokens with a cheap draft and verifies them with the
target; with greedy sampling a proposal is accepted exactly when it equals the target's own argmax. A
draft cut from the target's first layers agrees with it on only 2–15% of tokens, so `distill` trains one:

1. data: the target's own greedy completions of a built-in prompt set, from the real vLLM engine,
   with the target's top-k log-probabilities at every position;
2. draft: a `LlamaForCausalLM` with the target's config but `layers` decoder layers, copied from the
   target's first `layers - 1` and its last, plus the target's embeddings, final norm and tied head;
3. training of the decoder layers and final norm on the target's tokens for a time budget;
4. evaluation on prompts about held-out topics: greedy acceptance before and after training;
5. an atomic, checksummed write next to the target in the model cache (`draft_checkpoint_dir`),
   where the serving side looks for it, with a `tierserve-distill.json` report.

Held-out acceptance grows with the amount of data far more than with more epochs over it or with
richer supervision (full-vocabulary KL, matching hidden states), and on CPU a generated token costs
about as much as a trained one; so the defaults spend the budget roughly half on data, half on
training.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from tierserve.actors.checkpoints import (
    MANIFEST,
    draft_checkpoint_dir,
    is_prepared,
    publish_checkpoint,
    sha256_file,
    write_manifest,
)
from tierserve.core.embedder import native_bfloat16

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

REPORT = "tierserve-distill.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
"""Copied from the target: vLLM requires a draft to share its target's vocabulary."""

# The prompt set is tasks × topics; held-out prompts are whole topics that training never sees.
TEMPLATES = (
    "Explain {} in simple terms.",
    "Write a short poem about {}.",
    "Give me three practical tips about {}.",
    "What are the main advantages and disadvantages of {}?",
    "Write a short story that involves {}.",
    "Summarize the history of {} in one paragraph.",
    "List five interesting facts about {}.",
    "How would you explain {} to a ten-year-old?",
    "Write a tweet about {}.",
    "What are common misconceptions about {}?",
    "Write a short email to a friend about {}.",
    "Describe {} in three sentences.",
    "What questions should a beginner ask about {}?",
    "Compare {} with something from everyday life.",
    "Write a haiku about {}.",
    "Why does {} matter today?",
    "What is the future of {}?",
    "Give a step-by-step guide related to {}.",
    "Explain the science behind {}.",
    "Write a diary entry about {}.",
    "Write a dialogue between two friends about {}.",
    "Create a short quiz about {}.",
    "What careers are connected to {}?",
    "Give an analogy for {}.",
)
TOPICS = (
    "photosynthesis", "the solar system", "volcanoes", "machine learning", "coffee", "the French Revolution",
    "bicycles", "recycling", "honey bees", "chess", "the Internet", "climate change",
    "baking bread", "the human heart", "electric cars", "jazz music", "ocean tides", "vaccines",
    "ancient Rome", "gardening", "black holes", "cryptography", "rainforests", "the printing press",
    "sleep", "smartphones", "earthquakes", "the Olympic Games", "dinosaurs", "renewable energy",
    "origami", "the immune system", "volunteering", "public libraries", "the Moon", "mountain climbing",
    "spices", "robots", "friendship", "time management", "tea", "penguins",
    "the stock market", "glaciers", "photography", "the Vikings", "chocolate", "satellites",
)  # fmt: skip
HELD_OUT_EVERY = 8
"""Every eighth topic is held out: 42 topics train (1008 prompts), 6 evaluate (144 prompts)."""


def prompt_set(max_train: int | None = None) -> tuple[list[str], list[str]]:
    """The (train, held-out) prompts. Train prompts come in a fixed shuffled order, so the first
    `max_train` of them still mix topics and tasks; the held-out set never shrinks."""
    train, held_out = [], []
    for i, topic in enumerate(TOPICS):
        bucket = held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train
        bucket.extend(t.format(topic) for t in TEMPLATES)
    random.Random(0).shuffle(train)
    return train[:max_train], held_out


@dataclass
class Sample:
    """A chat prompt and the target's greedy completion of it."""

    prompt_ids: list[int]
    """The prompt with the chat template applied."""
    completion_ids: list[int]
    """The target's greedy tokens, ending with EOS unless cut at max_new_tokens."""
    top_ids: torch.Tensor
    """[len(completion_ids), k] the target's k most likely tokens at each completion position."""
    top_logprobs: torch.Tensor
    """[len(completion_ids), k] their log-probabilities."""


def generate_samples(
    target_dir: Path, prompts: Sequence[str], max_new_tokens: int, top_k: int, progress: bool
) -> list[Sample]:
    """The target's greedy completions of `prompts` from an in-process vLLM engine, which is gone
    before this returns: its processes would otherwise keep the cores that training needs. vLLM
    starts processes, so the calling script needs an `if __name__ == "__main__"` guard."""
    # Both are read when vLLM is imported: without a limit vLLM on CPU reserves most of the RAM for
    # KV cache, and its INFO logs would bury the progress bars.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(target_dir),
        # The target's answers as the tiers serve them: in bfloat16 this model's greedy answers drift
        # from the checkpoint's (docs/benchmarks/fidelity.md), and on CPUs without bfloat16
        # instructions torch emulates it several times slower.
        dtype="float32",
        max_num_seqs=32,
        max_model_len=1024,
        max_logprobs=top_k,
        # Starting eagerly saves more time (about a minute) than compiling gains on this little text.
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=top_k)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=progress)
    del llm
    gc.collect()

    samples = []
    for out in outputs:
        completion = out.outputs[0]
        ranked = [sorted(lp.items(), key=lambda kv: kv[1].rank)[:top_k] for lp in completion.logprobs]
        samples.append(
            Sample(
                prompt_ids=list(out.prompt_token_ids),
                completion_ids=list(completion.token_ids),
                top_ids=torch.tensor([[t for t, _ in r] for r in ranked]),
                top_logprobs=torch.tensor([[lp.logprob for _, lp in r] for r in ranked]),
            )
        )
    return samples


def init_layers(target_layers: int, layers: int) -> list[int]:
    """The target layers a `layers`-deep draft starts from: the first `layers - 1`, which read the
    embeddings as in the target, and the last, which writes what the final norm and head expect
    (it trains to higher acceptance than the next early layer would)."""
    if not 1 <= layers < target_layers:
        raise ValueError(
            f"layers must be between 1 and {target_layers - 1} (the target has {target_layers}), got {layers}"
        )
    return [*range(layers - 1), target_layers - 1]


def build_draft(target: LlamaForCausalLM, layer_ids: Sequence[int]) -> LlamaForCausalLM:
    """A model with the target's config and weights but only the decoder layers `layer_ids`."""
    import copy

    from transformers import LlamaForCausalLM

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layer_ids)
    draft = LlamaForCausalLM(config).to(target.dtype)
    renamed = {f"model.layers.{src}.": f"model.layers.{dst}." for dst, src in enumerate(layer_ids)}
    state = {}
    for key, value in target.state_dict().items():
        prefix = ".".join(key.split(".")[:3]) + "."
        if not key.startswith("model.layers."):
            state[key] = value
        elif prefix in renamed:
            state[renamed[prefix] + key[len(prefix) :]] = value
    draft.load_state_dict(state)
    return draft


@dataclass
class Batch:
    """Right-padded sequences and, flattened in row order, what each completion position must predict.
    No attention mask is needed: in a causal model the padding at the end never reaches the positions
    before it."""

    input_ids: torch.Tensor
    """[B, T] prompt + completion without its last token."""
    predicts: torch.Tensor
    """[B, T] bool: the positions whose next token is a completion token."""
    labels: torch.Tensor
    """[N] the target's greedy tokens."""
    top_ids: torch.Tensor
    """[N, k]"""
    top_logprobs: torch.Tensor
    """[N, k]"""


def make_batches(samples: Sequence[Sample], batch_sequences: int) -> list[Batch]:
    """Batches of `batch_sequences` samples of similar length, so that little of each is padding."""
    import torch

    ordered = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.completion_ids))
    batches = []
    for i in range(0, len(ordered), batch_sequences):
        group = ordered[i : i + batch_sequences]
        width = max(len(s.prompt_ids) + len(s.completion_ids) - 1 for s in group)
        input_ids = torch.zeros(len(group), width, dtype=torch.long)
        predicts = torch.zeros(len(group), width, dtype=torch.bool)
        for row, s in enumerate(group):
            ids = (s.prompt_ids + s.completion_ids)[:-1]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            predicts[row, len(s.prompt_ids) - 1 : len(ids)] = True
        batches.append(
            Batch(
                input_ids=input_ids,
                predicts=predicts,
                labels=torch.tensor([t for s in group for t in s.completion_ids]),
                top_ids=torch.cat([s.top_ids for s in group]),
                top_logprobs=torch.cat([s.top_logprobs for s in group]),
            )
        )
    return batches


def completion_logits(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """[N, vocab] logits at the completion positions only: the head is most of a small model's compute.

    The forward runs in bf16 autocast where the device computes bfloat16 (about twice as fast as fp32
    on CPUs with AVX512-BF16 or AMX; `core.embedder.native_bfloat16`) and in fp32 elsewhere, where
    torch would emulate it several times slower. Weights and optimiser state stay fp32, where
    AdamW's small updates are not rounded away.
    Autocast caches its bf16 copies of the weights until its block exits, so the block must end
    with each forward: one around a whole training loop would keep using the first step's weights."""
    import torch

    device = batch.input_ids.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=native_bfloat16(device)):
        hidden = model.model(input_ids=batch.input_ids).last_hidden_state
        return model.lm_head(hidden[batch.predicts])


def distill_loss(logits: torch.Tensor, batch: Batch, soft_weight: float) -> torch.Tensor:
    """(1 - w)·CE(target's greedy token) + w·CE(target's top-k, renormalised): the soft term also
    teaches the target's runners-up."""
    import torch.nn.functional as F

    logq = F.log_softmax(logits.float(), dim=-1)
    hard = -logq.gather(1, batch.labels[:, None]).mean()
    soft = -(F.softmax(batch.top_logprobs, dim=-1) * logq.gather(1, batch.top_ids)).sum(-1).mean()
    return (1 - soft_weight) * hard + soft_weight * soft


def greedy_acceptance(model: LlamaForCausalLM, batches: Sequence[Batch]) -> float:
    """Teacher-forced top-1 agreement with the target on its own greedy completions: the share of draft
    tokens that greedy speculative decoding accepts, given that every earlier one was accepted."""
    import torch

    agree = total = 0
    with torch.inference_mode():
        for batch in batches:
            agree += int((completion_logits(model, batch).argmax(-1) == batch.labels).sum())
            total += len(batch.labels)
    return agree / max(total, 1)


@dataclass(frozen=True)
class TrainSettings:
    """How the draft trains. The defaults come from sweeps of this code at the token budget that
    2 CPU cores reach in 10 minutes (docs/speculation.md)."""

    lr: float = 1e-3
    """Peak AdamW learning rate, warmed up, then cosine-decayed to zero at the end of the budget
    (3e-4 and 5e-4 train too slowly for the budget; 2e-3 is no better)."""
    batch_sequences: int = 8
    """Sequences per optimiser step: at equal tokens 16 trains worse, and 4, slightly better, runs
    slower per token on CPU."""
    soft_weight: float = 0.5
    """Weight of the top-k soft labels against the greedy tokens' (a small but steady gain)."""
    top_k: int = 20
    """Target log-probabilities kept per position (vLLM's default cap is 20)."""
    warmup_steps: int = 10


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0
    """Completion tokens trained on, repeats over epochs counted."""
    epochs: float = 0.0


def train(
    draft: LlamaForCausalLM,
    batches: Sequence[Batch],
    seconds: float,
    settings: TrainSettings,
    seed: int,
    progress: bool,
) -> TrainStats:
    """Train the draft's decoder layers and final norm for `seconds` of wall time. The embeddings, tied
    to the head, stay the target's: that saves their gradient, the costliest one, and keeps the draft's
    vocabulary space the target's."""
    import torch

    draft.train()
    draft.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    rng = random.Random(seed)
    stats = TrainStats()
    order: list[Batch] = []
    start = time.monotonic()
    with tqdm(total=round(seconds), unit="s", desc="train draft", disable=not progress) as bar:
        while (elapsed := time.monotonic() - start) < seconds:
            if not order:
                order = list(batches)
                rng.shuffle(order)
            batch = order.pop()
            # The schedule runs on time, not steps: how many steps a budget buys depends on the machine.
            warmup = min(1.0, (stats.steps + 1) / settings.warmup_steps)
            for group in optimiser.param_groups:
                group["lr"] = settings.lr * warmup * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
            loss = distill_loss(completion_logits(draft, batch), batch, settings.soft_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.tokens += len(batch.labels)
            bar.update(min(round(time.monotonic() - start), bar.total) - bar.n)
            bar.set_postfix(loss=f"{loss.item():.3f}", tokens=stats.tokens)
    stats.epochs = stats.steps / len(batches)
    draft.eval()
    return stats


@dataclass
class DistillReport:
    """What `distill` did; also written as `tierserve-distill.json` beside the draft."""

    target_dir: str
    target_sha256: str
    """SHA-256 of the target's weights file."""
    draft_dir: str
    layers: int
    init_layers: list[int]
    """The target layer each draft layer started from."""
    train_prompts: int
    held_out_prompts: int
    train_tokens: int
    """Completion tokens in the training data."""
    held_out_tokens: int
    tokens_trained: int
    """Completion tokens trained on, repeats over epochs counted."""
    steps: int
    epochs: float
    acceptance_before: float
    """Greedy acceptance on the held-out prompts of the untrained draft (the copied layers)."""
    acceptance_after: float
    settings: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per phase: generate, build, evaluate, train, write, total."""


def distill(
    target_dir: Path,
    out_dir: Path | None = None,
    *,
    layers: int = 4,
    minutes: float = 10.0,
    max_prompts: int | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    settings: TrainSettings = TrainSettings(),
) -> DistillReport:
    """Distil a `layers`-deep draft from the Llama-architecture checkpoint at `target_dir`, training for
    `minutes` on the target's greedy completions of the first `max_prompts` train prompts (all by
    default), and write it to `out_dir` (default `draft_checkpoint_dir(target_dir)`). An existing draft
    there is replaced only with `force`. Needs an `if __name__ == "__main__"` guard (vLLM starts
    processes)."""
    import torch
    from transformers import AutoModelForCausalLM

    target_dir = Path(target_dir)
    out_dir = Path(out_dir) if out_dir else draft_checkpoint_dir(target_dir)
    if is_prepared(out_dir) and not force:
        raise FileExistsError(f"{out_dir} already holds a draft; pass force=True (--force) to replace it")
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
    # Fail on bad arguments here, before the slow part.
    config = json.loads((target_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"distill needs a Llama-architecture target, {target_dir} is {config.get('model_type')!r}")
    layer_ids = init_layers(config["num_hidden_layers"], layers)

    clock = _PhaseClock()
    train_prompts, held_out_prompts = prompt_set(max_prompts)
    samples = generate_samples(target_dir, train_prompts + held_out_prompts, max_new_tokens, settings.top_k, progress)
    train_samples, held_out = samples[: len(train_prompts)], samples[len(train_prompts) :]
    clock.lap("generate")

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = build_draft(target, layer_ids)
    del target
    held_out_batches = make_batches(held_out, settings.batch_sequences)
    clock.lap("build")

    before = greedy_acceptance(draft, held_out_batches)
    clock.lap("evaluate")
    stats = train(draft, make_batches(train_samples, settings.batch_sequences), minutes * 60, settings, seed, progress)
    clock.lap("train")
    after = greedy_acceptance(draft, held_out_batches)
    clock.lap("evaluate")

    report = DistillReport(
        target_dir=str(target_dir),
        target_sha256=_weights_sha256(target_dir),
        draft_dir=str(out_dir),
        layers=layers,
        init_layers=layer_ids,
        train_prompts=len(train_samples),
        held_out_prompts=len(held_out),
        train_tokens=sum(len(s.completion_ids) for s in train_samples),
        held_out_tokens=sum(len(s.completion_ids) for s in held_out),
        tokens_trained=stats.tokens,
        steps=stats.steps,
        epochs=round(stats.epochs, 2),
        acceptance_before=round(before, 4),
        acceptance_after=round(after, 4),
        settings={**asdict(settings), "minutes": minutes, "max_new_tokens": max_new_tokens, "seed": seed},
    )

    def write(tmp: Path) -> None:
        draft.to(torch.bfloat16).save_pretrained(tmp)
        for name in TOKENIZER_FILES:  # after save_pretrained, whose generation_config is not the target's
            if (target_dir / name).is_file():
                shutil.copy2(target_dir / name, tmp / name)
        clock.lap("write")
        report.seconds = {**clock.seconds, "total": round(time.monotonic() - clock.started, 1)}
        (tmp / REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
        info = {"name": out_dir.name, "target": report.target_dir, "target_sha256": report.target_sha256}
        write_manifest(tmp, {**info, "dtype": "bfloat16"})

    publish_checkpoint(out_dir, write, replace=force)
    return report


class _PhaseClock:
    """Wall seconds per phase; a phase timed twice adds up."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 1)
        self._last = now


def _weights_sha256(checkpoint: Path) -> str:
    """The SHA-256 of a checkpoint's weights file, from its manifest when it has one."""
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())["files"].get("model.safetensors")
        if recorded:
            return recorded
    return sha256_file(checkpoint / "model.safetensors")
