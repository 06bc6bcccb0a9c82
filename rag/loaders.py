"""Files in, `Document`s out: plain text, Markdown, HTML and PDF.

Each format is one small parser from raw content to `(text, metadata)`; `load_documents` walks a
file or a directory in sorted order and names each document by its path relative to the root, so
ids (and the chunk ids built on them) stay the same from one ingestion to the next. Markdown
front matter becomes metadata, which is what retrieval filters match on.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from tierserve.rag.types import Document

Format = Literal["txt", "md", "html", "pdf"]

FORMATS: dict[str, Format] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
"""File extension (lower case) to format; files with any other extension are skipped."""

_RESERVED = ("source", "format")
"""Metadata the loader owns: front matter cannot override it."""


class DocumentLoadError(ValueError):
    """A file of a supported format that cannot be read; the message names the file."""


def load_documents(
    root: str | Path,
    doc_id_prefix: str = "",
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[Document]:
    """The documents under `root` (a file or a directory), in sorted path order.

    A document's id is `doc_id_prefix` followed by its path relative to `root` with forward
    slashes (a single file: its name); `metadata["source"]` is that path without the prefix.
    Hidden files and directories (names starting with '.') are not walked. Files of another
    format are passed, as relative paths, to `on_skip`.
    """
    root = Path(root)
    if root.is_file():
        files = [(root, root.name)]
    elif root.is_dir():
        files = sorted(((path, path.relative_to(root).as_posix()) for path in _walk(root)), key=lambda f: f[1])
    else:
        raise FileNotFoundError(f"no such file or directory to load documents from: {root}")
    for path, source in files:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            if on_skip is not None:
                on_skip(source)
            continue
        yield load_file(path, doc_id_prefix + source, source, fmt)


def _walk(root: Path) -> Iterator[Path]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(directory, name)


def load_file(
    path: str | Path, doc_id: str | None = None, source: str | None = None, fmt: Format | None = None
) -> Document:
    """One file as a `Document`; `doc_id` and `source` default to the file's name, `fmt` to the
    format its extension names."""
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DocumentLoadError(f"{path}: unsupported format {path.suffix!r}; supported: {', '.join(FORMATS)}")
    if fmt == "pdf":
        text, metadata = _parse_pdf(path), {}
    else:
        raw = path.read_bytes().decode("utf-8-sig", errors="replace")
        try:
            text, metadata = _PARSERS[fmt](raw)
        except DocumentLoadError as e:
            raise DocumentLoadError(f"{path}: {e}") from None
    return _document(doc_id or path.name, text, metadata, fmt, source or path.name)


def load_text(doc_id: str, text: str, metadata: dict[str, Any] | None = None, fmt: Format = "txt") -> Document:
    """A `Document` from text already in memory, parsed as `fmt` (`txt`, `md` or `html`);
    `metadata` is added last and wins over what parsing found."""
    if fmt not in _PARSERS:
        raise ValueError(f"fmt must be one of {', '.join(_PARSERS)} for text in memory, got {fmt!r}")
    try:
        parsed_text, parsed = _PARSERS[fmt](text.removeprefix("\ufeff"))
    except DocumentLoadError as e:
        raise DocumentLoadError(f"{doc_id}: {e}") from None
    doc = _document(doc_id, parsed_text, parsed, fmt, doc_id)
    doc.metadata.update(metadata or {})
    return doc


def _document(doc_id: str, text: str, parsed: dict[str, Any], fmt: Format, source: str) -> Document:
    metadata = {"source": source, "title": Path(source).stem, "format": fmt}
    metadata.update({k: v for k, v in parsed.items() if k not in _RESERVED})
    return Document(doc_id, text, metadata)


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_txt(raw: str) -> tuple[str, dict[str, Any]]:
    return _normalise_newlines(raw), {}


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_MD_TITLE = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)


def _parse_markdown(raw: str) -> tuple[str, dict[str, Any]]:
    """YAML front matter (between `---` lines at the very top) is removed from the text; its
    scalar values, and lists of scalars, become metadata. The title is the front matter's
    `title`, else the first level-1 heading."""
    text = _normalise_newlines(raw)
    metadata: dict[str, Any] = {}
    match = _FRONT_MATTER.match(text)
    if match:
        try:
            front = yaml.safe_load(match.group(1) or "")
        except yaml.YAMLError as e:
            raise DocumentLoadError(f"invalid YAML front matter: {e}") from None
        # A mapping is front matter; anything else is two horizontal rules around prose.
        if isinstance(front, dict):
            text = text[match.end() :]
            metadata = {str(k): v for k, v in ((k, _metadata_value(v)) for k, v in front.items()) if v is not None}
    if "title" not in metadata:
        heading = _MD_TITLE.search(text)
        if heading:
            metadata["title"] = heading.group(1)
    return text, metadata


def _metadata_value(value: Any) -> Any:
    """Values a metadata filter can match: scalars (dates as ISO strings) and lists of them;
    None for anything nested."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return value
    return None


_DROPPED_TAGS = ("script", "style", "nav", "noscript", "template", "head")
_BLOCK_TAGS = (
    "p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote", "pre",
    "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table", "tr", "figure",
    "figcaption", "hr", "form", "address", "details", "summary",
)  # fmt: skip
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _parse_html(raw: str) -> tuple[str, dict[str, Any]]:
    """Visible text with one blank line between block elements, so paragraphs survive for the
    chunker; scripts, styles and navigation are dropped. The title is `<title>`, else the
    first `<h1>`."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    title_tag = soup.find("title") or soup.find("h1")
    title = " ".join(title_tag.get_text(" ").split()) if title_tag else ""
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    for tag in soup.find_all("br"):
        tag.replace_with("\n")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    text = _normalise_newlines(soup.get_text())
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    return text, ({"title": title} if title else {})


def _parse_pdf(path: Path) -> str:
    """The text of every page, pages separated by a blank line."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentLoadError(f"{path}: PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentLoadError:
        raise
    except Exception as e:  # pypdf raises many types (PdfReadError, ValueError, KeyError, ...) on bad files
        raise DocumentLoadError(f"{path}: cannot read PDF: {type(e).__name__}: {e}") from e
    return "\n\n".join(_normalise_newlines(page).strip() for page in pages if page.strip())


_PARSERS: dict[str, Callable[[str], tuple[str, dict[str, Any]]]] = {
    "txt": _parse_txt,
    "md": _parse_markdown,
    "html": _parse_html,
}
