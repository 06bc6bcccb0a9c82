"""The PII guard on Presidio, offline: span tables per recognizer (found, and lookalikes not
found), context words, overlap resolution, each redaction operator, check() per stage and
action, configuration errors, threads, and no network from a cold start."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tierserve.safety import pii
from tierserve.safety.chain import GuardChain
from tierserve.safety.config import DEFAULT_PII_ENTITIES, NerConfig, PiiGuardConfig
from tierserve.safety.pii import MAX_ENTITY_CHARS, RECOGNIZERS, PiiGuard
from tierserve.safety.types import Finding, merge_overlaps

# Built by concatenation so the repository holds nothing a secret scanner would flag.
OPENAI_KEY = "sk-" + "proj-" + "Xy7Kp2Qw9Lm4Nz8Rt5Vb3Hc6Jd1Fg0Ua"
GITHUB_TOKEN = "gh" + "p_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
ALL_ENTITIES = [*DEFAULT_PII_ENTITIES, "SECRET_KEY"]


@pytest.fixture(scope="module")
def guard() -> PiiGuard:
    return PiiGuard(PiiGuardConfig(entities=ALL_ENTITIES), salt=b"0123456789abcdef")


def spans(guard: PiiGuard, text: str) -> list[tuple[str, int, int]]:
    return [(f.entity, f.start, f.end) for f in guard.detect(text, "input")]


FOUND = [
    ("Write to jane.doe@example.com today.", "EMAIL_ADDRESS", 9, 29),
    ("cc: ops+alerts@mail.example.co.uk, thanks", "EMAIL_ADDRESS", 4, 33),
    ("Call me at (212) 555-0199 tonight.", "PHONE_NUMBER", 11, 25),
    ("Her mobile: +44 20 7946 0958", "PHONE_NUMBER", 12, 28),
    ("Phone number 030 901820", "PHONE_NUMBER", 13, 23),
    ("Paid with card 4111 1111 1111 1111 yesterday", "CREDIT_CARD", 15, 34),
    ("4111-1111-1111-1111", "CREDIT_CARD", 0, 19),
    ("amex 3782 822463 10005.", "CREDIT_CARD", 5, 22),
    ("Transfer to GB82 WEST 1234 5698 7654 32 please", "IBAN_CODE", 12, 39),
    ("IBAN DE89370400440532013000.", "IBAN_CODE", 5, 27),
    ("My SSN is 536-22-8726.", "US_SSN", 10, 21),
    ("social security 536 22 8726", "US_SSN", 16, 27),
    ("server at 192.168.1.254 is down", "IP_ADDRESS", 10, 23),
    ("ping 2001:db8::8a2e:370:7334 now", "IP_ADDRESS", 5, 28),
    ("link-local fe80::1%eth0", "IP_ADDRESS", 11, 23),
    ("subnet 10.0.0.0/8 only", "IP_ADDRESS", 7, 17),
    ("See https://example.com/a/b?q=1.", "URL", 4, 31),
    ("Docs at www.example.org, mostly", "URL", 8, 23),
    ("the website example.com has it", "URL", 12, 23),
    ("(http://localhost:8080/health)", "URL", 1, 29),
    ("OPENAI_API_KEY=" + OPENAI_KEY, "SECRET_KEY", 15, 55),
    ("aws AKIAIOSFODNN7EXAMPLE key", "SECRET_KEY", 4, 24),
    ("token " + GITHUB_TOKEN + " leaked", "SECRET_KEY", 6, 46),
    ('api_key = "a1b2c3d4e5f6a7b8c9d0"', "SECRET_KEY", 11, 31),
]


@pytest.mark.parametrize(("text", "entity", "start", "end"), FOUND)
def test_every_entity_holds_what_the_streaming_prefilter_looks_for(text, entity, start, end):
    """`MAY_HOLD` is what lets a stream of plain words skip analysis: every entity has it."""
    from tierserve.safety.pii import MAY_HOLD

    assert MAY_HOLD.search(text[start:end]), (entity, text[start:end])


@pytest.mark.parametrize(
    ("text", "may_hold"),
    [
        ("It works. Then it stops: really", False),  # sentence and list punctuation, then a space
        ("It works.", True),  # a final `.` may still become `works.com`
        ("see example.com", True),
        ("address fe80::1", True),
        ("answer 42", True),
        ("plain words, nothing else", False),
    ],
)
def test_sentence_punctuation_needs_no_analysis(text, may_hold):
    """A `.` or `:` followed by white space ends a sentence or starts a list; no entity holds
    white space, so only a `.` or `:` with no space after it makes `MAY_HOLD` match."""
    from tierserve.safety.pii import MAY_HOLD

    assert (MAY_HOLD.search(text) is not None) is may_hold


@pytest.mark.parametrize(("text", "entity", "start", "end"), FOUND)
def test_found(guard, text, entity, start, end):
    assert spans(guard, text) == [(entity, start, end)]


NOT_FOUND = [
    ("card 4111 1111 1111 1112", "CREDIT_CARD: fails Luhn"),
    ("order 1234 5678 9012 3456 shipped", "CREDIT_CARD: fails Luhn"),
    ("IBAN GB82 WEST 1234 5698 7654 33", "IBAN_CODE: wrong check digits"),
    ("ssn 000-00-0000", "US_SSN: all-zero groups"),
    ("ssn 123-45-6789", "US_SSN: the published placeholder"),
    ("ssn 666-12-3456", "US_SSN: area 666 is never issued"),
    ("ssn 536-22.8726", "US_SSN: mixed separators"),
    ("host 999.1.1.1 and 1.2.3", "IP_ADDRESS: octet out of range, three parts"),
    ("we shipped v1.2.3.4 today", "IP_ADDRESS: a version written with v"),
    ("met on 2023-10-12 at 10:30", "PHONE_NUMBER: an ISO date and a time"),
    ("due 12/10/2023, ref 2023.10.12", "PHONE_NUMBER: dates"),
    ("see setup.py and README.md", "URL: file names on country TLDs, without a context word"),
    ("user@localhost", "EMAIL_ADDRESS: no public suffix"),
    ("pip install sk-learn-compatible-estimators-2024", "SECRET_KEY: no capital, not a key"),
    ("api_key = YOUR_API_KEY_HERE", "SECRET_KEY: a placeholder"),
    ('token: "0000000000000000aaaa"', "SECRET_KEY: low entropy"),
    ("The meeting is in room 101 at noon.", "nothing at all"),
]


@pytest.mark.parametrize(("text", "why"), NOT_FOUND)
def test_not_found(guard, text, why):
    assert spans(guard, text) == [], why


def test_a_dotted_quad_version_number_in_prose_is_an_ip_address(guard):
    """Presidio cannot tell `1.2.3.4` from an address; a leaked address costs more than a redacted
    version number, so the guard keeps it (`v1.2.3.4` is not matched)."""
    assert spans(guard, "upgrade to version 1.2.3.4 now") == [("IP_ADDRESS", 19, 26)]


def test_context_words_raise_scores(guard):
    """A valid phone number grouped otherwise than its region writes it scores 0.4, below the
    default threshold; a context word among the five words before it lifts it above."""
    assert spans(guard, "2079 460 958") == []
    assert spans(guard, "telephone 2079 460 958") == [("PHONE_NUMBER", 10, 22)]
    [bare] = guard.detect("536-22-8726", "input")
    [near] = guard.detect("SSN: 536-22-8726", "input")
    assert near.score > bare.score >= 0.5


@pytest.mark.parametrize(
    "number", ["(212) 555-0199", "+44 20 7946 0958", "+33 1 23 45 67 89", "020 7946 0958", "212.555.0199"]
)
def test_a_number_grouped_as_its_region_writes_it_needs_no_context_word(guard, number):
    """libphonenumber's exact grouping is the evidence that stands in for a context word."""
    text = f"Ring the desk on {number} after nine."
    start = text.index(number)
    assert spans(guard, text) == [("PHONE_NUMBER", start, start + len(number))]


@pytest.mark.parametrize(
    "text",
    [
        "order 2125550199 shipped",  # ten bare digits: as often an order number
        "2125 550 199 units",  # valid, but not grouped as the US writes it
        "SSN-like 059-56-4323 ref",  # a valid German number, grouped otherwise
        "The warehouse holds 377 782 units in aisle 5.",
        "(923) 789-6514",  # no such US area code: libphonenumber finds it invalid
    ],
)
def test_digit_runs_that_are_not_phone_numbers_need_a_context_word(text):
    phones = PiiGuard(PiiGuardConfig(entities=["PHONE_NUMBER"]))
    assert phones.detect(text, "input") == []


def test_score_threshold():
    strict = PiiGuard(PiiGuardConfig(entities=["US_SSN"], score_threshold=0.8))
    assert strict.detect("536-22-8726", "input") == []
    assert [f.entity for f in strict.detect("my ssn is 536-22-8726", "input")] == ["US_SSN"]


def test_entities_limit_what_is_looked_for():
    cards = PiiGuard(PiiGuardConfig(entities=["CREDIT_CARD"]))
    text = "mail a@example.com, card 4111 1111 1111 1111"
    assert [f.entity for f in cards.detect(text, "input")] == ["CREDIT_CARD"]


def test_several_findings_come_back_by_start(guard):
    text = "jane@example.com / 192.168.0.1 / card 4111111111111111"
    assert spans(guard, text) == [("EMAIL_ADDRESS", 0, 16), ("IP_ADDRESS", 19, 30), ("CREDIT_CARD", 38, 54)]


def test_an_email_inside_a_url_leaves_nothing_of_the_url(guard):
    text = "open https://example.com/?u=jane@example.com now"
    assert spans(guard, text) == [("EMAIL_ADDRESS", 5, 44)]


def f(entity: str, start: int, end: int, score: float) -> Finding:
    return Finding("pii", entity, start, end, score)


@pytest.mark.parametrize(
    ("findings", "expected"),
    [
        ([], []),
        ([f("A", 5, 9, 0.5), f("B", 0, 3, 0.9)], [f("B", 0, 3, 0.9), f("A", 5, 9, 0.5)]),
        ([f("URL", 0, 20, 0.6), f("EMAIL", 5, 15, 1.0)], [f("EMAIL", 0, 20, 1.0)]),
        ([f("A", 0, 10, 0.6), f("B", 5, 15, 0.6)], [f("A", 0, 15, 0.6)]),
        ([f("A", 0, 4, 0.5), f("B", 2, 8, 0.5), f("C", 6, 12, 0.9)], [f("C", 0, 12, 0.9)]),
        ([f("A", 0, 4, 0.5), f("B", 4, 8, 0.5)], [f("A", 0, 4, 0.5), f("B", 4, 8, 0.5)]),
    ],
)
def test_merge_overlaps(findings, expected):
    """Higher score (then longer span) names the entity; its span covers everything it overlapped;
    touching spans stay apart."""
    assert merge_overlaps(findings) == expected


TEXT = "Mail jane@example.com or call (212) 555-0199."


def test_replace():
    g = PiiGuard(PiiGuardConfig(operator="replace"))
    assert g.redact(TEXT, g.detect(TEXT, "input")) == "Mail <EMAIL_ADDRESS> or call <PHONE_NUMBER>."


def test_mask():
    g = PiiGuard(PiiGuardConfig(operator="mask"))
    assert g.redact(TEXT, g.detect(TEXT, "input")) == "Mail **************** or call **************."


def test_hash_is_a_salted_sha256_prefix_stable_per_salt():
    salt = b"0123456789abcdef"
    g = PiiGuard(PiiGuardConfig(operator="hash"), salt=salt)
    text = "jane@example.com wrote to jane@example.com"
    digest = hashlib.sha256(salt + b"jane@example.com").hexdigest()[: pii.HASH_CHARS]
    assert g.redact(text, g.detect(text, "input")) == f"{digest} wrote to {digest}"
    other = PiiGuard(PiiGuardConfig(operator="hash"), salt=b"another salt 16b")
    assert other.redact(text, other.detect(text, "input")) != g.redact(text, g.detect(text, "input"))
    default = PiiGuard(PiiGuardConfig(operator="hash"))
    assert default._salt == pii._PROCESS_SALT and len(default._salt) == 32


def test_redact_with_no_findings_is_the_text(guard):
    assert guard.redact("nothing here", []) == "nothing here"


def test_redact_a_whole_segment(guard):
    """The chain redacts each finding as its own segment."""
    assert guard.redact("4111111111111111", [f("CREDIT_CARD", 0, 16, 1.0)]) == "<CREDIT_CARD>"


@pytest.mark.parametrize(("text", "entity", "start", "end"), FOUND)
def test_replace_leaves_nothing_of_what_was_found(guard, text, entity, start, end):
    redacted = guard.redact(text, guard.detect(text, "input"))
    assert text[start:end] not in redacted
    assert f"<{entity}>" in redacted


ACTIONS = {"input": "block", "retrieved": "redact", "output": "allow"}


@pytest.fixture(scope="module")
def staged() -> GuardChain:
    """The PII guard with an action per stage, as the chain runs it."""
    return GuardChain([(PiiGuard(PiiGuardConfig(actions=ACTIONS)), ACTIONS)])


def test_check_blocks_input_without_quoting_it(staged):
    text = "I am jane@example.com, SSN 536-22-8726"
    verdict = staged.check(text, "input")
    assert verdict.blocked and verdict.text == text
    assert verdict.reason == "the input contains personal data (EMAIL_ADDRESS, US_SSN)"
    assert "jane" not in verdict.reason and "536" not in verdict.reason
    assert [x.entity for x in verdict.findings] == ["EMAIL_ADDRESS", "US_SSN"]


def test_check_redacts_retrieved(staged):
    verdict = staged.check("contact jane@example.com", "retrieved")
    assert (verdict.action, verdict.text, verdict.reason) == ("redact", "contact <EMAIL_ADDRESS>", None)
    assert len(verdict.findings) == 1


def test_check_allow_reports_findings(staged):
    verdict = staged.check("contact jane@example.com", "output")
    assert (verdict.action, verdict.text) == ("allow", "contact jane@example.com")
    assert [x.entity for x in verdict.findings] == ["EMAIL_ADDRESS"]


@pytest.mark.parametrize("stage", ["input", "retrieved", "output"])
def test_check_without_findings_allows(staged, stage):
    verdict = staged.check("nothing personal here", stage)
    assert (verdict.action, verdict.text, verdict.findings, verdict.reason) == (
        "allow",
        "nothing personal here",
        [],
        None,
    )


def test_a_stage_not_configured_is_not_checked(monkeypatch):
    g = PiiGuard(PiiGuardConfig(actions={"input": "block"}))

    def no_detect(text, stage):
        raise AssertionError("detect ran for an unconfigured stage")

    monkeypatch.setattr(g, "detect", no_detect)
    verdict = GuardChain([(g, dict(g.config.actions))]).check("jane@example.com", "output")
    assert (verdict.action, verdict.findings) == ("allow", [])


@pytest.mark.parametrize(
    ("stage", "subject"),
    [("input", "the input"), ("retrieved", "a retrieved document"), ("output", "the answer")],
)
def test_block_reason_names_the_stage(stage, subject):
    g = PiiGuard(PiiGuardConfig(actions={stage: "block"}))
    verdict = GuardChain([(g, {stage: "block"})]).check("card 4111 1111 1111 1111", stage)
    assert verdict.reason == f"{subject} contains personal data (CREDIT_CARD)"


def test_max_entity_chars():
    assert PiiGuard(PiiGuardConfig()).max_entity_chars == MAX_ENTITY_CHARS  # URL is unbounded
    assert PiiGuard(PiiGuardConfig(entities=["US_SSN", "CREDIT_CARD"])).max_entity_chars == 20
    assert PiiGuard(PiiGuardConfig(entities=[])).max_entity_chars == 0
    assert all(0 < spec.max_chars <= MAX_ENTITY_CHARS for spec in RECOGNIZERS.values())


def test_empty_text_and_no_entities():
    assert PiiGuard(PiiGuardConfig()).detect("", "input") == []
    assert PiiGuard(PiiGuardConfig(entities=[])).detect("jane@example.com", "input") == []


def test_the_engine_is_shared(guard):
    assert PiiGuard(PiiGuardConfig(name="other"))._engine is guard._engine


def test_the_vocabulary_is_bounded(guard, monkeypatch):
    """Past its string budget an engine's blank pipeline is rebuilt, context words still working."""
    with guard._engine.lease() as analyzer:  # idle engines are reused last in, first out
        nlp_engine = analyzer.nlp_engine
    before = nlp_engine.nlp["en"]
    monkeypatch.setattr(nlp_engine, "MAX_STRINGS", len(before.vocab.strings) - 1)
    assert spans(guard, "Call me at (212) 555-0199 tonight.") == [("PHONE_NUMBER", 11, 25)]
    assert nlp_engine.nlp["en"] is not before


def test_unknown_entity_names_the_field():
    with pytest.raises(ValueError, match=r"entities: unknown entity type 'NOPE'.*known: .*CREDIT_CARD"):
        PiiGuard(PiiGuardConfig(entities=["NOPE"]))
    with pytest.raises(ValueError, match=r"'PERSON'.*need `ner:`"):
        PiiGuard(PiiGuardConfig(entities=["PERSON"]))


def test_a_spacy_model_that_is_not_installed_is_an_error_not_a_download(monkeypatch):
    import spacy.cli

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download a model")

    monkeypatch.setattr(spacy.cli, "download", no_download)
    config = PiiGuardConfig(ner=NerConfig(engine="spacy", model="en_core_web_nope"))
    with pytest.raises(ValueError, match=r"ner.model: spaCy model 'en_core_web_nope' is not installed"):
        PiiGuard(config)


def test_a_spacy_ner_pipeline_from_a_directory_plugs_in(tmp_path):
    """No trained model is installed here: an untrained pipeline shows the wiring (Presidio's
    SpacyRecognizer, NER entity types accepted), offline."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("ner").add_label("PERSON")
    nlp.initialize()
    nlp.to_disk(tmp_path / "ner")
    g = PiiGuard(
        PiiGuardConfig(entities=["EMAIL_ADDRESS", "PERSON"], ner=NerConfig(engine="spacy", model=str(tmp_path / "ner")))
    )
    with g._engine.lease() as analyzer:
        assert "SpacyRecognizer" in {r.name for r in analyzer.registry.recognizers}
    assert ("EMAIL_ADDRESS", 5, 21) in spans(g, "mail jane@example.com")


def test_a_transformers_model_must_be_a_local_directory(tmp_path):
    config = PiiGuardConfig(ner=NerConfig(engine="transformers", model="dslim/bert-base-NER"))
    with pytest.raises(ValueError, match=r"ner.model: 'dslim/bert-base-NER' is not a directory"):
        PiiGuard(config)


def test_threads_see_what_one_thread_sees(guard):
    texts = [text for text, *_ in FOUND] + [text for text, _ in NOT_FOUND]
    expected = [guard.detect(t, "input") for t in texts]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert list(pool.map(lambda t: guard.detect(t, "input"), texts)) == expected


def test_no_network_at_detect_time(guard, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert spans(guard, "mail jane@example.co.uk") == [("EMAIL_ADDRESS", 5, 23)]
    assert attempts == []


def test_a_cold_process_tries_no_network(tmp_path):
    """Engine build and first detection in a fresh process, with no tldextract cache, and DNS and
    connections refused and counted. (Presidio's own e-mail check, `tldextract.extract`, makes two
    attempts here: publicsuffix.org, then a GitHub mirror; without a timeout.)"""
    script = textwrap.dedent(
        """
        import socket

        attempts = []

        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network disabled")

        socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse
        from tierserve.safety.config import PiiGuardConfig
        from tierserve.safety.pii import PiiGuard

        guard = PiiGuard(PiiGuardConfig())
        text = "mail jane@example.co.uk from 10.0.0.1"
        print(guard.redact(text, guard.detect(text, "input")))
        print(len(attempts))
        """
    )
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-2:] == ["mail <EMAIL_ADDRESS> from <IP_ADDRESS>", "0"]
