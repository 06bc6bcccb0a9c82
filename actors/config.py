"""Config of a model tier and of the Serve deployment that runs it."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tierserve.core.config import DeploymentOptions
from tierserve.core.telemetry import TokenSpanSetting

EMBEDDED_PREFIX = "embedded:"
DISTILLED_PREFIX = "distilled:"


class AdaptiveSpeculationConfig(BaseModel):
    """Speculation only where it pays: the tier measures, per batch-size bucket, the tokens per
    second each stream gets with and without speculation, and turns k down to 0 where it does
    not pay (and back up where it does) on the running engine. `true` enables the defaults."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    probe_every_s: float = Field(20.0, gt=0)
    """How often a bucket re-measures the setting it is not using (load and traffic change)."""
    probe_steps: int = Field(24, ge=4)
    """Decode steps measured in each probe; also the window of the running estimates."""
    min_steps: int = Field(16, ge=1)
    """Decode steps a bucket measures on its starting setting before its first probe."""
    margin: float = Field(0.05, ge=0.0, lt=1.0)
    """A probe switches only if the other setting is faster by more than this fraction."""


class SpeculationConfig(BaseModel):
    """Speculative decoding of a tier, mapped onto vLLM's `speculative_config`.

    `draft_model`: a small model with the target's tokenizer proposes tokens that the target
    verifies in one forward pass. `ngram`: proposals are copied from earlier in the prompt
    (prompt lookup), which pays when answers quote their context (RAG, code edits).
    Greedy output is the same with or without speculation; only the speed changes.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["draft_model", "ngram"]
    model: str | None = None
    """The draft (draft_model only): a checkpoint directory or id, `embedded:<name>`, or
    `distilled:<embedded target>` for the draft `tierserve models distill` writes."""
    num_speculative_tokens: int = Field(3, ge=1, le=16)
    """Tokens proposed per step (k)."""
    prompt_lookup_min: int = Field(1, ge=1)
    """ngram: shortest suffix of the sequence looked up in the prompt."""
    prompt_lookup_max: int = Field(4, ge=1)
    """ngram: longest suffix looked up."""
    draft_tensor_parallel_size: int | None = Field(None, ge=1)
    """draft_model: ranks of the draft; vLLM 0.32's draft-model proposer takes only the target's
    tensor_parallel_size (the default when unset)."""
    disable_above_batch_size: int | None = Field(None, ge=1)
    """Load-aware speculation: vLLM proposes nothing in steps that run more sequences than this,
    where verifying drafts costs more compute than it saves (see docs/speculation.md)."""
    tokens_per_batch_size: list[tuple[int, int, int]] | None = None
    """vLLM's own schedule, `[(first_batch_size, last_batch_size, k), ...]`, for finer control
    than `disable_above_batch_size`; k may be 0."""
    adaptive: AdaptiveSpeculationConfig = Field(default_factory=AdaptiveSpeculationConfig)
    """Measure the payoff and switch speculation per batch size at run time (docs/speculation.md);
    the load rule above, if any, is where it starts."""
    fallback: Literal["ngram", "none"] = "ngram"
    """When a `distilled:` draft has not been distilled yet: serve with n-gram speculation
    (logged) or with none."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Further keys of vLLM's speculative config, passed untouched."""

    @field_validator("adaptive", mode="before")
    @classmethod
    def _adaptive_flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("tokens_per_batch_size")
    @classmethod
    def _vllm_schedule(cls, value: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        if value is not None and importlib.util.find_spec("vllm") is not None:
            from vllm.v1.spec_decode.dynamic.utils import validate_and_normalize_dynamic_sd_schedule

            validate_and_normalize_dynamic_sd_schedule(list(value))  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SpeculationConfig:
        if self.method == "draft_model" and not self.model:
            raise ValueError("method 'draft_model' needs `model`, the draft checkpoint")
        if self.method == "ngram" and self.model:
            raise ValueError("method 'ngram' takes no `model`")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        if self.disable_above_batch_size is not None and self.tokens_per_batch_size is not None:
            raise ValueError("set disable_above_batch_size or tokens_per_batch_size, not both")
        return self

    @property
    def distilled_target(self) -> str | None:
        """The embedded target's name when `model` is `distilled:<name>`."""
        if self.model and self.model.startswith(DISTILLED_PREFIX):
            return self.model[len(DISTILLED_PREFIX) :]
        return None


# Keys tierserve sets itself: the engine block must not set them a second time.
_ENGINE_KEYS_OWNED = {"tensor_parallel_size": "tensor_parallel_size", "speculative_config": "speculative"}


BUNDLED_TEMPLATES = {"chatml-tools": "templates/chatml-tools.jinja"}
"""Chat templates tierserve ships, by name, in `tierserve.configs`."""


class ToolsConfig(BaseModel):
    """A tier's tool calling (docs/tools.md); a tier without it refuses requests with tools."""

    model_config = ConfigDict(extra="forbid")

    parser: str = "hermes"
    """vLLM's tool-call parser for `tool_choice: auto` (`vllm serve --tool-call-parser` names)."""
    chat_template: str | None = None
    """A bundled template's name (`chatml-tools`: ChatML with Hermes-style `<tool_call>` tags), a
    path to a Jinja file, or None for the model's own template (it must render `tools`)."""

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is not None and value not in BUNDLED_TEMPLATES and not value.endswith((".jinja", ".j2")):
            raise ValueError(f"a bundled template ({', '.join(BUNDLED_TEMPLATES)}) or a path to a .jinja file")
        return value

    def template_text(self) -> str | None:
        if self.chat_template is None:
            return None
        if (bundled := BUNDLED_TEMPLATES.get(self.chat_template)) is not None:
            return resources.files("tierserve.configs").joinpath(*bundled.split("/")).read_text()
        return Path(self.chat_template).read_text()

    def parser_class(self) -> Any:
        """vLLM's parser class; raises `ValueError` for a name vLLM does not know."""
        from vllm.tool_parsers import ToolParserManager

        try:
            return ToolParserManager.get_tool_parser(self.parser)
        except KeyError:
            known = ", ".join(sorted(ToolParserManager.list_registered()))
            raise ValueError(f"unknown tool-call parser {self.parser!r}; vLLM has: {known}") from None


class TierConfig(BaseModel):
    """One model tier: a model, the vLLM options to run it, and its Serve deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48)
    """Tier name; clients may send it as `model`."""
    model: str
    """`embedded:<name>` for a checkpoint tierserve prepares itself, a local checkpoint directory,
    or a model id the engine can load."""
    description: str = ""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Passed untouched to vLLM's `AsyncEngineArgs` (max_model_len, dtype, tensor_parallel_size, ...)."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """Most tokens one choice may generate on this tier: a request asking for more is refused
    with a 400, one that does not say gets at most this many. None: whatever the context allows."""
    stream_interval_ms: float = Field(0.0, ge=0, le=1000)
    """Chunks of a stream are sent to the ingress at most this often; the first goes at once and
    whatever piled up meanwhile travels as one message. 0 sends as fast as the consumer takes them."""
    accelerator: Literal["cpu", "gpu"] = "cpu"
    """Where the engine runs. `gpu`: each tensor-parallel rank reserves one GPU as a bundle of the
    replica's placement group. `cpu`: ranks are worker processes bound to cores of the node."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Ranks the model is sharded over (vLLM's tensor_parallel_size)."""
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    """gpu: Ray placement-group strategy of the replica's rank bundles (STRICT_PACK: one node)."""
    speculative: SpeculationConfig | None = None
    """Speculative decoding; None decodes one token per step."""
    tools: ToolsConfig | None = None
    """Tool calling (docs/tools.md): the chat template that renders tools and the tool-call
    parser for `tool_choice: auto`; None: requests with tools go to other tiers."""
    token_spans: TokenSpanSetting | None = None
    """This tier's own `telemetry.token_spans` (a span per token: all, none, or one in N)."""
    engine_restarts: int = Field(3, ge=0, le=100)
    """Deaths of its engine a replica recovers from by starting a new engine in place, without a
    new process (docs/reliability.md); past them, or with 0, its health check fails and Serve
    replaces the replica."""
    engine_restart_timeout_s: float = Field(600.0, gt=0)
    """An in-place engine restart that takes longer fails the replica's health check."""
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _consistent(self) -> TierConfig:
        for key, field in _ENGINE_KEYS_OWNED.items():
            if key in self.engine:
                raise ValueError(f"engine.{key} is set by the tier's `{field}` field; set it there")
        if self.accelerator == "gpu" and self.deployment.num_gpus:
            raise ValueError(
                "accelerator 'gpu' reserves one GPU per tensor-parallel rank itself; leave deployment.num_gpus at 0"
            )
        if self.accelerator == "gpu" and self.deployment.max_replicas_per_node is not None:
            raise ValueError(
                "deployment.max_replicas_per_node is not for accelerator 'gpu': a replica is a placement group, "
                "and its GPUs bound the replicas per node"
            )
        if self.accelerator == "cpu" and self.deployment.num_cpus < self.tensor_parallel_size:
            raise ValueError(
                f"on CPU each tensor-parallel rank gets its own core: deployment.num_cpus "
                f"({self.deployment.num_cpus:g}) must be at least tensor_parallel_size ({self.tensor_parallel_size})"
            )
        draft_tp = self.speculative.draft_tensor_parallel_size if self.speculative else None
        if draft_tp not in (None, self.tensor_parallel_size):
            raise ValueError(
                f"speculative.draft_tensor_parallel_size must equal tensor_parallel_size "
                f"({self.tensor_parallel_size}), got {draft_tp}: vLLM's draft-model proposer shards the draft "
                "like the target (it refuses other sizes at start-up); leave it unset"
            )
        return self

    @property
    def embedded_name(self) -> str | None:
        """The embedded model's name when `model` is `embedded:<name>`."""
        if self.model.startswith(EMBEDDED_PREFIX):
            return self.model[len(EMBEDDED_PREFIX) :]
        return None
