"""Token chunks (and embeddings) to OpenAI response objects (the `openai` package's own models).

Streaming turns each `TokenChunk` into one chunk object; non-streaming folds all chunks of a
request into one response with `CompletionBuilder`; `embeddings_response` formats vectors.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable

from openai.types import Completion, CompletionChoice, CompletionUsage, CreateEmbeddingResponse, Embedding
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs as CompletionLogprobs
from openai.types.create_embedding_response import Usage as EmbeddingUsage

from tierserve.actors.types import TokenChunk, TokenLogprob, Usage
from tierserve.core.types import ToolCall
from tierserve.rag.types import Embedded

_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls"}


def finish_reason(reason: str | None) -> str | None:
    """vLLM's finish reason in OpenAI's vocabulary ('abort' never reaches a live client);
    `content_filter` is the output guard's."""
    return None if reason is None else _FINISH.get(reason, "stop")


def usage(u: Usage) -> CompletionUsage:
    """OpenAI's usage; a speculating tier adds `speculation` (drafted and accepted tokens of this
    request), an extra field OpenAI clients keep (`usage.model_extra`)."""
    extra = {"speculation": u.speculation.as_dict()} if u.speculation is not None else {}
    return CompletionUsage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens, **extra
    )


def chat_logprobs(items: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=t.token,
            bytes=list(t.token.encode()),
            logprob=t.logprob,
            top_logprobs=[TopLogprob(token=a.token, bytes=list(a.token.encode()), logprob=a.logprob) for a in t.top],
        )
        for t in items
    ]


def completion_logprobs(items: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    offsets = []
    for t in items:
        offsets.append(text_offset)
        text_offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[{a.token: a.logprob for a in t.top} for t in items],
        text_offset=offsets,
    )


def chat_message(text: str, calls: list[ToolCall] | None) -> ChatCompletionMessage:
    """An answer's message; with tool calls, its content is null unless the model wrote text too."""
    if not calls:
        return ChatCompletionMessage(role="assistant", content=text)
    tool_calls = [
        ChatCompletionMessageFunctionToolCall(
            id=call.id, type="function", function=Function(name=call.name, arguments=call.arguments)
        )
        for call in calls
    ]
    return ChatCompletionMessage(role="assistant", content=text or None, tool_calls=tool_calls)


class StreamFormatter:
    """Per request: TokenChunks in, streamed OpenAI objects out. Subclasses say which objects."""

    id_prefix = ""
    """Prefix of the response id (`chatcmpl-...`, `cmpl-...`), as OpenAI uses."""
    response_type: type[ChatCompletionChunk] | type[Completion]
    object_name = ""

    def __init__(self, request_id: str, model: str, include_usage: bool):
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def _response(self, choices: list, u: Usage | None = None) -> ChatCompletionChunk | Completion:
        return self.response_type(
            id=self.request_id,
            object=self.object_name,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(u) if u is not None else None,
        )

    def format(self, chunk: TokenChunk) -> Iterable[ChatCompletionChunk | Completion]:
        yield self._response([self._choice(chunk)])
        if chunk.usage is not None and self.include_usage:
            yield self._response([], chunk.usage)

    def _choice(self, chunk: TokenChunk) -> ChunkChoice | CompletionChoice:
        raise NotImplementedError


class ChatStreamFormatter(StreamFormatter):
    """`chat.completion.chunk` objects; the first delta of each choice carries the role."""

    id_prefix = "chatcmpl"
    response_type = ChatCompletionChunk
    object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, include_usage: bool):
        super().__init__(request_id, model, include_usage)
        self._started: set[int] = set()

    def _choice(self, chunk: TokenChunk) -> ChunkChoice:
        delta = ChoiceDelta(content=chunk.text)
        if chunk.tool_calls:  # whole calls, on the choice's last chunk (see `TokenChunk.tool_calls`)
            delta.content = chunk.text or None
            delta.tool_calls = [
                ChoiceDeltaToolCall(
                    index=i,
                    id=call.id,
                    type="function",
                    function=ChoiceDeltaToolCallFunction(name=call.name, arguments=call.arguments),
                )
                for i, call in enumerate(chunk.tool_calls)
            ]
        if chunk.index not in self._started:
            self._started.add(chunk.index)
            delta.role = "assistant"
        logprobs = ChunkLogprobs(content=chat_logprobs(chunk.logprobs)) if chunk.logprobs is not None else None
        return ChunkChoice(
            index=chunk.index, delta=delta, finish_reason=finish_reason(chunk.finish_reason), logprobs=logprobs
        )


class CompletionStreamFormatter(StreamFormatter):
    """Streamed `text_completion` objects; logprob text offsets run on across chunks."""

    id_prefix = "cmpl"
    response_type = Completion
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, include_usage: bool):
        super().__init__(request_id, model, include_usage)
        self._offsets: dict[int, int] = {}

    def _choice(self, chunk: TokenChunk) -> CompletionChoice:
        end = self._offsets.get(chunk.index, 0) + len(chunk.text)
        self._offsets[chunk.index] = end
        logprobs = None
        if chunk.logprobs is not None:
            # The tokens end where this chunk's text does; they may start before it (the output
            # guard holds a choice's logprobs until its last chunk).
            start = max(0, end - sum(len(t.token) for t in chunk.logprobs))
            logprobs = completion_logprobs(chunk.logprobs, start)
        # Streamed choices carry finish_reason null until the last one, which the openai
        # package's CompletionChoice type does not admit; build it without validation.
        return CompletionChoice.model_construct(
            index=chunk.index, text=chunk.text, finish_reason=finish_reason(chunk.finish_reason), logprobs=logprobs
        )


class CompletionBuilder:
    """Folds all chunks of one request into per-choice text, logprobs and finish reason."""

    def __init__(self, n: int):
        self.texts = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob] | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.calls: list[list[ToolCall] | None] = [None] * n
        self.usage: Usage | None = None

    def add(self, chunk: TokenChunk) -> None:
        self.texts[chunk.index].append(chunk.text)
        if chunk.tool_calls:
            self.calls[chunk.index] = chunk.tool_calls
        if chunk.logprobs is not None:
            self.logprobs[chunk.index] = (self.logprobs[chunk.index] or []) + chunk.logprobs
        if chunk.finish_reason is not None:
            self.finish[chunk.index] = finish_reason(chunk.finish_reason)
        if chunk.usage is not None:
            self.usage = chunk.usage

    def chat(self, request_id: str, model: str) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=i,
                message=chat_message("".join(text), calls),
                finish_reason=self.finish[i] or "stop",
                logprobs=ChoiceLogprobs(content=chat_logprobs(lp)) if lp is not None else None,
            )
            for i, (text, lp, calls) in enumerate(zip(self.texts, self.logprobs, self.calls))
        ]
        return ChatCompletion(
            id=request_id,
            object="chat.completion",
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage(self.usage) if self.usage else None,
        )

    def completion(self, request_id: str, model: str) -> Completion:
        choices = [
            CompletionChoice(
                index=i,
                text="".join(text),
                finish_reason=self.finish[i] or "stop",
                logprobs=completion_logprobs(lp, 0) if lp is not None else None,
            )
            for i, (text, lp) in enumerate(zip(self.texts, self.logprobs))
        ]
        return Completion(
            id=request_id,
            object="text_completion",
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage(self.usage) if self.usage else None,
        )


def embeddings_response(embedded: Embedded, encoding_format: str) -> CreateEmbeddingResponse:
    """OpenAI's embeddings response: each vector as floats, or as base64 of its little-endian
    float32 bytes (what the `openai` client asks for, and decodes)."""
    if encoding_format == "base64":
        data = [
            Embedding.model_construct(
                embedding=base64.b64encode(row.astype("<f4").tobytes()).decode(), index=i, object="embedding"
            )
            for i, row in enumerate(embedded.vectors)
        ]
    else:
        data = [
            Embedding(embedding=row.tolist(), index=i, object="embedding") for i, row in enumerate(embedded.vectors)
        ]
    usage = EmbeddingUsage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens)
    return CreateEmbeddingResponse(data=data, model=embedded.model, object="list", usage=usage)
