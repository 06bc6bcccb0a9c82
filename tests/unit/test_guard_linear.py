"""The guards take time linear in their input, crafted or not, and no call waits for another.

Each family of crafted inputs (long runs of what a pattern, tokenizer or splitter keeps looking
at) is checked at two sizes, eight times apart: linear time is about 8 times more, quadratic 64
times; a check fails past 20. Times are the checking thread's CPU time, the least of three runs,
so other load on the machine does not count. Then the linear rewrites give what the originals
gave (the bounded tokenizer: outside long chunks), and a small text is checked while a large one
is."""

from __future__ import annotations

import math
import random
import string
import threading
import time
from collections.abc import Callable

import pytest
import regex
import spacy
from hypothesis import given
from hypothesis import strategies as st
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.predefined_recognizers import EmailRecognizer

from tierserve.safety.config import InjectionGuardConfig, PiiGuardConfig
from tierserve.safety.injection import InjectionGuard
from tierserve.safety.pii import RECOGNIZERS, OfflineEmailRecognizer, PiiGuard
from tierserve.safety.presidio import LANGUAGE, MAX_TOKENIZED_CHARS, BoundedTokenizer, new_analyzer
from tierserve.safety.types import Finding, merge_overlaps


def _repeated(unit: str) -> Callable[[int], str]:
    return lambda n: (unit * (n // len(unit) + 1))[:n]


_BASE64 = "".join(random.Random(0).choices(string.ascii_letters + string.digits + "+/", k=1 << 20))

PROSE = (
    "Thanks for the renewal notes. Could you send the contract to maria.santos@mailbox.org so legal "
    "can sign it? My line is (415) 555-0147, and the account is DE89 3704 0044 0532 0130 00. The sync "
    "job from 10.20.30.40 failed overnight; see https://status.example.com/incidents/42 for details. "
)

FAMILIES: dict[str, Callable[[int], str]] = {
    "token=": _repeated("token="),
    "api_key=": _repeated("api_key="),
    "password: ": _repeated("password: "),
    "sk- key run": lambda n: ("sk-" + "aB3" * n)[:n],
    "digit run": _repeated("1234567890"),
    "digits, spaced": _repeated("1 "),
    "digits, dashed": _repeated("12-"),
    "digits, dotted": _repeated("1."),
    "phone-like": _repeated("+1 (212) 555-"),
    "time stamps": _repeated("2023-10-12 10:30 "),
    "SSNs": _repeated("ssn 536-22-8726 "),
    "dots, then @": lambda n: ("a." * n)[: n - 2] + "@x",
    "@ and dots": _repeated("a@b."),
    "e-mail addresses": _repeated("jane@example.com "),
    "http://": _repeated("http://"),
    "www.": _repeated("www."),
    "URLs": _repeated("https://a.com/x "),
    "base64 run": lambda n: _BASE64[:n],
    "::": _repeated("::"),
    "IPv6 groups": _repeated("ffff:"),
    "IPv4 addresses": _repeated("1.1.1.1 "),
    "spaced letters": _repeated("a "),
    "!": _repeated("!"),
    "quotes and brackets": _repeated("'(\""),
    ". ": _repeated(". "),
    "whitespace run": lambda n: "a" + " " * (n - 2) + "a",
    "one word": lambda n: "a" * n,
    "prose": _repeated(PROSE),
}
"""Crafted inputs by name: each builds a text of the length asked for (bench/guard_adversarial.py
measures them too)."""

SMALL, LARGE = 2_000, 16_000
MAX_GROWTH = 20.0
"""Most CPU time the large size may take, in multiples of the small size's (linear: 8)."""
FLOOR_S = 0.002
"""A small size's time below this counts as this much: timer noise is not growth."""


@pytest.fixture(scope="module")
def pii() -> PiiGuard:
    return PiiGuard(PiiGuardConfig(entities=list(RECOGNIZERS)))


@pytest.fixture(scope="module")
def injection() -> InjectionGuard:
    return InjectionGuard(InjectionGuardConfig(mode="heuristic"))


def cpu_seconds(check: Callable[[str], object], text: str, repeats: int = 3) -> float:
    """The least CPU time of this thread over `repeats` checks of `text`."""
    best = math.inf
    for _ in range(repeats):
        start = time.thread_time()
        check(text)
        best = min(best, time.thread_time() - start)
    return best


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("guard", ["pii", "injection"])
def test_time_grows_linearly(request, guard, family):
    check = request.getfixturevalue(guard).detect
    small = cpu_seconds(lambda t: check(t, "input"), FAMILIES[family](SMALL))
    large = cpu_seconds(lambda t: check(t, "input"), FAMILIES[family](LARGE))
    assert large <= MAX_GROWTH * max(small, FLOOR_S), (
        f"{guard} on {family!r}: {small * 1e3:.1f} ms at {SMALL} chars, {large * 1e3:.1f} ms at {LARGE}"
    )


def test_a_small_check_is_not_queued_behind_a_large_one(pii):
    """No lock serialises the PII guard's calls: a small text checked while a 200 KB one is
    under way in another thread is done first (the GIL interleaves the two)."""
    large = FAMILIES["prose"](200_000)
    small = "Call me at (212) 555-0199 tonight."
    done: dict[str, float] = {}

    def check_large() -> None:
        pii.detect(large, "input")
        done["large"] = time.perf_counter()

    thread = threading.Thread(target=check_large)
    thread.start()
    time.sleep(0.05)
    assert thread.is_alive(), "the large check ended too soon to overlap"
    found = pii.detect(small, "input")
    done["small"] = time.perf_counter()
    thread.join()
    assert [f.entity for f in found] == ["PHONE_NUMBER"]
    assert done["small"] < done["large"]
    assert pii._engine.size >= 2  # the second call got an engine of its own


# --- The linear steps give the original steps' results ----------------------------------------


def test_the_context_enhancer_scores_as_presidios(pii):
    """The indexed enhancer against Presidio's own, on texts with many matches and context
    words near and far."""
    indexed, original = (new_analyzer([s.build() for s in RECOGNIZERS.values()], None, PROSE) for _ in range(2))
    original.context_aware_enhancer = LemmaContextAwareEnhancer()
    texts = [
        PROSE * 5,
        "ssn 536-22-8726 and 536 22 8726, phone 030 901820 then +44 20 7946 0958 " * 4,
        "the website example.com; card holders call 212-555-0199. " * 3,
        "one two three four five six seven eight phone 212-555-0199 ip 10.0.0.1",
    ]
    for text in texts:
        assert indexed.analyze(text, LANGUAGE) == original.analyze(text, LANGUAGE)  # spans, types, scores


def _merge_overlaps_by_scanning(findings: list[Finding]) -> list[Finding]:
    """The specification: each finding, best first, against every one kept so far."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start)):
        overlapping = [k for k in kept if k.start < f.end and f.start < k.end]
        if not overlapping:
            kept.append(f)
            continue
        winner = max(overlapping, key=lambda k: (k.score, k.end - k.start))
        start, end = min(f.start, *(k.start for k in overlapping)), max(f.end, *(k.end for k in overlapping))
        merged = Finding(winner.guard, winner.entity, start, end, winner.score)
        kept = [k for k in kept if k not in overlapping] + [merged]
    return sorted(kept, key=lambda f: f.start)


_findings = st.builds(
    lambda start, length, entity, score: Finding("pii", entity, start, start + length, score),
    st.integers(0, 60),
    st.integers(1, 12),
    st.sampled_from(["EMAIL_ADDRESS", "URL", "PHONE_NUMBER"]),
    st.sampled_from([0.3, 0.5, 0.85, 1.0]),
)


@given(st.lists(_findings, max_size=16))
def test_merge_overlaps_by_bisection_is_merging_by_scanning(findings):
    assert merge_overlaps(findings) == _merge_overlaps_by_scanning(findings)


@pytest.mark.parametrize(
    "text",
    [
        "plain words, (brackets) and don't-split: e-mail U.S. 3.5 $10",
        "a https://example.com/" + "p" * 40 + " b",
        "x" * 33 + "  two spaces\nnew line " + "!" * 50,
        "\t" + "a.b" * 20 + " end",
    ],
)
def test_the_bounded_tokenizer_is_spacys_outside_long_chunks(text):
    """Same text, offsets that point at each token, and spaCy's own tokens in the chunks it sees."""
    reference = spacy.blank("en")(text)
    doc = BoundedTokenizer(spacy.blank("en").tokenizer)(text)
    assert doc.text == text
    assert all(text[t.idx : t.idx + len(t)] == t.text for t in doc)
    long_chunks = [m.span() for m in regex.finditer(rf"\S{{{MAX_TOKENIZED_CHARS + 1},}}", text)]

    def outside(d):
        return [(t.idx, t.text) for t in d if not any(a <= t.idx < b for a, b in long_chunks)]

    assert outside(doc) == outside(reference)
    assert all(len(t) <= MAX_TOKENIZED_CHARS for t in doc)


@pytest.mark.parametrize(
    "text",
    [
        "mail jane.doe@example.com now",
        "x" * 64 + "@example.com",
        "a.b.c-d+tag@mail.example.co.uk, and o'brien@example.org",
        ".leading.dot@example.com and trailing.@example.com",
    ],
)
def test_the_bounded_email_pattern_matches_presidios_up_to_64_characters(text):
    def spans(recognizer):
        return [(r.start, r.end) for r in recognizer.analyze(text, ["EMAIL_ADDRESS"])]

    assert spans(OfflineEmailRecognizer()) == spans(EmailRecognizer())
