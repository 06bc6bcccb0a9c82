"""Token-aware chunking: documents into pieces the embedder reads whole, with overlap, and dedupe.

Sizes are counted in the embedder's own tokenizer without special tokens, so a chunk of
`max_tokens` still fits after the model adds its own ([CLS]/[SEP] for MiniLM); the constructor
checks that against the length the model reads. Structure decides where to cut, coarsest first:
Markdown sections (each chunk starts with its section's heading line, and carries the heading
path in `metadata["heading"]`), then paragraphs, sentences and lines; only a run of text with
no such break longer than a chunk is cut between tokens. Units are packed greedily, and each
chunk after the first in a section begins with about `overlap_tokens` from the end of the one
before: whole trailing sentences where they fit, else the last tokens, starting at a word.

A document is tokenized once; sizes of paragraphs, sentences and chunks are differences of token
indices into that one encoding, and chunk text is cut from the original string at the tokens'
character offsets. Each chunk's text is then tokenized once more, in one batch per document, to
record its exact `token_count`; a section where that finds a chunk over the limit (a cut inside
a word can tokenize differently on its own) is packed again, measuring each chunk as it goes.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tierserve.core.embedder import resolve_embedder_path
from tierserve.rag.config import ChunkingConfig
from tierserve.rag.types import Chunk, Document

if TYPE_CHECKING:
    from tokenizers import Encoding
    from transformers import PreTrainedTokenizerBase

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"[.!?…][\"'’”)\]]*\s+|[。！？]\s*")
_LINE = re.compile(r"\n\s*")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")


@dataclass(slots=True)
class Section:
    """A run of a document's text under one heading: `text[start:end]` is the body."""

    heading_line: str
    """The heading as written (`## Fallback`); empty before the first heading and for plain text."""
    path: str
    """Titles of the enclosing headings, outermost first: `Routing > Fallback`."""
    start: int
    end: int


def markdown_sections(text: str) -> list[Section]:
    """ATX headings (`#` to `######`) outside fenced code blocks start sections; the text before
    the first heading is a section with no heading."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    current = Section("", "", 0, len(text))
    fence = ""
    pos = 0
    for line in text.split("\n"):
        line_start, pos = pos, pos + len(line) + 1
        line = line.rstrip("\r")
        opening = _FENCE.match(line)
        if fence:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                if not line.strip().strip(fence[0]):
                    fence = ""
            continue
        if opening:
            fence = opening.group(1)
            continue
        heading = _HEADING.match(line)
        if heading is None:
            continue
        current.end = line_start
        sections.append(current)
        level, title = len(heading.group(1)), (heading.group(2) or "").strip()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        path = " > ".join(t for _, t in stack if t)
        current = Section(line.strip(), path, min(pos, len(text)), len(text))
    sections.append(current)
    return sections


def text_hash(text: str) -> str:
    """Identity of a chunk's text for dedupe: runs of whitespace count as one space."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def dedupe(chunks: Iterable[Chunk]) -> tuple[list[Chunk], int]:
    """The chunks whose text (whitespace-normalised) was not seen earlier in `chunks`, and how
    many were dropped. Indexes are left as assigned, gaps and all: a chunk id stays tied to its
    position in its own document, not to what other documents contain."""
    seen: set[str] = set()
    kept: list[Chunk] = []
    dropped = 0
    for chunk in chunks:
        digest = text_hash(chunk.text)
        if digest in seen:
            dropped += 1
            continue
        seen.add(digest)
        kept.append(chunk)
    return kept, dropped


def _model_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Tokens the embedder reads: sentence-transformers' `max_seq_length` when the tokenizer
    comes from such a directory (MiniLM: 256, below its tokenizer's 512), else the tokenizer's."""
    st_config = Path(str(tokenizer.name_or_path or ""), "sentence_bert_config.json")
    if st_config.is_file():
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if limit:
            return int(limit)
    limit = tokenizer.model_max_length
    return int(limit) if limit and limit < 1_000_000 else None


class Chunker:
    """Splits documents into chunks of at most `config.max_tokens` tokens of the embedder's
    tokenizer (see the module docstring for where it cuts)."""

    def __init__(
        self,
        config: ChunkingConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
    ):
        """`tokenizer`: a fast Hugging Face tokenizer, or the embedder (`all-MiniLM-L6-v2`, the
        default, or a sentence-transformers directory) whose tokenizer to load."""
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.config = config or ChunkingConfig()
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(resolve_embedder_path(tokenizer))
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"chunking needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
        limit, special = _model_limit(tokenizer), tokenizer.num_special_tokens_to_add()
        if limit is not None and self.config.max_tokens + special > limit:
            raise ValueError(
                f"chunking.max_tokens={self.config.max_tokens} does not fit the embedder: it reads {limit} "
                f"tokens including {special} special ones, so at most {limit - special}"
            )
        # A private copy of the Rust tokenizer: tokenizer.json may switch on truncation and padding
        # (MiniLM's truncates at 128), and the caller's tokenizer stays as it was.
        self._tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the embedder's tokenizer, special tokens not counted."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def chunk(self, doc: Document) -> list[Chunk]:
        """The document's chunks, indexed from 0; none for a blank document. Markdown (format
        `md`) is split by heading first."""
        text = doc.text
        if not text.strip():
            return []
        sections = markdown_sections(text) if _is_markdown(doc) else [Section("", "", 0, len(text))]
        tokens = _Tokens(self._tokenizer.encode(text, add_special_tokens=False))
        planned: list[tuple[Section, _SectionPacker, list[str]]] = []
        for section in sections:
            packer = _SectionPacker(self, text, tokens, section)
            if packer.units:
                planned.append((section, packer, packer.pack()))
        counts = self._counts([t for _, _, texts in planned for t in texts])
        chunks: list[Chunk] = []
        at = 0
        for section, packer, texts in planned:
            section_counts, at = counts[at : at + len(texts)], at + len(texts)
            if max(section_counts) > self.max_tokens:
                texts = packer.pack(measure=self.count_tokens)
                section_counts = self._counts(texts)
            metadata = {**doc.metadata, "heading": section.path} if section.path else doc.metadata
            for chunk_text, count in zip(texts, section_counts):
                chunks.append(Chunk(doc.doc_id, len(chunks), chunk_text, count, dict(metadata)))
        return chunks

    def _counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


def _is_markdown(doc: Document) -> bool:
    fmt = doc.metadata.get("format") or Path(doc.doc_id).suffix.lstrip(".").lower()
    return fmt in ("md", "markdown")


class _Tokens:
    """A document's encoding as plain lists, made once: each read of an `Encoding` property
    builds a new list of the whole document."""

    def __init__(self, encoding: Encoding):
        self._encoding = encoding
        offsets = encoding.offsets
        self.starts = [start for start, _ in offsets]
        self.ends = [end for _, end in offsets]
        self._word_ids: list[int | None] | None = None

    @property
    def word_ids(self) -> list[int | None]:
        """Pre-tokenizer word of each token; only cuts inside long runs need it."""
        if self._word_ids is None:
            self._word_ids = self._encoding.word_ids
        return self._word_ids


class _SectionPacker:
    """One section's units (token index ranges into the document's encoding) and their packing."""

    def __init__(self, chunker: Chunker, text: str, tokens: _Tokens, section: Section):
        self.text, self.tokens, self.starts, self.section = text, tokens, tokens.starts, section
        self.max_tokens = chunker.max_tokens
        self.prefix, prefix_tokens = self._prefix(chunker, section.heading_line)
        self.budget = self.max_tokens - prefix_tokens
        self.overlap = min(chunker.config.overlap_tokens, self.budget // 2)
        # A sentence cut between tokens leaves room for the overlap the next chunk starts with.
        self.piece = self.budget - self.overlap
        self.first = bisect_left(self.starts, section.start)
        self.last = bisect_left(self.starts, section.end)
        self.units: list[tuple[int, int]] = []
        self.soft: list[int] = []
        """Sentence and line starts: where an overlap may begin."""
        if self.last > self.first:
            self._split()

    def _prefix(self, chunker: Chunker, heading: str) -> tuple[str, int]:
        """The heading line and a blank line, capped at a quarter of a chunk."""
        if not heading:
            return "", 0
        encoding = chunker._tokenizer.encode(heading, add_special_tokens=False)
        cap = self.max_tokens // 4
        if len(encoding.ids) > cap:
            heading = heading[: encoding.offsets[cap - 1][1]]
        return heading + "\n\n", min(len(encoding.ids), cap)

    def _bounds(self, pattern: re.Pattern[str], a: int, b: int) -> list[int]:
        """Token indices in [a, b] where `pattern` starts a new unit, with a and b themselves."""
        found = {a, b}
        for match in pattern.finditer(self.text, self._char(a), self._char(b)):
            found.add(bisect_left(self.starts, match.end(), a, b))
        return sorted(found)

    def _split(self) -> None:
        """Paragraphs that fit are units; longer ones fall back to sentences, then lines, then
        pieces cut between tokens."""
        a, b = self.first, self.last
        sentences = self._bounds(_SENTENCE, a, b)
        soft = set(sentences)
        for p0, p1 in _pairs(self._bounds(_PARAGRAPH, a, b)):
            soft.add(p0)
            if p1 - p0 <= self.budget:
                self.units.append((p0, p1))
                continue
            cuts = sorted({p0, p1, *sentences[bisect_left(sentences, p0) : bisect_left(sentences, p1)]})
            for s0, s1 in _pairs(cuts):
                if s1 - s0 <= self.budget:
                    self.units.append((s0, s1))
                    continue
                lines = self._bounds(_LINE, s0, s1)
                soft.update(lines)
                for l0, l1 in _pairs(lines):
                    self.units.extend([(l0, l1)] if l1 - l0 <= self.budget else self._pieces(l0, l1))
        self.soft = sorted(soft)

    def _pieces(self, a: int, b: int) -> list[tuple[int, int]]:
        """[a, b) in runs of at most `piece` tokens, each cut at a word start where one lies in
        the second half of the run."""
        out = []
        while b - a > self.piece:
            cut = a + self.piece
            cut = self._word_start(a + self.piece // 2 + 1, cut + 1, last=True) or cut
            out.append((a, cut))
            a = cut
        out.append((a, b))
        return out

    def _word_start(self, a: int, b: int, last: bool = False) -> int | None:
        """The first (or last) token in [a, b) after whitespace, else after a word boundary of
        the tokenizer's pre-tokenizer; None if there is none."""
        order = range(b - 1, a - 1, -1) if last else range(a, b)
        starts, ends = self.starts, self.tokens.ends
        for i in order:
            if i > 0 and starts[i] > ends[i - 1]:
                return i
        word_ids = self.tokens.word_ids
        for i in order:
            if i > 0 and word_ids[i] != word_ids[i - 1]:
                return i
        return None

    def _start_in(self, a: int, p: int) -> int:
        """Where an overlap reaching back to token a (before the new content at p) begins: the
        first sentence or line start in [a, p), else the first word start, else a itself."""
        k = bisect_left(self.soft, a)
        if k < len(self.soft) and self.soft[k] < p:
            return self.soft[k]
        return self._word_start(a, p) or a

    def pack(self, measure: Callable[[str], int] | None = None) -> list[str]:
        """Chunk texts, packing units greedily. With `measure`, each chunk is tokenized on its
        own and shrunk until it fits: last unit first, then the overlap, then tokens."""
        units = list(self.units)
        texts: list[str] = []
        i, previous = 0, -1
        while i < len(units):
            p, e = units[i]
            s = p if previous < 0 else self._start_in(max(p - self.overlap, previous), p)
            if e - s > self.budget:
                s = self._start_in(e - self.budget, p)
            j = i + 1
            while j < len(units) and units[j][1] - s <= self.budget:
                e = units[j][1]
                j += 1
            if measure is not None:
                while (n := measure(self._compose(s, e))) > self.max_tokens:
                    if j > i + 1:
                        j -= 1
                        e = units[j - 1][1]
                    elif s < p:
                        s = p
                    elif e - p > 1:
                        e = max(p + 1, e - (n - self.max_tokens))
                    else:
                        break
                if e < units[j - 1][1]:  # cut inside a unit: its rest opens the next chunk
                    j -= 1
                    units[j] = (e, units[j][1])
            texts.append(self._compose(s, e))
            previous, i = s, j
        return texts

    def _char(self, i: int) -> int:
        """Where token i's text begins; the section's own bounds at its first and last token, so
        consecutive ranges cover every character, including ones that make no token."""
        if i <= self.first:
            return self.section.start
        if i >= self.last:
            return self.section.end
        return self.starts[i]

    def _compose(self, s: int, e: int) -> str:
        return self.prefix + self.text[self._char(s) : self._char(e)].strip()


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds, bounds[1:]))
