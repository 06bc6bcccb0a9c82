"""Loaders (txt, Markdown, HTML, PDF) and the token-aware chunker, without Ray or model weights:
sizes measured with MiniLM's own tokenizer (loaded once for the module), overlap, headings,
front matter, over-long sentences, dedupe, and a property test on random texts."""

from __future__ import annotations

import datetime
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tierserve.core.embedder import resolve_embedder_path
from tierserve.rag.chunking import Chunker, dedupe, markdown_sections
from tierserve.rag.config import ChunkingConfig
from tierserve.rag.ingest import bundled_corpus
from tierserve.rag.loaders import DocumentLoadError, load_documents, load_file, load_text
from tierserve.rag.types import Chunk, Document


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_embedder_path(None))


@pytest.fixture(scope="module")
def chunkers(tokenizer):
    """Chunkers by (max_tokens, overlap_tokens), built once each."""
    cache: dict[tuple[int, int], Chunker] = {}

    def get(max_tokens: int = 200, overlap_tokens: int = 40) -> Chunker:
        key = (max_tokens, overlap_tokens)
        if key not in cache:
            cache[key] = Chunker(ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap_tokens), tokenizer)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def chunker(chunkers):
    return chunkers()


@pytest.fixture(scope="module")
def count(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


WORDS = (
    "router tier latency budget token engine replica queue prompt model cache index vector chunk "
    "embedding fallback request stream actor cluster deadline throughput"
).split()


def prose(sentences: int, seed: int = 0, paragraph_every: int = 6) -> str:
    """Sentences of 6 to 20 words, numbered so each is unique, with a paragraph break now and then."""
    rng = random.Random(seed)
    parts = []
    for n in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
        parts.append(f"Sentence {n} {' '.join(words)}.")
        parts.append("\n\n" if (n + 1) % paragraph_every == 0 else " ")
    return "".join(parts).strip()


def assert_fit(chunks: list[Chunk], chunker: Chunker, count) -> None:
    for chunk in chunks:
        assert chunk.token_count == count(chunk.text)
        assert 0 < chunk.token_count <= chunker.max_tokens, chunk.chunk_id


def overlap(a: str, b: str) -> str:
    """The longest suffix of a that begins b."""
    for start in range(len(a)):
        if b.startswith(a[start:]):
            return a[start:]
    return ""


def is_subsequence(words: list[str], of: list[str]) -> bool:
    it = iter(of)
    return all(w in it for w in words)


# ---- chunking


def test_bundled_corpus_chunks_fit_and_carry_metadata(chunker, count):
    docs = list(load_documents(bundled_corpus()))
    chunks = [c for doc in docs for c in chunker.chunk(doc)]
    assert len(chunks) > len(docs)
    assert_fit(chunks, chunker, count)
    assert all(c.metadata["source"] and c.metadata["format"] == "md" and c.metadata.get("heading") for c in chunks)
    assert [c.index for c in chunks if c.doc_id == docs[0].doc_id] == list(range(len(chunker.chunk(docs[0]))))


def test_prose_chunks_fit_overlap_by_whole_sentences_and_cover_the_text(chunker, count):
    text = prose(300)
    chunks = chunker.chunk(Document("prose.txt", text, {"format": "txt"}))
    assert len(chunks) > 10
    assert_fit(chunks, chunker, count)
    assert max(c.token_count for c in chunks) > 0.8 * chunker.max_tokens, "greedy packing fills chunks"
    for a, b in zip(chunks, chunks[1:]):
        shared = overlap(a.text, b.text)
        assert shared.startswith("Sentence "), (a.chunk_id, shared)
        assert 0 < count(shared) <= 40
    assert is_subsequence(text.split(), [w for c in chunks for w in c.text.split()])
    assert "heading" not in chunks[0].metadata


def test_chunk_text_is_the_original_text(chunker):
    text = "Ünïcode ÀND Capitals stay as written: naïve café, Straße.\n\nSecond   paragraph\twith  spacing."
    (chunk,) = chunker.chunk(Document("u.txt", text))
    assert chunk.text == text


def test_no_overlap_when_configured_off(chunkers):
    chunks = chunkers(64, 0).chunk(Document("p.txt", prose(60)))
    assert all(not overlap(a.text, b.text).strip() for a, b in zip(chunks, chunks[1:]))


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
def test_blank_documents_give_no_chunks(chunker, text):
    assert chunker.chunk(Document("blank.txt", text)) == []


def test_chunking_is_deterministic(chunker):
    doc = Document("p.txt", prose(80, seed=3))
    assert chunker.chunk(doc) == chunker.chunk(doc)


MARKDOWN = """# Guide

Intro paragraph of the guide.

## Routing

How requests are routed.

### Fallback

When a tier fails the next one takes over.

```python
# a comment, not a heading
route(request)
```

## Limits ##

Budgets and deadlines.
"""


def test_markdown_sections_follow_headings_outside_code_fences():
    paths = [(s.heading_line, s.path) for s in markdown_sections(MARKDOWN)]
    assert paths == [
        ("", ""),
        ("# Guide", "Guide"),
        ("## Routing", "Guide > Routing"),
        ("### Fallback", "Guide > Routing > Fallback"),
        ("## Limits ##", "Guide > Limits"),
    ]


def test_markdown_chunks_carry_heading_path_and_start_with_heading_line(chunker, count):
    chunks = chunker.chunk(load_text("guide.md", MARKDOWN, fmt="md"))
    assert [c.metadata["heading"] for c in chunks] == [
        "Guide",
        "Guide > Routing",
        "Guide > Routing > Fallback",
        "Guide > Limits",
    ]
    assert chunks[2].text.startswith("### Fallback\n\nWhen a tier fails")
    assert "# a comment, not a heading" in chunks[2].text
    assert chunks[3].text == "## Limits ##\n\nBudgets and deadlines."
    assert_fit(chunks, chunker, count)


def test_every_chunk_of_a_long_section_is_prefixed_with_its_heading(chunkers, count):
    chunker = chunkers(64, 16)
    doc = load_text("long.md", "# Top\n\n## Deep dive\n\n" + prose(40), fmt="md")
    chunks = chunker.chunk(doc)
    assert len(chunks) > 3
    assert all(c.text.startswith("## Deep dive\n\n") for c in chunks)
    assert {c.metadata["heading"] for c in chunks} == {"Top > Deep dive"}
    assert_fit(chunks, chunker, count)


def test_text_is_not_split_as_markdown_unless_it_is_markdown(chunker):
    (chunk,) = chunker.chunk(Document("notes.txt", "# not a heading\n\nplain text", {"format": "txt"}))
    assert "heading" not in chunk.metadata


def test_front_matter_becomes_metadata_and_leaves_the_text(chunker):
    text = (
        "---\ntitle: Routing guide\ntags: [routing, sla]\naudience: operator\nreviewed: 2024-05-01\n"
        "owner: {team: infra}\n---\n# Heading title\n\nBody text.\n"
    )
    doc = load_text("guide.md", text, fmt="md")
    assert doc.text == "# Heading title\n\nBody text.\n"
    assert doc.metadata == {
        "source": "guide.md",
        "title": "Routing guide",
        "format": "md",
        "tags": ["routing", "sla"],
        "audience": "operator",
        "reviewed": datetime.date(2024, 5, 1).isoformat(),
    }
    (chunk,) = chunker.chunk(doc)
    assert chunk.metadata["audience"] == "operator" and chunk.metadata["heading"] == "Heading title"
    assert "---" not in chunk.text


def test_markdown_title_is_the_first_level_one_heading_else_the_file_stem():
    assert load_text("a/b.md", "intro\n\n## Sub\n\n# Real title\n", fmt="md").metadata["title"] == "Real title"
    assert load_text("a/b.md", "no headings", fmt="md").metadata["title"] == "b"


def test_horizontal_rules_are_not_front_matter():
    text = "---\nJust prose between rules.\n---\nMore."
    assert load_text("r.md", text, fmt="md").text == text


def test_invalid_front_matter_names_the_document():
    with pytest.raises(DocumentLoadError, match="bad.md: invalid YAML front matter"):
        load_text("bad.md", "---\ntitle: [unclosed\n---\ntext", fmt="md")


def test_a_sentence_longer_than_a_chunk_is_cut_between_words_with_overlap(chunkers, count):
    chunker = chunkers(64, 16)
    words = [f"{random.Random(n).choice(WORDS)}{n}" for n in range(400)]
    text = "Short opener. " + " ".join(words) + ". Short closer."
    chunks = chunker.chunk(Document("long.txt", text))
    assert_fit(chunks, chunker, count)
    assert len(chunks) > 10
    assert is_subsequence(text.split(), [w for c in chunks for w in c.text.split()])
    for a, b in zip(chunks, chunks[1:]):
        assert 0 < count(overlap(a.text, b.text)) <= 16


@pytest.mark.parametrize(
    "text",
    [
        "/".join("segment" + "x" * 40 for _ in range(200)),  # a URL-like run: no spaces, punctuation only
        " ".join("qzxjvkw" * 14 for _ in range(30)),  # 98-letter words of many word pieces each
    ],
)
def test_runs_without_spaces_still_fit(chunkers, count, text):
    chunker = chunkers(16, 4)
    chunks = chunker.chunk(Document("run.txt", text))
    assert_fit(chunks, chunker, count)
    assert "".join(c.text for c in chunks).replace(" ", "").count("segment") in (0, 200)


AFFIXES = "ization national inter tion ing est ably ment re un pre ology graph ical ness".split()


@pytest.mark.parametrize("seed", range(5))
def test_words_cut_inside_are_measured_again_and_still_fit(chunkers, count, seed):
    # Cut between word pieces, "##ization" becomes "iz ##ation" on its own: the chunk is
    # longer than the planned count, and its section is packed again, measuring each chunk.
    rng = random.Random(seed)
    text = " ".join("".join(rng.choice(AFFIXES) for _ in range(12)) for _ in range(6))
    chunker = chunkers(16, 4)
    chunks = chunker.chunk(Document("glued.txt", text))
    assert_fit(chunks, chunker, count)
    assert chunks[0].text.startswith(text.split()[0][:8])
    assert chunks[-1].text.endswith(text.split()[-1][-8:])


def test_max_tokens_must_leave_room_for_special_tokens(tokenizer):
    Chunker(ChunkingConfig(max_tokens=254, overlap_tokens=10), tokenizer)
    with pytest.raises(ValueError, match="max_tokens=255 .* at most 254"):
        Chunker(ChunkingConfig(max_tokens=255, overlap_tokens=10), tokenizer)


def test_dedupe_keeps_the_first_copy_across_documents(chunker):
    shared = "A paragraph that two documents share, word for word."
    a = chunker.chunk(Document("a.txt", shared))
    b = chunker.chunk(Document("b.txt", " A paragraph  that two documents\nshare, word for word. "))
    c = chunker.chunk(Document("c.txt", "Something else entirely."))
    kept, dropped = dedupe(a + b + c + a)
    assert dropped == 2
    assert [k.chunk_id for k in kept] == ["a.txt#0", "c.txt#0"]


def test_dedupe_leaves_index_gaps():
    chunks = [Chunk("d", 0, "x", 1), Chunk("d", 1, "x", 1), Chunk("d", 2, "y", 1)]
    kept, dropped = dedupe(chunks)
    assert dropped == 1 and [c.index for c in kept] == [0, 2]


@settings(max_examples=100, deadline=None)
@given(
    sentences=st.lists(
        st.lists(st.text(alphabet="abcxyzéßж中0123456789", min_size=1, max_size=8), min_size=1, max_size=40),
        min_size=1,
        max_size=30,
    ),
    separators=st.lists(st.sampled_from([". ", " ", "\n", "\n\n", "! ", "? \n"]), min_size=1, max_size=30),
    sizes=st.sampled_from([(32, 8), (64, 16), (200, 40)]),
)
def test_random_texts_fit_and_keep_every_word(chunkers, count, sentences, separators, sizes):
    text = "".join(" ".join(words) + separators[n % len(separators)] for n, words in enumerate(sentences))
    chunker = chunkers(*sizes)
    chunks = chunker.chunk(Document("random.txt", text))
    assert_fit(chunks, chunker, count)
    assert is_subsequence(text.split(), [w for c in chunks for w in c.text.split()])


# ---- loaders


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF, written by hand, with one line of Helvetica text per page."""
    kids = [4 + 2 * k for k in range(len(pages))]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for kid, text in zip(kids, pages):
        stream = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode("latin-1")
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (kid + 1)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


HTML = """<!doctype html>
<html><head><title>Tier guide</title><style>body { color: red; }</style>
<script>var secret = "do not index";</script></head>
<body><nav><a href="/">Home</a> | <a href="/docs">Docs</a></nav>
<h1>Main heading</h1>
<p>First paragraph with a <a href="#x">link</a> inside.</p>
<p>Second<br>paragraph.</p>
<script>console.log("also hidden")</script>
<ul><li>one</li><li>two</li></ul>
</body></html>"""


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_bytes(b"plain text\r\nwith a bad byte \xff here")
    (tmp_path / "a.md").write_text("---\naudience: dev\n---\n# Alpha\n\nBody.\n")
    (tmp_path / "sub" / "page.HTML").write_text(HTML)
    (tmp_path / "sub" / "doc.pdf").write_bytes(minimal_pdf(["Hello from page one", "And page two"]))
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / ".hidden.md").write_text("# hidden")
    (tmp_path / ".git" / "notes.md").write_text("# git internals")
    return tmp_path


def test_load_documents_walks_in_sorted_order_and_reports_skipped(corpus):
    skipped: list[str] = []
    docs = list(load_documents(corpus, doc_id_prefix="kb/", on_skip=skipped.append))
    assert [d.doc_id for d in docs] == ["kb/a.md", "kb/b.txt", "kb/sub/doc.pdf", "kb/sub/page.HTML"]
    assert [d.metadata["format"] for d in docs] == ["md", "txt", "pdf", "html"]
    assert [d.metadata["source"] for d in docs] == ["a.md", "b.txt", "sub/doc.pdf", "sub/page.HTML"]
    assert skipped == ["data.json", "sub/image.png"]
    assert [d.doc_id for d in load_documents(corpus, "kb/")] == [d.doc_id for d in docs]


def test_loaded_formats(corpus):
    md, txt, pdf, html = load_documents(corpus)
    assert md.text == "# Alpha\n\nBody.\n"
    assert md.metadata == {"source": "a.md", "title": "Alpha", "format": "md", "audience": "dev"}
    assert txt.text == "plain text\nwith a bad byte \ufffd here"
    assert txt.metadata["title"] == "b"
    assert pdf.text == "Hello from page one\n\nAnd page two"
    assert pdf.metadata["title"] == "doc"
    assert html.metadata["title"] == "Tier guide"
    assert html.text == "Main heading\n\nFirst paragraph with a link inside.\n\nSecond\nparagraph.\n\none\n\ntwo"
    for hidden in ("do not index", "also hidden", "color", "Home", "Docs"):
        assert hidden not in html.text


def test_html_title_falls_back_to_the_first_h1():
    doc = load_text("p.html", "<body><h1>Only <em>heading</em></h1><p>text</p></body>", fmt="html")
    assert doc.metadata["title"] == "Only heading"
    assert doc.text == "Only heading\n\ntext"


def test_a_single_file_is_named_by_its_name(corpus):
    (doc,) = load_documents(corpus / "sub" / "doc.pdf", doc_id_prefix="x:")
    assert doc.doc_id == "x:doc.pdf" and doc.metadata["source"] == "doc.pdf"


def test_a_broken_pdf_names_the_file(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    with pytest.raises(DocumentLoadError, match="broken.pdf"):
        list(load_documents(tmp_path))


def test_unsupported_and_missing_paths(tmp_path):
    with pytest.raises(DocumentLoadError, match="unsupported format '.png'"):
        load_file(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(load_documents(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="fmt must be one of"):
        load_text("x", "text", fmt="pdf")


def test_load_text_metadata_wins(chunker):
    doc = load_text("notes/today.txt", "Some notes.", {"title": "Today", "team": "infra"})
    assert doc.metadata == {"source": "notes/today.txt", "title": "Today", "format": "txt", "team": "infra"}
    assert chunker.chunk(doc)[0].metadata["team"] == "infra"
