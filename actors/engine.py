"""The vLLM engine behind a tier: typed requests in, typed token chunks out.

`VLLMEngine` owns one `vllm.v1.engine.async_llm.AsyncLLM`. It renders prompts with the model's
own tokenizer and chat template, checks them against the context window, maps sampling options
onto `SamplingParams` in DELTA mode, and turns each `RequestOutput` into `TokenChunk`s. It knows
nothing of Ray, HTTP or routing, so it can be driven directly (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from tierserve.actors.adaptive import AdaptiveSpeculation
from tierserve.actors.config import AdaptiveSpeculationConfig, ToolsConfig
from tierserve.actors.errors import STRUCTURED_PARAM, context_error, request_error
from tierserve.actors.latency import LatencyTracker
from tierserve.actors.speculation import ResolvedSpeculation, StepRecorder, request_speculation
from tierserve.actors.tools import ToolSupport, uses_tools
from tierserve.actors.types import (
    GenerateRequest,
    SamplingOptions,
    StructuredOutput,
    TierLoad,
    TierStats,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tierserve.actors.vllm_fixes import log_handlers_kept
from tierserve.core.errors import InvalidRequest, ServiceUnavailable, TierServeError
from tierserve.core.streams import Outcome, outcome_of

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput

logger = logging.getLogger(__name__)


def unknown_engine_options(options: dict[str, Any]) -> list[str]:
    """Keys of `options` that vLLM's `AsyncEngineArgs` does not have."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    return sorted(set(options) - known - {"model"})


def structured_outputs(structured: StructuredOutput | None) -> Any:
    """vLLM's `StructuredOutputsParams` for the answer's form; None for free text. The engine's
    `structured_outputs_config` picks the backend (xgrammar, else guidance, by default)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.json_schema is not None:
        return StructuredOutputsParams(json=structured.json_schema)
    return StructuredOutputsParams(json_object=True)


def _step_logger_factory(on_step: Callable[[Any, Any], None]) -> Any:
    """A vLLM stat-logger factory calling `on_step(scheduler_stats, iteration_stats)` once per
    engine step (vLLM calls it from its output-handler task, on the engine's event loop).

    An exception from `on_step` is logged and goes no further: raised into vLLM's output
    handler it would kill the engine, and with it every request on the tier, for bookkeeping
    (the step-cost fit once did, on a singular matrix). The first failure is logged with its
    traceback, then one in `LOG_EVERY`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepLogger(StatLoggerBase):
        LOG_EVERY = 1000

        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.failures = 0

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
            try:
                on_step(scheduler_stats, iteration_stats)
            except Exception:
                if self.failures % self.LOG_EVERY == 0:
                    logger.exception("engine step bookkeeping failed (%d times so far)", self.failures + 1)
                self.failures += 1

        def log_engine_initialized(self) -> None:
            pass

    return StepLogger


class VLLMEngine:
    """One vLLM `AsyncLLM` plus the request bookkeeping a tier reports."""

    def __init__(
        self,
        model: str,
        options: dict[str, Any] | None = None,
        speculation: ResolvedSpeculation | None = None,
        max_completion_tokens: int | None = None,
        adaptive: AdaptiveSpeculationConfig | None = None,
        tools: ToolsConfig | None = None,
    ):
        self.model = model
        self.tools_config = tools
        self._tools: ToolSupport | None = None
        """Built in `start`, with the tokenizer."""
        self.options = dict(options or {})
        self.max_completion_tokens = max_completion_tokens
        self.speculation = speculation
        """How `options["speculative_config"]` speculates, for the counters; None when it does not."""
        if speculation is not None:
            self.options.setdefault("per_request_spec_decode_metrics", "summary")
        self._steps = StepRecorder(speculation)
        self.latency = LatencyTracker(int(self.options.get("max_num_seqs") or 256))
        """Step costs and delivered latency, for the router (`load()`)."""
        self._adaptive = adaptive if speculation is not None and adaptive is not None and adaptive.enabled else None
        self._control: AdaptiveSpeculation | None = None
        """Built in `start`, once the engine's schedule is known."""
        self._push_task: asyncio.Task | None = None
        self._push_again = False
        self._llm: Any = None
        self._tokenizer: Any = None
        self.max_model_len = 0
        self._running = 0
        self._waiting = 0
        self._kv_cache_usage = 0.0
        self._started = 0
        self._finished = 0
        self._aborted = 0
        self._failed = 0

    def start(self) -> None:
        """Build the engine: loads weights and starts the engine-core process (slow)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.model, **self.options)
        with log_handlers_kept():  # vLLM reconfigures logging here, closing Serve's log handler
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_step_logger_factory(self._on_step)])
        self.latency.max_num_seqs = llm.vllm_config.scheduler_config.max_num_seqs
        self.latency.priority_scheduling = llm.vllm_config.scheduler_config.policy == "priority"
        self._tokenizer = llm.get_tokenizer()
        if self.tools_config is not None:
            self._tools = ToolSupport(self.tools_config, self._tokenizer)
        self.max_model_len = llm.model_config.max_model_len
        if self._adaptive is not None:
            self._control = AdaptiveSpeculation(
                self._adaptive, self.speculation.num_speculative_tokens, self._schedule(llm)
            )
        self._llm = llm  # last: requests and polls see a complete engine or none
        logger.info("engine ready: %s (max_model_len=%d)", self.model, self.max_model_len)

    @property
    def dead(self) -> bool:
        """Whether the engine was started and its core process has died since."""
        return self._llm is not None and self._llm.errored

    async def restart(self) -> None:
        """Replace a dead engine with a new one in this process: what a replica restart would do,
        without the new process and its imports. Slow (an engine start, which runs in a worker
        thread; the new engine starts its output handler on this loop at its first request);
        meanwhile requests and load polls get `ServiceUnavailable`."""
        dead, self._llm = self._llm, None
        if dead is not None:
            try:
                dead.shutdown()  # on the loop: it cancels the dead engine's output handler task
            except Exception:  # its processes are gone already; what is left is collected
                logger.warning("shutting down the dead engine failed", exc_info=True)
        self._waiting, self._kv_cache_usage = 0, 0.0
        await asyncio.to_thread(self.start)

    def _schedule(self, llm: Any) -> list[int]:
        """The dense batch-size → k lookup the engine's scheduler starts with (vLLM's own expansion)."""
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        config = llm.vllm_config
        spec = config.speculative_config
        return build_dynamic_sd_schedule_lookup(
            spec.num_speculative_tokens_per_batch_size,
            config.scheduler_config.max_num_seqs,
            spec.num_speculative_tokens,
        )

    def _on_step(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """One engine step's stats: count it, and let adaptive speculation measure decode steps."""
        spec = scheduler_stats.spec_decoding_stats if scheduler_stats is not None else None
        running = scheduler_stats.num_running_reqs if scheduler_stats is not None else 0
        if scheduler_stats is not None:
            self._waiting = scheduler_stats.num_waiting_reqs
            self._kv_cache_usage = scheduler_stats.kv_cache_usage
        generated = iteration_stats.num_generation_tokens if iteration_stats is not None else 0
        at = iteration_stats.iteration_timestamp if iteration_stats is not None else time.time()
        duration = self._steps.record(
            running=running,
            generation_tokens=generated,
            drafts=spec.num_drafts if spec is not None else 0,
            draft_tokens=spec.num_draft_tokens if spec is not None else 0,
            accepted=spec.num_accepted_tokens if spec is not None else 0,
            at=at,
        )
        if duration is not None:
            prefill = iteration_stats.num_prompt_tokens if iteration_stats is not None else 0
            self.latency.observe_step(running, prefill, generated, duration)
        if self._control is None or iteration_stats is None or iteration_stats.num_prompt_tokens:
            return  # adaptive speculation measures decode-only steps
        # The step's length as the engine core timed it: the shortest gap since a request's
        # previous token (the client may process outputs late or in bursts).
        gaps = iteration_stats.inter_token_latencies_iter
        step = min(gaps) if gaps else duration
        if step is not None and self._control.observe(running, generated, step, at):
            self._push_schedule()

    def _push_schedule(self) -> None:
        """Send the controller's lookup to the engine core, one call at a time, latest wins."""
        if self._push_task is not None and not self._push_task.done():
            self._push_again = True
            return
        self._push_task = asyncio.get_running_loop().create_task(self._send_schedule())

    async def _send_schedule(self) -> None:
        from tierserve.actors.vllm_plugin import SCHEDULE_UTILITY

        while self._control is not None and self._llm is not None:
            self._push_again = False
            try:
                await self._llm.engine_core.call_utility_async(SCHEDULE_UTILITY, self._control.lookup())
            except Exception:  # a dead engine is reported by health checks; keep serving what runs
                logger.warning("could not update the speculation schedule", exc_info=True)
                return
            if not self._push_again:
                return

    async def speculation_schedule(self) -> list[int]:
        """The batch-size → k lookup the engine's scheduler is using now (index 0 unused)."""
        from tierserve.actors.vllm_plugin import SCHEDULE_UTILITY

        if self._llm is None:
            raise ServiceUnavailable(f"engine for {self.model} is not running")
        return await self._llm.engine_core.call_utility_async(SCHEDULE_UTILITY)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def check_health(self) -> None:
        """Raise if the engine cannot serve (not started, or its core process died)."""
        self._require_serving()
        await self._llm.check_health()

    def unavailable(self) -> str | None:
        """Why no engine can serve now (none runs while it (re)starts, or it died); None if one can."""
        if self._llm is None:
            return f"engine for {self.model} is not running"
        if self.dead:
            return f"engine for {self.model} is dead: {self._llm.dead_error}"
        return None

    def _require_serving(self) -> None:
        why = self.unavailable()
        if why is not None:
            raise ServiceUnavailable(why)

    def waiting(self) -> int:
        """Requests queued in the engine's scheduler for a slot, as of the last step."""
        return self._waiting

    def load(self) -> TierLoad:
        """Load and latency model for the router; while the engine cannot serve it says why
        (`unavailable`), so a poll never reports a dead engine's tier as healthy. Said, not
        raised: Serve logs a traceback for every call that raises, four a second here."""
        load = self.latency.load(self._running, self._waiting, self.max_model_len)
        why = self.unavailable()
        return load if why is None else dataclasses.replace(load, unavailable=why)

    def stats(self) -> TierStats:
        spec = self._steps.speculation
        return TierStats(
            running=self._running,
            kv_cache_usage=self._kv_cache_usage,
            started=self._started,
            finished=self._finished,
            aborted=self._aborted,
            failed=self._failed,
            steps=self._steps.steps,
            generation_tokens=self._steps.generation_tokens,
            mean_batch_size=self._steps.mean_batch_size,
            mean_step_ms=self._steps.mean_step_ms,
            speculation=dataclasses.replace(spec) if spec is not None else None,
            speculation_control=self._control.snapshot() if self._control is not None else None,
        )

    def prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        """Tokenize the request's prompt; chat messages go through the model's chat template."""
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            vocab = len(self._tokenizer)
            if any(i < 0 or i >= vocab for i in ids):
                raise InvalidRequest("prompt contains token ids outside the model's vocabulary", "prompt")
            return ids
        if request.messages is not None and uses_tools(request.messages, request.tools):
            if self._tools is None:
                raise InvalidRequest(f"{self.model} serves no tools on this tier (its config sets no `tools`)", "tools")
            text = self._tools.render(request.messages, request.tools, request.add_generation_prompt)
            return self._tokenizer.encode(text, add_special_tokens=False)
        if request.messages is not None:
            turns = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                text = self._tokenizer.apply_chat_template(
                    turns, add_generation_prompt=request.add_generation_prompt, tokenize=False
                )
            except Exception as exc:  # jinja templates raise on roles/orders they refuse
                raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", "messages") from exc
            return self._tokenizer.encode(text, add_special_tokens=False)
        if request.prompt is not None:
            return self._tokenizer.encode(request.prompt)
        raise InvalidRequest("one of prompt, messages or prompt_token_ids is required", "prompt")

    def sampling_params(
        self, options: SamplingOptions, prompt_tokens: int, skip_special_tokens: bool = True
    ) -> SamplingParams:
        """vLLM sampling parameters in DELTA mode; `max_tokens` defaults to the room left."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        max_tokens = options.max_tokens
        if max_tokens is None:
            max_tokens = min(self.max_model_len - prompt_tokens, self.max_completion_tokens or self.max_model_len)
        try:
            return SamplingParams(
                n=options.n,
                max_tokens=max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k if options.top_k > 0 else 0,
                min_p=options.min_p,
                seed=options.seed,
                stop=list(options.stop) or None,
                stop_token_ids=list(options.stop_token_ids) or None,
                logit_bias=dict(options.logit_bias) or None,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                repetition_penalty=options.repetition_penalty,
                logprobs=options.logprobs,
                min_tokens=options.min_tokens,
                ignore_eos=options.ignore_eos,
                structured_outputs=structured_outputs(options.structured),
                skip_special_tokens=skip_special_tokens,
                output_kind=RequestOutputKind.DELTA,
            )
        except Exception as exc:
            error = request_error(exc, options.structured is not None)
            if error is None:
                raise
            raise error from exc

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream the request's output as chunks; the last chunk carries the usage.

        Leaving the iteration early (the caller went away, or the task was cancelled) aborts
        the request in the engine and counts it as aborted.
        """
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None:
            raise ServiceUnavailable(f"engine for {self.model} is not running")
        try:
            ids = self.prompt_token_ids(request)
        except InvalidRequest:
            raise
        except Exception as exc:  # the tokenizer refused the text
            error = request_error(exc)
            if error is None:
                raise
            raise InvalidRequest(error.message, error.param or ("messages" if request.messages else "prompt")) from exc
        param = "messages" if request.messages is not None else "prompt"
        error = context_error(len(ids), request.sampling.max_tokens, self.max_model_len, param)
        if error is not None:
            raise error
        if self.speculation is not None and request.sampling.min_p > 0:
            # vLLM's speculative sampler ignores min_p; refuse rather than silently sample without it.
            raise InvalidRequest("min_p is not supported on a tier that decodes speculatively", "min_p")
        cap, asked = self.max_completion_tokens, request.sampling.max_tokens
        if cap is not None and asked is not None and asked > cap:
            raise InvalidRequest(f"max_tokens is {asked}, but this tier generates at most {cap} tokens", "max_tokens")
        calling = request.tools if request.tools is not None and request.tools.choice != "none" else None
        # A parser reads the tags of calls, which some models' tokenizers mark special (as vLLM's server does).
        params = self.sampling_params(request.sampling, len(ids), calling is None or calling.choice != "auto")
        readers = self._tools.readers(calling, params.n) if calling is not None and self._tools is not None else None

        self._started += 1
        self._running += 1
        outcome = Outcome.CANCELLED
        step = 0
        completion_tokens = 0
        spec_metrics: dict[int, Any] = {}
        start, first, last = time.perf_counter(), None, 0.0
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, request.request_id, priority=request.priority
        )
        try:
            async for output in stream:
                last = time.perf_counter()
                first = first or last
                step += 1
                chunks = []
                for choice in output.outputs:
                    if choice.finish_reason == "error":  # the engine failed it (e.g. a grammar it could not build)
                        raise self._failed_request(request, completion_tokens)
                    completion_tokens += len(choice.token_ids)
                    chunk = self._chunk(choice, step, request.sampling.logprobs)
                    chunks.append(readers[choice.index].read(chunk) if readers else chunk)
                    if choice.spec_decode_metrics is not None:
                        spec_metrics[choice.index] = choice.spec_decode_metrics.to_dict()
                if output.finished and chunks:
                    speculation = (
                        request_speculation(spec_metrics.values(), self.speculation) if self.speculation else None
                    )
                    chunks[-1].usage = Usage(len(ids), completion_tokens, speculation)
                for chunk in chunks:
                    yield chunk
            outcome = Outcome.FINISHED
            tokens = completion_tokens / max(1, params.n)
            self.latency.observe_request(
                first - start if first else None,
                (last - first) / (tokens - 1) if first and tokens > 1 else None,
                round(tokens),
            )
        except EngineDeadError as exc:
            outcome = Outcome.FAILED
            raise ServiceUnavailable(f"engine for {self.model} died: {exc}") from exc
        except TierServeError:
            outcome = Outcome.FAILED  # the engine failed it (`_failed_request`)
            raise
        except Exception as exc:
            error = request_error(exc, request.sampling.structured is not None)
            # vLLM refused it when it was added (a 4xx, e.g. a schema it cannot compile): REJECTED
            outcome = outcome_of(error or exc)
            if error is None:
                raise
            raise error from exc
        finally:  # CancelledError / GeneratorExit (the caller left) keep outcome CANCELLED
            self._running -= 1
            if outcome is Outcome.FINISHED:
                self._finished += 1
            elif outcome is Outcome.FAILED:
                self._failed += 1
            elif outcome is Outcome.REJECTED:
                self._started -= 1  # it never ran: like a request refused before the engine saw it
            else:
                self._aborted += 1
                await stream.aclose()  # vLLM aborts a request whose stream is closed early
                await self._llm.abort(request.request_id)

    def _failed_request(self, request: GenerateRequest, completion_tokens: int) -> InvalidRequest | ServiceUnavailable:
        """The error for a request the engine ended with finish reason 'error'."""
        if request.sampling.structured is not None and completion_tokens == 0:
            return InvalidRequest(f"engine for {self.model} could not decode to this response_format", STRUCTURED_PARAM)
        return ServiceUnavailable(f"engine for {self.model} failed the request")

    def _chunk(self, choice: CompletionOutput, step: int, top_k: int | None) -> TokenChunk:
        return TokenChunk(
            index=choice.index,
            text=choice.text,
            token_ids=list(choice.token_ids),
            step=step,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            logprobs=self._logprobs(choice, top_k) if top_k is not None else None,
        )

    def _logprobs(self, choice: CompletionOutput, top_k: int) -> list[TokenLogprob] | None:
        """Per sampled token: its logprob and the `top_k` most likely tokens (vLLM ranks from 1)."""
        if choice.logprobs is None:
            return None
        result = []
        for token_id, position in zip(choice.token_ids, choice.logprobs):
            sampled = position[token_id]
            ranked = sorted((lp.rank, i, lp) for i, lp in position.items() if lp.rank is not None and lp.rank <= top_k)
            top = [TopLogprob(self._token_text(i, lp.decoded_token), i, lp.logprob) for _, i, lp in ranked]
            result.append(
                TokenLogprob(self._token_text(token_id, sampled.decoded_token), token_id, sampled.logprob, top)
            )
        return result

    def token_text(self, token_id: int) -> str:
        """One token's text, as the tokenizer decodes it alone."""
        return self._tokenizer.decode([token_id])

    def _token_text(self, token_id: int, decoded: str | None) -> str:
        return decoded if decoded is not None else self.token_text(token_id)
