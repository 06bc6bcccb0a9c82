"""How retrieved chunks enter the prompt, and how the answer's citations are read back.

The chunks go before the question, numbered, each with its chunk id, and the model is told to
answer from them and cite them as [1], [2]. The numbers are what small models reproduce
reliably; the response maps them back to chunk ids (`citations`).
"""

from __future__ import annotations

import re

from tierserve.core.types import ChatMessage
from tierserve.rag.types import Hit

INSTRUCTION = (
    "Answer the question using only the numbered context passages below. After each statement, "
    "cite the passages it comes from as [1], [2], and so on. If the passages do not contain the "
    "answer, say that you do not know."
)

_CITATION = re.compile(r"\[(\d{1,2})\]")


def context_block(hits: list[Hit]) -> str:
    """The numbered passages, each headed by its chunk id (and title when known)."""
    parts = []
    for n, hit in enumerate(hits, 1):
        title = hit.metadata.get("title")
        head = f"[{n}] {hit.chunk_id}" + (f" ({title})" if title else "")
        parts.append(f"{head}\n{hit.text.strip()}")
    return "\n\n".join(parts)


def augment_question(question: str, hits: list[Hit]) -> str:
    """Instruction, passages, then the question: the text that replaces the user's last turn."""
    return f"{INSTRUCTION}\n\nContext:\n\n{context_block(hits)}\n\nQuestion: {question}"


def augment_messages(messages: list[ChatMessage], hits: list[Hit]) -> list[ChatMessage]:
    """The conversation with its last user turn carrying the passages; unchanged without hits."""
    if not hits:
        return messages
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        return messages
    out = list(messages)
    out[last] = ChatMessage("user", augment_question(messages[last].content, hits))
    return out


def augment_prompt(prompt: str, hits: list[Hit]) -> str:
    """A plain completion prompt with the passages before it."""
    if not hits:
        return prompt
    return f"{INSTRUCTION}\n\nContext:\n\n{context_block(hits)}\n\n{prompt}"


def cited_numbers(answer: str, count: int) -> list[int]:
    """The passage numbers (1-based) the answer cites, in order of first citation, ignoring
    numbers outside 1..count."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        n = int(match.group(1))
        if 1 <= n <= count and n not in seen:
            seen.append(n)
    return seen
