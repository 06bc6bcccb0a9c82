"""Types that more than one layer builds or reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ChatMessage:
    """One chat turn: the ingress builds them from the request, retrieval adds its passages to the
    last user turn, and the tier renders them with its model's chat template."""

    role: str
    content: str
