"""The ingress's side of the guard chain: the request's text, retrieved chunks, the answer.

- **input**: after routing, the guards that redact check every turn of a chat (and its calls'
  arguments) or a completion's prompt, the guards that refuse its user's turns (`REFUSAL_ROLES`),
  and its `tool` turns are checked like retrieved chunks (`WITHHELD`); a prompt of token ids,
  which no guard can read, is refused (`safety.token_id_prompts`). A
  block is a 400 `content_policy_violation` whose message says why, never what matched; a
  redaction rewrites the text the tier and the retriever see. Guards that redact run first;
  guards that can only refuse (the injection guard) run meanwhile in the background
  (`SafetyConfig.overlap_input_checks`), and the ingress awaits them once the tier has sent its
  first token and before anything reaches the client, so their time hides behind retrieval
  and prefill.
- **retrieved**: each retrieved chunk is checked before it reaches the prompt; a blocked chunk
  (e.g. instructions injected into a document) is dropped, a redacted one goes in redacted.
- **output**: the answer is checked as it streams (`tierserve.safety.chain.StreamGuard`); a blocked
  answer ends with `finish_reason: "content_filter"`, as OpenAI's own filter ends one. Logprobs
  come with a choice's last chunk, and only when the guard changed nothing in that choice.

Each stage is an `apply_guardrail {stage}` span with what was found (entity types and counts,
never text), and findings are counted per guard, entity, stage and action.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from opentelemetry import trace

from tierserve.actors.types import GenerateRequest, TokenChunk, TokenLogprob
from tierserve.core.errors import InvalidRequest, ServiceUnavailable
from tierserve.core.telemetry import tracer
from tierserve.rag.types import Hit
from tierserve.router.protocol import ResponseFormat
from tierserve.router.tools import guard_call
from tierserve.safety.chain import GuardChain, StreamGuard, build_chain
from tierserve.safety.config import SafetyConfig
from tierserve.safety.types import Finding, Stage, Verdict

REFUSAL_ROLES = ("user",)
"""Chat turns the guards that refuse (the injection guard) check at the input stage. System and
developer turns are the application's own instructions, which an injection guard would take for
an attack, and assistant turns are the model's own earlier answers; `tool` turns are results
from the outside world, checked like retrieved chunks (`WITHHELD`); the guards that redact
check every turn."""
WITHHELD = "[tool result withheld by tierserve's guards: it carried instructions for the model]"
"""What a `tool` turn says instead of a result a guard blocks at the `retrieved` stage (indirect
prompt injection, OWASP LLM01): the call stays answered, so the conversation still renders."""


HIT_METADATA = ("title", "source", "heading")
"""A retrieved chunk's metadata that reaches the prompt or the response's citations."""


OUTPUT_TIMEOUT = "the output guards did not finish in time"


class GuardTimeout(ServiceUnavailable):
    """The guards could not decide on the request's text in `safety.timeout_s` (503, fail closed)."""

    default_code = "guard_timeout"


class ContentBlocked(InvalidRequest):
    """A guard refused the request's text (400)."""

    default_code = "content_policy_violation"


@dataclasses.dataclass
class GuardedInput:
    """The request's texts after the input guards that rewrite text, and those still checking."""

    texts: list[str] | None = None
    """One per message (or the prompt), redacted where a guard redacts; None: unchanged."""
    arguments: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    """The arguments of the history's calls, by (message, call), redacted as text."""
    pending: asyncio.Task | None = None
    """The guards that can only refuse, still running: awaiting it raises `ContentBlocked` if
    one refuses. Cancel it if the request ends first."""

    async def passed(self) -> None:
        """Wait for the pending guards; raises `ContentBlocked` if one refuses."""
        if self.pending is not None:
            await self.pending

    def cancel(self) -> None:
        """Stop the pending guards (the request ended without them); a refusal they already
        reached is dropped with it."""
        if self.pending is None:
            return
        if not self.pending.done():
            self.pending.cancel()
        elif not self.pending.cancelled():
            self.pending.exception()  # retrieved, so asyncio does not log it as lost


@dataclasses.dataclass
class SafetyReport:
    """What the guards did to one request, for the response's `tierserve.safety` field."""

    input: Counter = dataclasses.field(default_factory=Counter)
    retrieved: Counter = dataclasses.field(default_factory=Counter)
    output: Counter = dataclasses.field(default_factory=Counter)
    retrieved_dropped: int = 0
    tool_results_withheld: int = 0
    output_blocked: str | None = None
    logprobs_withheld: bool = False

    def add(self, stage: Stage, findings: list[Finding]) -> None:
        getattr(self, stage).update(f.entity for f in findings)

    def extension(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input": dict(self.input),
            "retrieved": dict(self.retrieved),
            "output": dict(self.output),
        }
        if self.retrieved_dropped:
            out["retrieved_dropped"] = self.retrieved_dropped
        if self.tool_results_withheld:
            out["tool_results_withheld"] = self.tool_results_withheld
        if self.output_blocked:
            out["output_blocked"] = self.output_blocked
        if self.logprobs_withheld:
            out["logprobs_withheld"] = True
        return out


class SafetyStep:
    def __init__(self, config: SafetyConfig, cache_dir: Path | None):
        from tierserve.safety.metrics import SafetyMetrics

        self.chain: GuardChain | None = build_chain(config, cache_dir) if config.enabled else None
        self.input_rewriting: GuardChain | None = None
        self.input_refusing: GuardChain | None = None
        self.retrieved_rewriting: GuardChain | None = None
        self.retrieved_refusing: GuardChain | None = None
        if self.chain is not None:
            self.input_rewriting, self.input_refusing = self.chain.split("input")
            self.retrieved_rewriting, self.retrieved_refusing = self.chain.split("retrieved")
        self.overlap = config.overlap_input_checks
        self.timeout_s = config.timeout_s
        self.token_id_prompts = config.token_id_prompts
        self.metrics = SafetyMetrics()

    def active(self, stage: Stage) -> bool:
        return self.chain is not None and self.chain.active(stage)

    async def _check(
        self, texts: list[str], stage: Stage, parent: trace.Span, chain: GuardChain | None = None
    ) -> list[Verdict]:
        """Each text's verdict by `chain` (default: the whole chain), under one
        `apply_guardrail {stage}` span, counted."""
        chain = chain or self.chain
        assert chain is not None
        with tracer().start_as_current_span(
            f"apply_guardrail {stage}",
            context=trace.set_span_in_context(parent),
            attributes={"gen_ai.operation.name": "apply_guardrail", "tierserve.guard.stage": stage},
        ) as span:
            started = time.perf_counter()
            try:
                verdicts = await asyncio.wait_for(
                    asyncio.to_thread(lambda: [chain.check(t, stage) for t in texts]), self.timeout_s
                )
            except asyncio.TimeoutError:
                self.metrics.count(stage, Verdict("block", "", [], "timeout"))
                span.set_attribute("tierserve.guard.action", "timeout")
                raise GuardTimeout(
                    f"the guards did not finish checking {stage} text within safety.timeout_s={self.timeout_s:g}s",
                    None,
                    retry_after_s=1.0,
                ) from None
            self.metrics.duration.observe(time.perf_counter() - started, {"stage": stage})
            findings = [f for v in verdicts for f in v.findings]
            action = next((v.action for v in verdicts if v.blocked), None) or (
                "redact" if any(v.action == "redact" for v in verdicts) else "allow"
            )
            span.set_attributes(
                {
                    "tierserve.guard.action": action,
                    "tierserve.guard.guards": [g.name for g, actions in chain.guards if stage in actions],
                    "tierserve.guard.texts": len(texts),
                    "tierserve.guard.findings": len(findings),
                    "tierserve.guard.entities": sorted({f.entity for f in findings}),
                }
            )
            for v in verdicts:
                self.metrics.count(stage, v)
        return verdicts

    async def check_input(self, body: Any, report: SafetyReport, span: trace.Span) -> GuardedInput:
        """The request's texts (one per message, or the prompt) after the input guards that
        rewrite text, with the refusing ones started in the background (`GuardedInput.pending`;
        without `overlap_input_checks`, already done). Raises `ContentBlocked` if a guard that ran
        blocks. The guards that redact check every turn of a chat, and the arguments of its
        calls; those that refuse, the user's turns (`REFUSAL_ROLES`). `tool` turns go first
        through the guards that refuse at the `retrieved` stage: a blocked one says `WITHHELD`.
        A prompt of token ids, which no guard can read, is refused while an input guard is on
        (`safety.token_id_prompts`)."""
        messages = getattr(body, "messages", None)
        calls: list[tuple[int, int]] = []
        if messages is not None:
            texts, param = [m.text() for m in messages], "messages"
            refused_on = [i for i, m in enumerate(messages) if m.role in REFUSAL_ROLES]
            calls = [(i, j) for i, m in enumerate(messages) for j in range(len(m.tool_calls or ()))]
            await self._withhold_results(messages, texts, report, span)
            if not self.active("input"):  # the texts changed only if a tool result was withheld
                return GuardedInput(texts if report.tool_results_withheld else None)
        elif not self.active("input"):
            return GuardedInput()
        elif isinstance(body.prompt, str):
            texts, param, refused_on = [body.prompt], "prompt", [0]
        elif self.token_id_prompts == "refuse":
            raise InvalidRequest(
                "a prompt of token ids cannot be checked by this service's input guards; send text "
                "(the operator may allow unchecked token ids with safety.token_id_prompts: unchecked)",
                "prompt",
                "unguardable_input",
            )
        else:
            return GuardedInput()
        out = GuardedInput(texts)
        if self.input_refusing is not None and self.input_refusing.active("input") and refused_on:
            out.pending = asyncio.create_task(self._refuse([texts[i] for i in refused_on], param, report, span))
        try:
            if not self.overlap:
                await out.passed()
            if self.input_rewriting is not None and self.input_rewriting.active("input"):
                arguments = [messages[i].tool_calls[j].function.arguments for i, j in calls]
                verdicts = await self._check([*texts, *arguments], "input", span, self.input_rewriting)
                for k, v in enumerate(self._verdicts(verdicts, param, report)):
                    if k < len(texts):
                        texts[k] = v.text
                    elif v.text != arguments[k - len(texts)]:
                        out.arguments[calls[k - len(texts)]] = v.text
        except BaseException:
            out.cancel()
            raise
        return out

    async def _withhold_results(
        self, messages: list[Any], texts: list[str], report: SafetyReport, span: trace.Span
    ) -> None:
        """`tool` turns through the guards that refuse at the `retrieved` stage (the outside
        world's text, like a retrieved chunk): a blocked one's text becomes `WITHHELD`."""
        results = [i for i, m in enumerate(messages) if m.role == "tool"]
        chain = self.retrieved_refusing
        if not results or chain is None or not chain.active("retrieved"):
            return
        for i, v in zip(results, await self._check([texts[i] for i in results], "retrieved", span, chain)):
            report.add("retrieved", v.findings)
            if v.blocked:
                texts[i] = WITHHELD
                report.tool_results_withheld += 1

    async def _refuse(self, texts: list[str], param: str, report: SafetyReport, span: trace.Span) -> None:
        """The refusing input guards (`input_refusing`) on the original texts."""
        self._verdicts(await self._check(texts, "input", span, self.input_refusing), param, report)

    @staticmethod
    def _verdicts(verdicts: list[Verdict], param: str, report: SafetyReport) -> list[Verdict]:
        """Count the findings; raise `ContentBlocked` for the first block."""
        for v in verdicts:
            report.add("input", v.findings)
        blocked = next((v for v in verdicts if v.blocked), None)
        if blocked is not None:
            raise ContentBlocked(blocked.reason or "the request was refused by a guard", param)
        return verdicts

    @staticmethod
    def apply_input(request: GenerateRequest, guarded: GuardedInput) -> GenerateRequest:
        """The tier's request with the guarded texts in place of the originals."""
        texts = guarded.texts
        if texts is None:
            return request
        if request.messages is not None:
            messages = [dataclasses.replace(m, content=t) for m, t in zip(request.messages, texts)]
            for (i, j), arguments in guarded.arguments.items():
                calls = list(messages[i].tool_calls or ())
                calls[j] = dataclasses.replace(calls[j], arguments=arguments)
                messages[i] = dataclasses.replace(messages[i], tool_calls=calls)
            return dataclasses.replace(request, messages=messages)
        return dataclasses.replace(request, prompt=texts[0])

    async def check_retrieved(self, hits: list[Hit], report: SafetyReport, span: trace.Span) -> list[Hit]:
        """The chunks that may enter the prompt: blocked ones dropped, redacted ones redacted.
        A chunk's ids and its metadata that reach the prompt or the response (`HIT_METADATA`)
        are checked with its text: a block in any drops the chunk, a redaction redacts it. The
        guards that redact read each field; those that refuse read a chunk's fields joined into
        one text, so a chunk costs them one check (the injection classifier's is dear)."""
        if not hits or not self.active("retrieved"):
            return hits
        fields = [
            {"text": hit.text, "chunk_id": hit.chunk_id, "doc_id": hit.doc_id}
            | {k: v for k in HIT_METADATA if isinstance(v := hit.metadata.get(k), str) and v}
            for hit in hits
        ]
        blocked = [False] * len(hits)
        if self.retrieved_refusing is not None and self.retrieved_refusing.active("retrieved"):
            joined = ["\n".join(f.values()) for f in fields]
            for i, v in enumerate(await self._check(joined, "retrieved", span, self.retrieved_refusing)):
                report.add("retrieved", v.findings)
                blocked[i] = v.blocked
        checked: list[dict[str, str]] = [dict(f) for f in fields]
        if self.retrieved_rewriting is not None and self.retrieved_rewriting.active("retrieved"):
            owner = [(i, name) for i, f in enumerate(fields) for name in f]
            texts = [fields[i][name] for i, name in owner]
            for (i, name), v in zip(owner, await self._check(texts, "retrieved", span, self.retrieved_rewriting)):
                report.add("retrieved", v.findings)
                checked[i][name] = v.text
        kept = []
        for hit, parts, dropped in zip(hits, checked, blocked):
            if dropped:
                report.retrieved_dropped += 1
                continue
            metadata = {**hit.metadata, **{k: v for k, v in parts.items() if k in HIT_METADATA}}
            kept.append(
                dataclasses.replace(
                    hit, text=parts["text"], chunk_id=parts["chunk_id"], doc_id=parts["doc_id"], metadata=metadata
                )
            )
        return kept

    async def guard_output(
        self,
        batches: AsyncIterator[list[TokenChunk]],
        report: SafetyReport,
        span: trace.Span,
        form: ResponseFormat | None = None,
        functions: dict[str, dict[str, Any]] | None = None,
    ) -> AsyncIterator[list[TokenChunk]]:
        """The batches with each choice's text guarded (see `StreamGuard`); a block ends every
        choice with `content_filter` and stops the tier's stream. An answer of a JSON `form`
        that a guard rewrote must still be of that form (redactions land inside strings, but
        one may replace a number), or its choice ends with `content_filter` instead of `stop`.
        A choice's tool calls are guarded whole (`tierserve.router.tools.guard_call`), against
        their function's schema in `functions`."""
        if not self.active("output"):
            async for batch in batches:
                yield batch
            return
        assert self.chain is not None
        guards: dict[int, StreamGuard] = {}
        finished: set[int] = set()
        held: dict[int, list[TokenLogprob]] = {}
        answers = _Answers(form) if form is not None and form.type != "text" else None
        with tracer().start_as_current_span(
            "apply_guardrail output",
            context=trace.set_span_in_context(span),
            attributes={"gen_ai.operation.name": "apply_guardrail", "tierserve.guard.stage": "output"},
        ) as guard_span:
            spent = 0.0
            try:
                async with contextlib.aclosing(batches) as source:  # a block stops the tier's stream
                    async for batch in source:
                        started = time.perf_counter()
                        quiet = all(
                            guards.setdefault(c.index, StreamGuard(self.chain)).quiet(c.text) and not c.tool_calls
                            for c in batch
                        )
                        if quiet and answers is not None:  # a rewritten answer's check may be slow (patterns)
                            quiet = not any(answers.checks(c, guards[c.index]) for c in batch)
                        try:
                            if quiet:  # no guard runs: no thread needed (most batches of prose)
                                out, blocked = self._guard_batch(
                                    batch, guards, finished, held, report, answers, functions
                                )
                            else:
                                out, blocked = await asyncio.wait_for(
                                    asyncio.to_thread(
                                        self._guard_batch, batch, guards, finished, held, report, answers, functions
                                    ),
                                    self.timeout_s,
                                )
                        except asyncio.TimeoutError:  # undecided: the answer ends here
                            out, blocked = [], Verdict("block", "", [], OUTPUT_TIMEOUT)
                        spent += time.perf_counter() - started
                        # The last batch carries the report: what was found so far. (Copies: a
                        # batch past its timeout may still be running in its thread.)
                        report.output = Counter(f.entity for g in list(guards.values()) for f in list(g.findings))
                        if blocked is not None:
                            last = batch[-1]
                            out += [
                                TokenChunk(i, "", [], last.step, finish_reason="content_filter")
                                for i in sorted(set(guards) | {c.index for c in batch})
                                if i not in finished
                            ]
                            report.output_blocked = blocked.reason
                            yield out
                            return
                        yield out
            finally:
                findings = [f for g in list(guards.values()) for f in list(g.findings)]
                action = "block" if report.output_blocked else ("redact" if findings else "allow")
                self.metrics.count("output", Verdict(action, "", findings, report.output_blocked))
                self.metrics.duration.observe(spent, {"stage": "output"})
                guard_span.set_attributes(
                    {
                        "tierserve.guard.action": action,
                        "tierserve.guard.findings": len(findings),
                        "tierserve.guard.entities": sorted({f.entity for f in findings}),
                    }
                )

    def _guard_batch(
        self,
        batch: list[TokenChunk],
        guards: dict[int, StreamGuard],
        finished: set[int],
        held: dict[int, list[TokenLogprob]],
        report: SafetyReport,
        answers: _Answers | None = None,
        functions: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[list[TokenChunk], Verdict | None]:
        """One batch through each choice's stream guard. Logprobs name the tokens a redaction
        hides, so they are held until their choice ends and returned then only if the guard
        changed nothing in it."""
        assert self.chain is not None
        out = []
        for chunk in batch:
            guard = guards.setdefault(chunk.index, StreamGuard(self.chain))
            text = guard.feed(chunk.text) if chunk.text else ""
            logprobs = None
            if chunk.logprobs is not None:
                held.setdefault(chunk.index, []).extend(chunk.logprobs)
            finish_reason = chunk.finish_reason
            if finish_reason is not None:
                text += guard.finish()
                finished.add(chunk.index)
                if chunk.index in held:
                    logprobs = held.pop(chunk.index) if not guard.findings else None
                    report.logprobs_withheld |= logprobs is None
            if answers is not None:
                problem = answers.add(chunk, text, guard)
                if problem is not None:
                    finish_reason = "content_filter"
                    report.output_blocked = f"the redacted answer is {problem}"
            calls = chunk.tool_calls
            if calls:
                calls = []
                for call in chunk.tool_calls:
                    call, findings, problem = guard_call(call, self.chain, (functions or {}).get(call.name))
                    guard.findings.extend(findings)
                    if problem is not None:
                        guard.blocked = guard.blocked or Verdict("block", "", findings, problem)
                    calls.append(call)
            if guard.blocked is not None:
                finished.add(chunk.index)
                report.logprobs_withheld |= chunk.index in held
                out.append(
                    dataclasses.replace(
                        chunk, text=text, finish_reason="content_filter", logprobs=None, usage=None, tool_calls=None
                    )
                )
                return out, guard.blocked
            out.append(
                dataclasses.replace(chunk, text=text, logprobs=logprobs, finish_reason=finish_reason, tool_calls=calls)
            )
        return out, None


class _Answers:
    """Each choice's guarded text of a structured answer, checked against its form when the
    choice ends complete (`stop`) and a guard rewrote it."""

    def __init__(self, form: ResponseFormat):
        self.form = form
        self.texts: dict[int, list[str]] = {}

    @staticmethod
    def checks(chunk: TokenChunk, guard: StreamGuard) -> bool:
        """Whether `add` will check the form at this chunk (it may, if the choice ends now)."""
        return chunk.finish_reason == "stop" and bool(guard.findings)

    def add(self, chunk: TokenChunk, text: str, guard: StreamGuard) -> str | None:
        """Record `text`, the guarded text of `chunk`'s choice; at its end, why it is no longer
        of the form (None: it is, or it is not checked)."""
        self.texts.setdefault(chunk.index, []).append(text)
        if not self.checks(chunk, guard):
            return None
        return self.form.problem("".join(self.texts.pop(chunk.index)))
