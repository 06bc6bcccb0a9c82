"""Tool calling on a tier: the tools rendered into the prompt, the calls read from the answer.

A tier serves tools when its config sets `tools` (`ToolsConfig`): a chat template that renders
them (`chatml-tools`, bundled, or the model's own) and one of vLLM's tool-call parsers for
`tool_choice: auto`. Per choice, `CallReader` turns the engine's text into what the client
sees: the text the model wrote besides its calls, streamed as it comes, and the calls, whole,
on the choice's last chunk, with `finish_reason: tool_calls` (`stop` for a named function, as
OpenAI answers it). For `required` and a named function, decoding followed a JSON Schema (the
ingress's `tierserve.router.tools.call_schema`), so the text is JSON of a known shape.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from tierserve.actors.config import ToolsConfig
from tierserve.actors.types import TokenChunk, ToolCalling
from tierserve.core.errors import InvalidRequest
from tierserve.core.types import ChatMessage, ToolCall

logger = logging.getLogger(__name__)


def uses_tools(messages: list[ChatMessage] | None, tools: ToolCalling | None) -> bool:
    """Whether rendering needs the tool template: tools offered, or calls in the history."""
    return tools is not None or any(m.tool_calls or m.role == "tool" for m in messages or ())


def chat_turns(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The turns as a chat template reads them (OpenAI's message shape)."""
    turns = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def new_call_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id

    return make_tool_call_id()


class CallReader:
    """One choice's text in, the client's content and calls out (see the module's doc)."""

    def __init__(self, calling: ToolCalling, parser: Any | None, vllm_request: Any | None):
        self.calling = calling
        self.parser = parser
        """A fresh vLLM tool parser (it keeps per-stream state), for `auto`."""
        self.vllm_request = vllm_request
        self.text = ""
        self.token_ids: list[int] = []
        self.sent = 0
        """Characters of `text` already sent as content."""

    def read(self, chunk: TokenChunk) -> TokenChunk:
        """`chunk` as the client sees it: its content, and on the last chunk the calls."""
        previous, previous_ids = self.text, self.token_ids
        self.text += chunk.text
        self.token_ids = previous_ids + chunk.token_ids
        if self.calling.choice == "auto" and chunk.finish_reason is None and chunk.text:
            content = self._streamed_content(previous, previous_ids, chunk)
            return dataclasses.replace(chunk, text=content)
        if chunk.finish_reason is None:
            return dataclasses.replace(chunk, text="")
        content, calls = self._finish(chunk.finish_reason)
        rest = content[self.sent :] if content.startswith(self.text[: self.sent]) else ""
        self.sent = len(self.text)
        if not calls:
            return dataclasses.replace(chunk, text=rest)
        reason = "stop" if self.calling.choice == "function" else "tool_calls"
        return dataclasses.replace(chunk, text=rest, tool_calls=calls, finish_reason=reason)

    def _streamed_content(self, previous: str, previous_ids: list[int], chunk: TokenChunk) -> str:
        """What the parser lets through as content: text it cannot yet take for a call."""
        try:
            delta = self.parser.extract_tool_calls_streaming(
                previous, self.text, chunk.text, previous_ids, self.token_ids, chunk.token_ids, self.vllm_request
            )
        except Exception:  # a parser's bug: hold the text back; the end returns it as content
            logger.warning("the tool-call parser failed on a delta", exc_info=True)
            return ""
        content = delta.content if delta is not None and delta.content else ""
        if not self.text.startswith(content, self.sent):
            return ""  # the parser's content is not the text's next part: keep it for the end
        self.sent += len(content)
        return content

    def _finish(self, reason: str) -> tuple[str, list[ToolCall]]:
        """The choice's content and calls once it ended; an answer cut short (`length`) or not
        of the expected form is all content, no call."""
        if reason != "stop" or self.calling.choice == "none":
            return self.text, []
        try:
            if self.calling.choice == "auto":
                found = self.parser.extract_tool_calls(self.text, self.vllm_request)
                if not found.tools_called:
                    return self.text, []
                calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in found.tool_calls]
                return found.content or "", calls
            value = json.loads(self.text)
            if self.calling.choice == "function":
                assert self.calling.function is not None
                return "", [ToolCall(new_call_id(), self.calling.function, json.dumps(value, ensure_ascii=False))]
            return "", [
                ToolCall(new_call_id(), call["name"], json.dumps(call["parameters"], ensure_ascii=False))
                for call in value
            ]
        except Exception:  # not of the form decoding followed, or a parser's bug: nothing is lost
            logger.warning("no tool call could be read from the answer; it is returned as content", exc_info=True)
            return self.text, []


class ToolSupport:
    """A tier's tool calling: its template, and a reader per choice of a request with tools."""

    def __init__(self, config: ToolsConfig, tokenizer: Any):
        self.config = config
        self.parser_class = config.parser_class()
        self.template = config.template_text()
        self.tokenizer = tokenizer

    def render(self, messages: list[ChatMessage], tools: ToolCalling | None, add_generation_prompt: bool) -> str:
        offered = tools.tools if tools is not None and tools.choice != "none" else None
        try:
            return self.tokenizer.apply_chat_template(
                chat_turns(messages),
                tools=offered,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja templates raise on roles/orders they refuse
            raise InvalidRequest(f"the tier's tool chat template rejected the messages: {exc}", "messages") from exc

    def readers(self, tools: ToolCalling, n: int) -> list[CallReader]:
        """One reader per choice; `auto` gives each its own parser (they keep stream state)."""
        if tools.choice != "auto":
            return [CallReader(tools, None, None) for _ in range(n)]
        vllm_request = self._vllm_request(tools)
        parsers = [self.parser_class(self.tokenizer, vllm_request.tools) for _ in range(n)]
        return [CallReader(tools, parser, vllm_request) for parser in parsers]

    @staticmethod
    def _vllm_request(tools: ToolCalling) -> Any:
        """vLLM's own request object, which its parsers take (they read the tools from it)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest(
            model="tier", messages=[{"role": "user", "content": ""}], tools=tools.tools, tool_choice="auto"
        )
