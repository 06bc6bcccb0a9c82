"""The ingress's side of retrieval-augmented generation.

A request opts in with the `retrieval` field (`true`, or `{index, top_k, score_threshold,
filters}`), or gets its route's default from `rag.routes` (which `retrieval: false` turns off).
The ingress asks the retriever deployment for the top chunks of the question (a chat's last
user turn, or a completion's prompt) under a `retrieval {index}` span, puts them before the
question (`tierserve.rag.prompt`), and when the answer is complete reports the citations (chunk
id, document, score, whether the answer cites it) and the grounding score in the response's
`tierserve` field. A question no chunk matches goes to the model unchanged, with no citations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import trace
from ray.serve.handle import DeploymentHandle

from tierserve.actors.types import GenerateRequest
from tierserve.core.errors import InvalidRequest, RequestTimeout, ServiceUnavailable, TierServeError
from tierserve.core.telemetry import inject, tracer
from tierserve.rag.config import RagConfig, RetrievalOptions
from tierserve.rag.grounding import Grounding
from tierserve.rag.prompt import augment_messages, augment_prompt, cited_numbers
from tierserve.rag.types import Embedded, Retrieval, RetrievalQuery
from tierserve.router.handles import handle_error

logger = logging.getLogger("tierserve.ingress")

T = TypeVar("T")


@dataclass
class Retrieved:
    """One request's retrieval: what was asked, what came back, and (at the end) the grounding."""

    options: RetrievalOptions
    result: Retrieval
    grounding: Grounding | None = None
    answer: str = ""

    def citations(self) -> list[dict[str, Any]]:
        cited = set(cited_numbers(self.answer, len(self.result.hits)))
        return [
            {
                "ref": n,
                "chunk_id": hit.chunk_id,
                "doc_id": hit.doc_id,
                "chunk": hit.chunk,
                "score": round(hit.score, 4),
                "title": hit.metadata.get("title"),
                "source": hit.metadata.get("source"),
                "cited": n in cited,
            }
            for n, hit in enumerate(self.result.hits, 1)
        ]

    def extension(self) -> dict[str, Any]:
        """The `retrieval` entry of the response's `tierserve` field."""
        return {
            "index": self.result.index,
            "version": self.result.version,
            "citations": self.citations(),
            "grounding": self.grounding.as_dict() if self.grounding is not None else None,
        }


class RetrievalStep:
    """Options, the retriever call and the prompt change for requests that use retrieval."""

    def __init__(self, config: RagConfig, retriever: DeploymentHandle | None, timeout_s: float = 10.0):
        self.config = config
        self.retriever = retriever
        self.timeout_s = timeout_s
        """Bound on every call to the retriever (`ingress.retriever_timeout_s`)."""
        self.running = True
        """Whether Serve last reported a running retriever replica: without one a search is a
        503 at once, rather than a wait for a replacement that ends in a timeout."""
        from tierserve.rag.metrics import GroundingMetrics

        self.metrics = GroundingMetrics()

    def options(self, body: Any, route: str) -> RetrievalOptions | None:
        """What retrieval this request asked for (or its route's default), or None."""
        asked = body.retrieval
        default = self.config.routes.get(route)
        if asked is False or (asked is None and default is None):
            return None
        if self.retriever is None or not self.config.enabled:
            raise InvalidRequest("retrieval is not enabled on this service", "retrieval", "retrieval_disabled")
        base = default or RetrievalOptions()
        if isinstance(asked, RetrievalOptions):
            base = base.model_copy(update=asked.model_dump(exclude_unset=True))
        return RetrievalOptions(
            index=base.index or self.config.default_index,
            top_k=base.top_k or self.config.top_k,
            score_threshold=base.score_threshold if base.score_threshold is not None else self.config.score_threshold,
            filters=base.filters,
        )

    def replicas_seen(self, running: int) -> None:
        """Serve's count of the retriever's running replicas (`Ingress._watch_replicas`)."""
        self.running = running > 0

    async def retrieve(self, options: RetrievalOptions, question: str, parent: trace.Span) -> Retrieved:
        """The passages for `question`, under a `retrieval {index}` span."""
        self._require_running("retrieval")
        context = trace.set_span_in_context(parent)
        with tracer().start_as_current_span(
            f"retrieval {options.index}",
            context=context,
            attributes={
                "gen_ai.operation.name": "retrieval",
                "gen_ai.data_source.id": options.index,
                "tierserve.retrieval.top_k": options.top_k,
            },
        ) as span:
            query = RetrievalQuery(
                question,
                options.index or "",
                options.top_k or 0,
                options.score_threshold,
                dict(options.filters),
                inject(),
            )
            result = await self._call(self.retriever.retrieve.remote(query))
            span.set_attributes(
                {
                    "tierserve.retrieval.version": result.version,
                    "tierserve.retrieval.hits": len(result.hits),
                    "tierserve.retrieval.chunk_ids": [hit.chunk_id for hit in result.hits],
                    "tierserve.retrieval.scores": [round(hit.score, 4) for hit in result.hits],
                    "tierserve.retrieval.embed_ms": round(result.embed_ms, 3),
                    "tierserve.retrieval.search_ms": round(result.search_ms, 3),
                }
            )
        return Retrieved(options, result)

    @staticmethod
    def augment(request: GenerateRequest, retrieved: Retrieved) -> GenerateRequest:
        """The tier's request with the passages before the question."""
        hits = retrieved.result.hits
        if request.messages is not None:
            return dataclasses.replace(request, messages=augment_messages(request.messages, hits))
        return dataclasses.replace(request, prompt=augment_prompt(request.prompt or "", hits))

    async def ground(self, retrieved: Retrieved, answer: str, tier: str | None) -> None:
        """Measure the finished answer against the passages it cites (all of them if it cites
        none), and count it. A failure here costs the grounding score, never the answer."""
        retrieved.answer = answer
        hits = retrieved.result.hits
        cited = cited_numbers(answer, len(hits))
        passages = [hits[n - 1] for n in cited] or hits
        tags = {"index": retrieved.result.index, "tier": tier or ""}
        if not hits:
            self.metrics.ungrounded.inc(1, tags)
            return
        try:
            retrieved.grounding = await asyncio.wait_for(self.retriever.ground.remote(answer, passages), self.timeout_s)
        except Exception as exc:
            logger.warning("grounding of an answer on index %s failed: %r", retrieved.result.index, exc)
            return
        score = retrieved.grounding.score
        if score is not None:
            self.metrics.score.observe(score, tags)
            if score < 0.5:
                self.metrics.ungrounded.inc(1, tags)

    async def indexes(self) -> list[dict[str, Any]]:
        """The retriever's indexes with their manifests."""
        return await self._call(self.retriever.indexes.remote())

    async def embed(self, texts: list[str], dimensions: int | None = None) -> Embedded:
        """The texts' vectors from the retriever's embedder (`POST /v1/embeddings`)."""
        self._require_running("input")
        return await self._call(self.retriever.embed.remote(texts, dimensions, inject()), "input")

    def _require_running(self, param: str) -> None:
        if not self.running:
            raise ServiceUnavailable(
                "the retriever is unavailable: Serve reports no running replica (it is being replaced)",
                param,
                "retriever_unavailable",
                retry_after_s=1.0,
            )

    async def _call(self, response: Awaitable[T], param: str = "retrieval") -> T:
        """A retriever call's answer within `timeout_s` (504 `retriever_timeout` past it), its
        failures as the user errors they mean (`handle_error`)."""
        try:
            return await asyncio.wait_for(response, self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the retriever did not answer within ingress.retriever_timeout_s={self.timeout_s:g}s",
                param,
                "retriever_timeout",
            ) from None
        except Exception as exc:
            error = handle_error(
                exc,
                "the retriever",
                param,
                unavailable_code="retriever_unavailable",
                full_queue=ServiceUnavailable,
                retry_after_s=1.0,
            )
            if not isinstance(error, TierServeError):
                raise
            raise error from None


def question_of(body: Any, texts: list[str] | None = None) -> str:
    """The text retrieval searches for: the last user turn, or the completion prompt. `texts`:
    the request's texts as the input guards left them (one per message, or the prompt)."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            raise InvalidRequest("retrieval needs a user message to search for", "messages")
        return texts[users[-1]] if texts is not None else messages[users[-1]].text()
    if not isinstance(body.prompt, str):
        raise InvalidRequest("retrieval needs a text prompt, not token ids", "prompt")
    return texts[0] if texts is not None else body.prompt
