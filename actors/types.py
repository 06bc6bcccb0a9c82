"""Messages between the ingress and a tier: one generate request in, a stream of token chunks out.

They are plain slotted dataclasses because they cross a Ray boundary per request (and chunks
per few tokens): cheap to pickle, typed, and free of HTTP or OpenAI shapes. Field names follow
vLLM's `SamplingParams`, which follow OpenAI's, so values pass straight through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierserve.core.types import ChatMessage, ToolCall


@dataclass(slots=True)
class StructuredOutput:
    """A form the answer must take, enforced while decoding (vLLM's structured outputs): the
    engine only samples tokens that keep the text a prefix of a valid answer."""

    json_schema: str | None = None
    """A JSON Schema, as JSON text: the answer is a JSON value valid against it."""
    json_object: bool = False
    """The answer is a JSON object, of any shape."""


@dataclass(slots=True)
class ToolCalling:
    """The functions a chat request offers the model, and how it may call them. The tier renders
    them into the prompt with its tool chat template and reads the calls from the answer."""

    tools: list[dict[str, Any]]
    """OpenAI's function tools (`{"type": "function", "function": {...}}`), as the template reads them."""
    choice: str = "auto"
    """`auto` (the tier's tool-call parser reads the text), `required` (decoding writes a list
    of `{name, parameters}`), `function` (decoding writes the arguments of `function`), or
    `none` (no call: the tools stay out of the prompt)."""
    function: str | None = None
    parallel: bool = True
    """Whether one answer may make several calls."""


@dataclass(slots=True)
class SamplingOptions:
    """Sampling parameters, named as in vLLM's `SamplingParams`."""

    max_tokens: int | None = None
    """Cap on generated tokens per choice; None means 'up to the context window'."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) disables top-k."""
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias added to its logit (OpenAI's `logit_bias`); ids past the tier's vocabulary are a 400."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives; None returns none."""
    min_tokens: int = 0
    ignore_eos: bool = False
    structured: StructuredOutput | None = None
    """The form the answer must take; None: free text."""


@dataclass(slots=True)
class GenerateRequest:
    """What a tier needs to run one request. Exactly one of prompt / messages / prompt_token_ids."""

    request_id: str
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    """Chat turns, rendered with the tier model's own chat template."""
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C trace context carrier, so spans in the tier join the caller's trace."""
    tools: ToolCalling | None = None
    """Functions the model may call (chat only)."""
    priority: int = 0
    """vLLM's request priority: on an engine with `scheduling_policy: priority`, lower values
    take a free slot first (and keep their KV cache when a lower priority must give way);
    ignored by a first-come-first-served engine."""


@dataclass(slots=True)
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of one sampled token and the top alternatives at that position."""

    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class SpeculationStats:
    """Speculative-decoding counts, for one request or a whole tier.

    A verify step checks `k` drafted tokens and keeps the accepted prefix plus one token of the
    target's own, so a step yields `mean_accepted_length` tokens instead of one.
    """

    method: str
    num_speculative_tokens: int
    """k, the most tokens drafted per step."""
    steps: int = 0
    """Verify steps that checked at least one drafted token."""
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step yields on average: accepted drafts plus the target's own token."""
        return 1.0 + self.accepted_tokens / self.steps if self.steps else 1.0

    def add(self, steps: int, draft_tokens: int, accepted_tokens: int) -> None:
        self.steps += steps
        self.draft_tokens += draft_tokens
        self.accepted_tokens += accepted_tokens

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "method": self.method,
            "num_speculative_tokens": self.num_speculative_tokens,
            "steps": self.steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
        }


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    speculation: SpeculationStats | None = None
    """This request's speculative decoding, when its tier speculates."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class TokenChunk:
    """New output of one choice since its previous chunk."""

    index: int
    """Choice index (0..n-1)."""
    text: str
    token_ids: list[int]
    step: int
    """How many engine outputs this request had received when this one came (1 = first)."""
    finish_reason: str | None = None
    """'stop', 'length', 'tool_calls' or 'abort' on the choice's last chunk."""
    stop_reason: str | int | None = None
    """The stop string or token id that ended the choice, if one did."""
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None
    """Set on the request's very last chunk only."""
    tool_calls: list[ToolCall] | None = None
    """The choice's function calls, whole, on its last chunk; `text` then carries only what the
    model wrote besides them."""


@dataclass(slots=True)
class SpeculationBucket:
    """Adaptive speculation in one batch-size range: what it measured and what it chose."""

    first_batch_size: int
    last_batch_size: int
    num_speculative_tokens: int
    """k in force for these batch sizes now (0: no drafting)."""
    speculating_tokens_per_s: float | None = None
    """Tokens per second per stream in decode steps with drafting (decayed estimate)."""
    plain_tokens_per_s: float | None = None
    """The same with k = 0."""
    speculating_steps: int = 0
    plain_steps: int = 0
    probes: int = 0
    switches: int = 0
    reason: str = "starting setting"

    @property
    def payoff(self) -> float | None:
        """Speculating / plain speed: above 1 speculation pays at this load."""
        if not self.speculating_tokens_per_s or not self.plain_tokens_per_s:
            return None
        return self.speculating_tokens_per_s / self.plain_tokens_per_s

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "first_batch_size": self.first_batch_size,
            "last_batch_size": self.last_batch_size,
            "num_speculative_tokens": self.num_speculative_tokens,
            "speculating_tokens_per_s": rounded(self.speculating_tokens_per_s),
            "plain_tokens_per_s": rounded(self.plain_tokens_per_s),
            "payoff": rounded(self.payoff),
            "speculating_steps": self.speculating_steps,
            "plain_steps": self.plain_steps,
            "probes": self.probes,
            "switches": self.switches,
            "reason": self.reason,
        }


@dataclass(slots=True)
class TierInfo:
    """What a tier tells the ingress about itself."""

    name: str
    model: str
    """The model path or id the engine loaded."""
    max_model_len: int
    tensor_parallel_size: int = 1
    max_completion_tokens: int | None = None
    speculation: str | None = None
    """How the tier speculates ('draft_model <path>', 'ngram'), None when it does not."""
    tool_parser: str | None = None
    """The tool-call parser of a tier that serves tools; None when it serves none."""


@dataclass(slots=True)
class TierStats:
    """Counters of one tier replica since it started."""

    running: int
    started: int
    finished: int
    aborted: int
    """Requests whose caller went away before they finished, aborted in the engine."""
    failed: int
    steps: int = 0
    """Engine steps that produced tokens."""
    generation_tokens: int = 0
    mean_batch_size: float = 0.0
    """Sequences running per engine step, averaged over steps."""
    mean_step_ms: float = 0.0
    """Time per engine step while the engine is busy: with tokens per step, what a step costs."""
    speculation: SpeculationStats | None = None
    speculation_control: list[SpeculationBucket] | None = None
    """Adaptive speculation per batch-size bucket; None when the tier does not adapt."""
    kv_cache_usage: float = 0.0
    """Share of the engine's KV-cache blocks in use after its last step (blocks that only
    hold reusable prefix-cache entries count as free)."""


@dataclass(slots=True)
class TierLoad:
    """A replica's load and latency model, polled by the router a few times a second.

    A step costs `step_ms_base + step_ms_per_seq * sequences + step_ms_per_kprompt * prefill
    tokens / 1000` (fitted to the engine's own steps, see `tierserve.actors.latency`)."""

    running: int
    """Requests the engine is serving (prefilling or decoding)."""
    waiting: int
    """Requests queued in the engine's scheduler for a slot."""
    max_num_seqs: int
    """Sequences the engine batches at most: its slots."""
    max_model_len: int
    step_ms_base: float
    step_ms_per_seq: float
    step_ms_per_kprompt: float
    tokens_per_step: float = 1.0
    """Tokens a sequence gets per decode step; above 1 when speculation is accepted."""
    mean_output_tokens: float | None = None
    """Recent requests' output length (decayed mean)."""
    prefill_tokens_per_step: float = 0.0
    """Prompt tokens the engine recently prefilled per step (decayed mean over all steps): the
    share of each step that other requests' prefills take from decoding."""
    ttft_ms: float | None = None
    """Time to first token the engine recently delivered (decayed mean)."""
    tpot_ms: float | None = None
    """Time per output token the engine recently delivered (decayed mean)."""
    step_samples: int = 0
    """Engine steps the step-cost fit has seen; 0 means it is still the prior."""
    priority_scheduling: bool = False
    """The engine orders its queue by request priority (vLLM `scheduling_policy: priority`)."""
    at: float = 0.0
    """When this was measured (Unix time)."""
    unavailable: str | None = None
    """Why the replica's engine cannot serve now (dead, restarting); None when it can. The
    router counts such a poll as a failure of the tier, never as a sign of health."""

    def step_ms(self, sequences: int, prefill_tokens: int = 0) -> float:
        return self.step_ms_base + self.step_ms_per_seq * sequences + self.step_ms_per_kprompt * prefill_tokens / 1000
