"""A typed Python client for the tierserve pipeline over Ray Serve DeploymentHandles.

Code running inside the Ray cluster (a driver connected with `ray.init(address="auto")`, a task,
or another Serve deployment) calls the same ingress methods the HTTP routes use, without HTTP:

    client = TierServeClient()                      # serve.get_app_handle("tierserve"); api_key= with auth on
    reply = client.chat(model="auto", messages=[{"role": "user", "content": "Hi"}])
    for chunk in client.chat_stream(model="auto", messages=[...]):
        print(chunk.choices[0].delta.content or "", end="")

Async code uses `achat` / `achat_stream` (and `acomplete` / `acomplete_stream`, `aembeddings`). Arguments are
the OpenAI request fields; they are validated here, so a bad field raises pydantic's
`ValidationError` before anything is sent. Errors from the pipeline arrive as the typed
`TierServeError` subclasses (wrapped by Ray; `unwrap_error` gives the original).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from ray import serve

from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


class TierServeClient:
    """Typed calls into a running tierserve application through its ingress handle."""

    def __init__(self, app_name: str = "tierserve", api_key: str | None = None):
        """`api_key`: the caller's key when the service has auth on (`tierserve keys create`)."""
        self.api_key = api_key
        self.handle = serve.get_app_handle(app_name)
        self._streaming = self.handle.options(stream=True)

    def chat(self, **request: Any) -> ChatCompletion:
        return self.handle.chat.remote(ChatCompletionRequest(**request), api_key=self.api_key).result()

    def chat_stream(self, **request: Any) -> Iterator[ChatCompletionChunk]:
        yield from self._streaming.chat_stream.remote(ChatCompletionRequest(**request), api_key=self.api_key)

    def complete(self, **request: Any) -> Completion:
        return self.handle.complete.remote(CompletionRequest(**request), api_key=self.api_key).result()

    def complete_stream(self, **request: Any) -> Iterator[Completion]:
        yield from self._streaming.complete_stream.remote(CompletionRequest(**request), api_key=self.api_key)

    def embeddings(self, **request: Any) -> CreateEmbeddingResponse:
        return self.handle.embeddings.remote(EmbeddingRequest(**request), api_key=self.api_key).result()

    def models(self) -> list[Model]:
        return self.handle.list_models.remote(api_key=self.api_key).result()

    def health(self) -> dict[str, str]:
        return self.handle.health.remote(api_key=self.api_key).result()

    async def achat(self, **request: Any) -> ChatCompletion:
        return await self.handle.chat.remote(ChatCompletionRequest(**request), api_key=self.api_key)

    async def achat_stream(self, **request: Any) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self._streaming.chat_stream.remote(ChatCompletionRequest(**request), api_key=self.api_key):
            yield chunk

    async def acomplete(self, **request: Any) -> Completion:
        return await self.handle.complete.remote(CompletionRequest(**request), api_key=self.api_key)

    async def aembeddings(self, **request: Any) -> CreateEmbeddingResponse:
        return await self.handle.embeddings.remote(EmbeddingRequest(**request), api_key=self.api_key)

    async def acomplete_stream(self, **request: Any) -> AsyncIterator[Completion]:
        async for chunk in self._streaming.complete_stream.remote(CompletionRequest(**request), api_key=self.api_key):
            yield chunk
