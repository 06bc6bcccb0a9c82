"""Config of the guard chain (`safety:` in the config file; docs/safety.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tierserve.safety.types import Action, Stage

DEFAULT_PII_ENTITIES = [
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
    "URL",
    "SECRET_KEY",
]


class NerConfig(BaseModel):
    """A named-entity model for PERSON, LOCATION and the like, where the deployment has one."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["spacy", "transformers"]
    model: str
    """A spaCy package or directory (`en_core_web_lg`), or a transformers token-classification
    model directory."""


class PiiGuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["pii"] = "pii"
    name: str = "pii"
    actions: dict[Stage, Action] = Field(
        default_factory=lambda: {"input": "redact", "retrieved": "redact", "output": "redact"}
    )
    """What to do with findings at each stage; a stage left out is not checked."""
    entities: list[str] = Field(default_factory=lambda: list(DEFAULT_PII_ENTITIES))
    """Presidio entity types to look for (and tierserve's own recognizers' types)."""
    score_threshold: float = Field(0.5, ge=0, le=1)
    operator: Literal["replace", "mask", "hash"] = "replace"
    """replace: `<EMAIL_ADDRESS>`; mask: `****` of the same length; hash: a salted SHA-256 prefix,
    the same for the same value within a deployment."""
    ner: NerConfig | None = None
    """None: pattern, checksum and context recognizers only (no model, works offline)."""


class InjectionGuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["injection"] = "injection"
    name: str = "injection"
    actions: dict[Stage, Action] = Field(default_factory=lambda: {"input": "block", "retrieved": "block"})
    """Injected instructions in a request refuse it; in a retrieved chunk they drop the chunk."""
    threshold: float = Field(0.5, ge=0, le=1)
    """Classifier probability at or above which a text counts as an injection attempt."""
    mode: Literal["heuristic", "classifier"] = "classifier"
    dataset: str | None = None
    """Labelled examples to train on (JSON lines); None: the bundled configs/safety/injection.jsonl."""
    embedder: str | None = None
    """A local sentence-transformers directory; None: all-MiniLM-L6-v2."""


GuardConfig = Annotated[PiiGuardConfig | InjectionGuardConfig, Field(discriminator="type")]


class SafetyConfig(BaseModel):
    """The guard chain, run in the ingress at each stage in the order listed."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    guards: list[GuardConfig] = Field(default_factory=lambda: [PiiGuardConfig(), InjectionGuardConfig()])
    overlap_input_checks: bool = True
    """Guards that can only refuse a request (action `block`, or `allow`, on input; the
    injection guard) run while the request's passages are retrieved and its prompt prefilled: its first
    token is released only once they pass, and a refusal aborts the tier's request and answers
    the same 400 as before. Their time then adds to time to first token only where it exceeds
    it. Guards that redact input run first either way: the tier must see their text. False:
    the refusing guards finish before retrieval and the tier start."""
    timeout_s: float = Field(5.0, gt=0)
    """How long one guard call may take (a stage of one request, or one streamed batch of an
    answer). Past it the guards have not decided, so the request fails closed: a 503
    `guard_timeout` before the answer starts, a `content_filter` ending after."""
    token_id_prompts: Literal["refuse", "unchecked"] = "refuse"
    """A completion prompt sent as token ids has no text for the input guards: `refuse` answers
    it with a 400 while any input guard is on (a guard that cannot decide refuses);
    `unchecked` lets it through unguarded (the answer is still guarded as it streams)."""
