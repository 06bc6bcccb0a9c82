"""Config of the ingress deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from tierserve.core.config import DeploymentOptions


class RequestLimits(BaseModel):
    """What one request may ask for. The ingress checks these before anything else runs on the
    request (routing, guards, retrieval, tokenization), so their cost is bounded; a request over
    one is refused with the limit's name and the field (413 for the body, else 400
    `limit_exceeded`). Defaults fit the shipped tiers' context windows with room to spare."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Bytes of an HTTP request body."""
    max_messages: int = Field(512, ge=1)
    """Messages in one chat request."""
    max_prompt_chars: int = Field(131_072, ge=1)
    """Characters of a request's text: all its messages' contents together, or the prompt. The
    default holds a 32k-token context of English; the input guards' time grows with it
    (docs/benchmarks/guard-adversarial.md), so set it near the largest tier's context."""
    max_prompt_token_ids: int = Field(131_072, ge=1)
    """Token ids of a completion prompt given as ids."""
    max_stop: int = Field(16, ge=0)
    """Stop sequences (`stop`)."""
    max_stop_chars: int = Field(256, ge=1)
    """Characters of one stop sequence."""
    max_stop_token_ids: int = Field(64, ge=0)
    """Token ids in `stop_token_ids`."""
    max_logit_bias: int = Field(300, ge=0)
    """Tokens in `logit_bias`."""
    max_embedding_inputs: int = Field(2048, ge=1)
    """Texts in one `POST /v1/embeddings` request (OpenAI's limit); `max_prompt_chars` bounds
    their characters together."""
    max_schema_chars: int = Field(32_768, ge=2)
    """Characters of `response_format.json_schema.schema` (as compact JSON): the tier's engine
    compiles it into a grammar, which takes time and memory that grow with it."""
    max_tools: int = Field(128, ge=0)
    """Functions in a chat request's `tools` (OpenAI's limit)."""
    max_tools_chars: int = Field(65_536, ge=2)
    """Characters of the `tools` together (as compact JSON): they are rendered into the prompt,
    and a required or named call compiles their parameters into a grammar."""


class FailedAuthLimit(BaseModel):
    """How many failed authentications one client address may make in a window before it is
    refused with 429 `too_many_failed_authentications` (its keys are not checked) until the
    window ends: guessing keys is slowed to this rate."""

    model_config = ConfigDict(extra="forbid")

    max_failures: int = Field(10, ge=1)
    window_s: float = Field(60.0, gt=0)
    max_clients: int = Field(10_000, ge=1)
    """Client addresses remembered at once (the oldest are forgotten first): bounded memory."""


class AuthConfig(BaseModel):
    """Who may call: API keys checked at the ingress (docs/security.md). Off only in the
    embedded config (a warning at start); `tierserve deploy render` turns it on."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Require `Authorization: Bearer <key>` on every route but `/health` (and `api_key=` on
    handle calls); the admin routes (`/v1/tiers`, `/v1/indexes`, `/docs`, `/openapi.json`)
    need a key with the admin scope."""
    store: str | None = None
    """The key store (SQLite file) that `tierserve keys` writes and the ingress reads; default
    `<model cache>/auth/keys.db`. Every ingress replica must see the same file."""
    secret_env: str = "TIERSERVE_AUTH_SECRET"
    """The environment variable holding the server secret that keys are hashed with (HMAC);
    when it is unset, the secret is read from `secret_file`."""
    secret_file: str | None = None
    """The server secret's file; default `keys.secret` beside the store, created (mode 0600) by
    the first `tierserve keys create` or ingress start that finds none."""
    refresh_s: float = Field(2.0, gt=0)
    """How often the ingress rereads the store (revocations, new keys) and records the usage
    that budgets count: a revoked key stops working within this time."""
    failed: FailedAuthLimit = Field(default_factory=FailedAuthLimit)
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)
    """Load balancers in front of Serve's proxy (IP networks): behind them the caller's address,
    which failed authentications are counted by and the audit line names, is the last one in
    `X-Forwarded-For` that is not theirs. Empty: the TCP peer, whatever the headers say."""
    audit: bool = True
    """One JSON line per request: key id, tier, reason, tokens, cost, latency, guard findings by
    type, outcome, a keyed hash of the prompt; never its text."""
    audit_log: str | None = None
    """Where the audit lines go: a file (appended, mode 0600, each line written through: reopen
    it after rotating), `stderr` (the replica process's own, for a log collector), or None:
    `audit.jsonl` beside the key store."""


class IngressConfig(BaseModel):
    """The OpenAI-compatible front door."""

    model_config = ConfigDict(extra="forbid")

    limits: RequestLimits = Field(default_factory=RequestLimits)
    """Bounds on one request (checked first, before any work is spent on it)."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys, per-key limits and the audit log (docs/security.md)."""

    default_tier: str | None = None
    """The tier `model: auto` goes to; the first tier when unset."""
    health_timeout_s: float = Field(5.0, gt=0)
    """How long `GET /health` (and each tier's part of `GET /v1/tiers`) waits for the tier's answer."""
    retriever_timeout_s: float = Field(10.0, gt=0)
    """How long a call to the retriever (search, grounding, the index list) may take: a search
    past it fails the request with 504 `retriever_timeout`, a grounding past it goes without a score."""
    replicas_poll_interval_s: float = Field(2.0, gt=0)
    """How often the ingress reads each tier's replicas from Serve's controller: a tier with no
    running replica (its node is gone, it is restarting, it is starting) is skipped until one
    runs again. While some tier has none, the ingress reads every `routing.poll_interval_s`
    instead, so a tier that comes up is served within a fraction of a second."""
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.5, max_ongoing_requests=256)
    )


class SlaClass(BaseModel):
    """A named latency budget; a missing bound means 'no budget' for that measure."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(None, gt=0)
    """Time to first token, as the client sees it at the ingress."""
    tpot_ms: float | None = Field(None, gt=0)
    """Mean time per output token after the first."""
    priority: int = 0
    """The requests' priority on tiers whose engine schedules by priority (`engine:
    {scheduling_policy: priority}`): lower values take a free slot first (vLLM's convention);
    the router's queue predictions count only the requests that would go ahead."""


def _default_sla_classes() -> dict[str, SlaClass]:
    return {
        "interactive": SlaClass(ttft_ms=1000, tpot_ms=100, priority=0),
        "standard": SlaClass(ttft_ms=3000, tpot_ms=250, priority=1),
        "batch": SlaClass(priority=2),
    }


class TierCost(BaseModel):
    """What a tier costs to run, in any currency unit, per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)

    def of(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6


class TierRouting(BaseModel):
    """How the router treats one tier."""

    model_config = ConfigDict(extra="forbid")

    min_complexity: float = Field(0.0, ge=0, le=1)
    """The tier is the complexity choice for scores from here up to the next tier's threshold;
    tiers are ranked weakest to strongest by this value (`tierserve router calibrate`)."""
    cost: TierCost = Field(default_factory=TierCost)
    max_queue: int = Field(32, ge=0)
    """Requests the router lets wait for this tier beyond its engine's slots; more are shed."""


class ComplexityConfig(BaseModel):
    """How a prompt's complexity score in [0, 1] is computed (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["heuristic", "classifier"] = "heuristic"
    """`heuristic`: cheap text features only (~0.1 ms); `classifier`: a logistic regression on
    sentence embeddings plus those features, trained on `dataset` at first start (a few ms)."""
    dataset: str | None = None
    """Labelled prompts (JSON lines); default the bundled configs/complexity/prompts.jsonl."""
    embedder: str | None = None
    """Sentence-transformers model for `classifier`: a local path; default all-MiniLM-L6-v2."""
    embed_tokens: int = Field(48, ge=8, le=512)
    """Tokens of the prompt the embedder reads (its start and end; the cheap features read all
    of it): the embedding's cost grows with it (docs/benchmarks/routing-quality.md)."""
    embed_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """The embedder's weights: bfloat16 is about twice as fast on CPUs with bf16 instructions
    (AVX512-BF16, AMX); where the CPU has none the embedder uses float32 (`core.embedder.native_bfloat16`)."""


class RoutingConfig(BaseModel):
    """Routing of `model: auto` requests by prompt complexity and latency budget, fallback
    across tiers and load shedding (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    tiers: dict[str, TierRouting] = Field(default_factory=dict)
    """Per tier, by name. With none listed, `auto` goes to `ingress.default_tier` whatever the
    prompt, and budgets, fallback and shedding still apply."""
    complexity: ComplexityConfig = Field(default_factory=ComplexityConfig)
    sla_classes: dict[str, SlaClass] = Field(default_factory=_default_sla_classes)
    default_sla_class: str | None = "standard"
    """The budget of a request that names none; None: no budget."""
    slo_headroom: float = Field(0.8, gt=0, le=1)
    """A tier counts as meeting a budget when its predicted TTFT and TPOT are within this share
    of it, and its predicted TPOT within this share of the tightest TPOT budget of the requests
    already running there (one more request must not push theirs over)."""
    shed_over_budget: float | None = Field(3.0, gt=0)
    """Shed (429, `Retry-After`) a request that every tier is predicted to keep waiting for its
    first token more than this many times its TTFT budget: under overload, the requests admitted
    can still be answered in time. Below 1 it leaves a margin for the prediction's error (a
    prediction just within the budget is as likely to be late as early). None: serve such
    requests best effort. Requests without a TTFT budget (the `batch` class) are shed only by
    `max_queue`."""
    ttft_feedback: bool = False
    """Correct each tier's predicted TTFT by the first tokens the ingress has measured against
    the step-cost model's predictions lately (`TtftFit`, docs/routing.md): the model sees only
    the engine's queue and steps, not the input guards, the ingress's own queue or cores shared
    with other processes, so without it the router admits requests it cannot answer in time
    (`bench/overload.py --rate` on 2 cores: docs/reliability.md). On in configs/local.yaml,
    where it was measured; off by default until it is measured on a GPU cluster, where the
    model leaves less out."""
    shed_over_tpot_budget: float | None = Field(None, ge=1)
    """Shed (429, `Retry-After`) a request that every tier is predicted to stream at more than
    this many times its TPOT budget a token. None (the default): serve it best effort. Under deep
    overload the router otherwise admits everything and every request misses (measured in the
    routing simulator, docs/routing-simulation.md); on hardware that cannot hold the budgets even lightly loaded it
    would refuse most requests, so it is off unless configured (configs/gpu.yaml: 1.5)."""
    best_effort: Literal["first_token", "fit"] = "first_token"
    """How tiers are ordered when none is predicted to meet a request's budget: the earliest
    predicted first token first, or `fit`: a tier that meets the request's own budget (the
    slowest such) before one that does not, then the one closest to the budget
    (tierserve.router.policy)."""
    tpot_counts_prefill: bool = False
    """Predict a tier's time per token with the prompt tokens it prefills per step beside the
    decoding (vLLM's chunked prefill): without them the routing simulator's 8B tier streamed a
    third slower than predicted at the median (docs/routing-simulation.md, "Predictions")."""
    poll_interval_s: float = Field(0.25, gt=0)
    """How often the router reads each tier's load and latency model."""
    first_token_timeout_s: float | None = Field(60.0, gt=0)
    """A tier that has not sent the first token by then is given up on; the next choice is
    tried (a `model: auto` request) or the request fails with 504."""
    request_timeout_s: float | None = Field(None, gt=0)
    """The whole request; None: as long as it takes (the HTTP proxy's own timeout still applies)."""
    max_attempts: int = Field(3, ge=1)
    """Tiers tried per request, the first choice included."""

    @model_validator(mode="after")
    def _default_class(self) -> RoutingConfig:
        if self.default_sla_class is not None and self.default_sla_class not in self.sla_classes:
            known = ", ".join(self.sla_classes) or "none"
            raise ValueError(f"default_sla_class {self.default_sla_class!r} is not one of the sla_classes ({known})")
        return self
