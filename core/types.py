"""Types that more than one layer builds or reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ToolCall:
    """A function call the model made: in an answer, and in the history sent back."""

    id: str
    name: str
    arguments: str
    """The arguments as JSON text."""


@dataclass(slots=True)
class ChatMessage:
    """One chat turn: the ingress builds them from the request, retrieval adds its passages to the
    last user turn, and the tier renders them with its model's chat template."""

    role: str
    content: str
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls."""
    tool_call_id: str | None = None
    """A `tool` turn's: the call whose result it carries."""
