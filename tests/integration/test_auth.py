"""API keys, per-key policy and limits, the admin scope and the audit log, on an app with auth
on (two tiny tiers, a retriever with two tenants' indexes, the PII guard, traces to an OTLP
receiver) deployed beside the shared one: through the official `openai` client, plain HTTP and
the handle API."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tierserve.core.errors import PermissionDenied, QuotaExceeded, RateLimited, Unauthenticated, unwrap_error

from .conftest import run_app, wait_for
from .tiny_models import build_tiny_llama, tiny_tier

pytestmark = pytest.mark.integration

APP = "authed"
WINDOW_S = 4
"""The app's window for failed authentications: every test here comes from one address."""
EMAIL = "mallory.secret@example.org"
CORPUS = {
    "alpha": ("apollo.md", "# Apollo\n\nThe Apollo project's launch code word is BLUEBIRD.\n"),
    "beta": ("zephyr.md", "# Zephyr\n\nThe Zephyr team's release train leaves every Friday.\n"),
}


@pytest.fixture(scope="module")
def authed(app, receiver, tmp_path_factory):
    """The app's base URL and its key store directory."""
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_application
    from tierserve.cluster.cli import main
    from tierserve.cluster.config import parse_config

    root = tmp_path_factory.mktemp("authed")
    tokenizer = prepare_embedded("smollm2-135m-instruct", progress=False)
    tiny = build_tiny_llama(root / "tiny", tokenizer, hidden=64, layers=1, heads=2, kv_heads=2, seed=0)
    for index, (name, text) in CORPUS.items():
        (root / index).mkdir()
        (root / index / name).write_text(text)
        assert main(["rag", "ingest", str(root / index), "--index", index, "--store", str(root / "indexes")]) == 0
    config = parse_config(
        {
            "name": APP,
            "tiers": [tiny_tier("one", tiny, 4), tiny_tier("two", tiny, 4)],
            "ingress": {
                "deployment": {"num_cpus": 0},
                "auth": {
                    "enabled": True,
                    "store": str(root / "auth" / "keys.db"),
                    "refresh_s": 0.5,
                    "failed": {"max_failures": 8, "window_s": WINDOW_S},
                },
            },
            "routing": {"tiers": {"one": {"cost": {"input_per_million": 1, "output_per_million": 2}}}},
            "rag": {
                "enabled": True,
                "store": str(root / "indexes"),
                "bundled": None,
                "default_index": "alpha",
                "deployment": {"num_cpus": 0},
            },
            "safety": {
                "enabled": True,
                "guards": [{"type": "pii", "actions": {"input": "redact", "output": "redact"}}],
            },
            "telemetry": {"exporter": "otlp", "endpoint": receiver.endpoint, "batch_delay_ms": 100},
        }
    )
    (root / "auth").mkdir()
    yield run_app(app, build_application(config), APP), root / "auth" / "keys.db"
    serve.delete(APP)


def luhn_card() -> str:
    """A random Visa-shaped number that passes the Luhn check, as 4 groups of 4 digits."""
    digits = [4] + [secrets.randbelow(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    number = "".join(map(str, digits + [(10 - total % 10) % 10]))
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def create_key(store: Path, *flags: str) -> tuple[str, str]:
    """(key id, key) made by `tierserve keys create`, as an operator would."""
    import contextlib
    import io

    from tierserve.cluster.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["keys", "create", "--name", f"test-{secrets.token_hex(2)}", "--store", str(store), *flags]) == 0
    created = json.loads(out.getvalue().split("\n# ")[0])
    # The ingress rereads the store every `refresh_s` (0.5 s): trying the key before would count
    # as failed authentications from this address.
    time.sleep(1.2)
    return created["id"], created["key"]


def client(base: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: OpenAI, model: str = "auto", **body):
    return c.completions.create(model=model, prompt="Hello", max_tokens=2, **body)


def test_no_key_a_bad_key_and_a_revoked_key_get_401_before_the_body_is_read(authed):
    base, store = authed
    r = httpx.post(f"{base}/v1/completions", json={"model": "auto", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    for key in ("not-a-key", "tsk-000000000000-" + "A" * 43):
        with pytest.raises(openai.AuthenticationError) as denied:
            ask(client(base, key))
        assert denied.value.response.headers["www-authenticate"] == "Bearer"
        assert denied.value.body["type"] == "authentication_error"
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401  # not 400: the anonymous learn nothing about the body
    r = httpx.get(f"{base}/no/such/route")
    assert r.status_code == 401  # nor which routes exist
    key_id, key = create_key(store)
    time.sleep(WINDOW_S)  # the 5 failures above are forgotten
    assert ask(client(base, key)).choices
    import contextlib
    import io

    from tierserve.cluster.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["keys", "rotate", key_id, "--store", str(store)]) == 0
    rotated = json.loads(out.getvalue().split("\n# ")[0])["key"]
    assert wait_for(lambda: httpx.get(f"{base}/v1/models", headers=bearer(key)).status_code == 401, timeout=10)
    assert httpx.get(f"{base}/v1/models", headers=bearer(rotated)).status_code == 200
    assert main(["keys", "revoke", key_id, "--store", str(store)]) == 0
    assert wait_for(lambda: httpx.get(f"{base}/v1/models", headers=bearer(rotated)).status_code == 401, timeout=10)
    time.sleep(WINDOW_S)  # for the next test


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_repeated_bad_keys_are_slowed_then_let_in_again(authed):
    base, store = authed
    _, key = create_key(store)
    ask(client(base, key))
    codes = [
        httpx.get(f"{base}/v1/models", headers=bearer("tsk-000000000000-" + "B" * 43)).status_code for _ in range(9)
    ]
    assert codes == [401] * 8 + [429]
    with pytest.raises(openai.RateLimitError) as slowed:
        ask(client(base, "tsk-000000000000-" + "C" * 43))
    assert slowed.value.body["code"] == "too_many_failed_authentications"
    wait = int(slowed.value.response.headers["retry-after"])
    assert 1 <= wait <= WINDOW_S
    # A valid key from the same address is let in: bad keys from behind one address (a load
    # balancer) lock no one out.
    assert ask(client(base, key)).choices
    time.sleep(wait + 0.2)
    with pytest.raises(openai.AuthenticationError):  # the window is over: a plain 401 again
        ask(client(base, "tsk-000000000000-" + "D" * 43))
    time.sleep(WINDOW_S)  # for the next test


def test_a_key_reaches_only_its_tiers_and_auto_routes_among_them(authed):
    base, store = authed
    _, key = create_key(store, "--model", "auto", "--model", "two")
    c = client(base, key)
    ask(c, "two")
    assert [m.id for m in c.models.list()] == ["auto", "two"]
    assert c.models.retrieve("two").id == "two"
    with pytest.raises(openai.NotFoundError):  # as the list, retrieving tells only of its own tiers
        c.models.retrieve("one")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        ask(c, "one")
    assert denied.value.body["code"] == "model_not_allowed" and denied.value.body["param"] == "model"
    for _ in range(3):
        r = c.completions.with_raw_response.create(model="auto", prompt="Hello", max_tokens=2)
        assert r.headers["x-tierserve-tier"] == "two"  # the default tier `one` is not among its tiers
    # The embedding model is a model like the tiers: a key uses it only if it names it.
    with pytest.raises(openai.PermissionDeniedError):
        c.embeddings.create(model="all-MiniLM-L6-v2", input="hello")
    _, embedding_key = create_key(store, "--model", "all-MiniLM-L6-v2")
    e = client(base, embedding_key)
    assert [m.id for m in e.models.list()] == ["all-MiniLM-L6-v2"]
    assert len(e.embeddings.create(model="all-MiniLM-L6-v2", input="hello").data[0].embedding) == 384


def test_one_key_cannot_read_another_keys_index_nor_tell_it_exists(authed):
    base, store = authed
    _, alpha = create_key(store, "--index", "alpha")
    _, beta = create_key(store, "--index", "beta")
    question = [{"role": "user", "content": "What is the Apollo project's launch code word?"}]
    own = client(base, alpha).chat.completions.create(
        model="one", messages=question, max_tokens=4, extra_body={"retrieval": {"index": "alpha"}}
    )
    assert [c["doc_id"] for c in own.model_extra["tierserve"]["retrieval"]["citations"]] == ["apollo.md"]
    ask(client(base, beta))
    answers = {}
    for index in ("alpha", "no-such-index"):
        with pytest.raises(openai.NotFoundError) as hidden:
            client(base, beta).chat.completions.create(
                model="one", messages=question, max_tokens=4, extra_body={"retrieval": {"index": index}}
            )
        answers[index] = hidden.value.body
    # The same answer for an index that exists and one that does not, and no index named.
    assert answers["alpha"] == {
        **answers["no-such-index"],
        "message": answers["no-such-index"]["message"].replace("no-such-index", "alpha"),
    }
    assert answers["alpha"]["code"] == "index_not_found" and "beta" not in answers["alpha"]["message"]
    # The default index is the key's to read too, and is not named to a key that may not.
    with pytest.raises(openai.NotFoundError) as default:
        client(base, beta).chat.completions.create(
            model="one", messages=question, max_tokens=4, extra_body={"retrieval": True}
        )
    assert "alpha" not in default.value.body["message"] and default.value.body["code"] == "index_not_found"
    # Nor does the index listing tell: it is an admin route.
    assert httpx.get(f"{base}/v1/indexes", headers=bearer(beta)).status_code == 403


def test_admin_routes_need_the_admin_scope_and_health_tells_the_anonymous_only_up_or_down(authed):
    base, store = authed
    _, user = create_key(store)
    _, admin = create_key(store, "--admin")
    ask(client(base, admin))
    for route in ("/v1/tiers", "/v1/indexes", "/docs", "/openapi.json"):
        assert httpx.get(f"{base}{route}", headers=bearer(user)).status_code == 403, route
        assert httpx.get(f"{base}{route}").status_code == 401, route
        assert httpx.get(f"{base}{route}", headers=bearer(admin)).status_code == 200, route
    anonymous = wait_for(lambda: httpx.get(f"{base}/health").json(), timeout=60)
    assert anonymous == {"status": "ok"}
    full = httpx.get(f"{base}/health", headers=bearer(admin)).json()
    assert full["status"] == "ok" and set(full["tiers"]) == {"one", "two"}
    assert httpx.get(f"{base}/health", headers=bearer(user)).json() == {"status": "ok"}


def test_requests_per_minute_is_enforced_and_recovers(authed):
    base, store = authed
    _, key = create_key(store, "--rpm", "6")
    c = client(base, key)
    ask(c)
    for _ in range(5):
        ask(c)
    with pytest.raises(openai.RateLimitError) as limited:
        ask(c)
    assert limited.value.body["code"] == "rate_limit_exceeded"
    wait = int(limited.value.response.headers["retry-after"])
    assert 1 <= wait <= 10
    time.sleep(wait)
    assert ask(c).choices


def test_tokens_per_minute_charges_what_was_spent_and_recovers(authed):
    """Charged what it spent, a stream the client leaves early included."""
    base, store = authed
    _, key = create_key(store, "--tpm", "60")
    c = client(base, key)
    ask(c)
    stream = c.completions.create(
        model="one", prompt="Once", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    for received, _ in enumerate(stream, 1):
        if received == 70:
            break
    stream.close()  # left after 70 or more tokens: no usage came, the tokens still count
    with pytest.raises(openai.RateLimitError) as limited:
        _until_refused(c)
    wait = int(limited.value.response.headers["retry-after"])
    assert 1 <= wait <= 70
    time.sleep(wait)
    assert ask(c).choices


def test_concurrent_streams_are_bounded_and_a_client_that_leaves_frees_its_place(authed):
    base, store = authed
    _, key = create_key(store, "--max-concurrent", "1")
    c = client(base, key)
    ask(c)
    stream = c.completions.create(
        model="one", prompt="Once", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as limited:
        ask(c)
    assert limited.value.body["code"] == "concurrency_limit_exceeded"
    stream.close()  # the client leaves mid-stream
    assert wait_for(lambda: _served(c), timeout=10)


def _until_refused(c: OpenAI, timeout: float = 5.0) -> None:
    """Ask until refused (the charge of a stream just left lands when the tier has stopped it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ask(c)
        time.sleep(0.2)


def _served(c: OpenAI) -> bool:
    try:
        return bool(ask(c).choices)
    except openai.RateLimitError:
        return False


def test_a_spent_budget_is_refused_with_insufficient_quota_until_the_period_renews(authed):
    base, store = authed
    key_id, key = create_key(store, "--budget-tokens", "40", "--budget-period", "day")
    c = client(base, key)
    c.completions.create(model="one", prompt="Once", max_tokens=48, extra_body={"ignore_eos": True})

    def refused():
        try:
            ask(c)
        except openai.RateLimitError as exc:
            return exc
        return None

    spent = wait_for(refused, timeout=10)
    assert (
        spent is not None and spent.body["code"] == "insufficient_quota" and spent.body["type"] == "insufficient_quota"
    )
    assert int(spent.response.headers["retry-after"]) >= 1  # seconds to midnight UTC
    from tierserve.router.keys import Budget, KeyStore, period_of

    period = period_of(Budget(period="day"), time.time())[0]
    recorded = wait_for(lambda: KeyStore(store, b"unused").usage({key_id: period}).get(key_id), timeout=10)
    assert recorded and recorded[0] >= 48  # what the replicas spent, in the store
    # It renews with the period (tests/unit/test_access.py moves the clock); an operator may
    # raise it at once.
    from tierserve.cluster.cli import main

    raised = ["keys", "update", key_id, "--budget-tokens", "1000", "--budget-period", "day", "--store", str(store)]
    assert main(raised) == 0
    assert wait_for(lambda: _served(c), timeout=10)


def handle_error(call) -> BaseException:
    with pytest.raises(Exception) as err:
        call()
    return unwrap_error(err.value)


def test_the_handle_api_applies_the_same_checks_and_recovers(authed):
    from ray import serve

    base, store = authed
    handle = serve.get_app_handle(APP)
    streaming = handle.options(stream=True)
    body = {"model": "one", "prompt": "Hello", "max_tokens": 2}
    complete = lambda key, **more: handle.complete.remote({**body, **more}, api_key=key).result(timeout_s=60)  # noqa: E731
    assert isinstance(handle_error(lambda: handle.complete.remote(body).result(timeout_s=60)), Unauthenticated)
    # Tiers, the admin scope and requests per minute.
    _, key = create_key(store, "--model", "one", "--rpm", "6")
    assert isinstance(handle_error(lambda: complete(key, model="two")), PermissionDenied)
    assert isinstance(handle_error(lambda: handle.tiers.remote(api_key=key).result(timeout_s=60)), PermissionDenied)
    for _ in range(6):
        assert complete(key).choices
    limited = handle_error(lambda: complete(key))
    assert isinstance(limited, RateLimited) and 0 < limited.retry_after_s <= 10
    time.sleep(limited.retry_after_s)
    assert complete(key).choices
    # Tokens per minute.
    _, key = create_key(store, "--tpm", "60")
    assert complete(key, max_tokens=64, ignore_eos=True).choices
    limited = handle_error(lambda: complete(key))
    assert isinstance(limited, RateLimited) and limited.retry_after_s > 0
    time.sleep(limited.retry_after_s)
    assert complete(key).choices
    # Concurrent requests: a stream the caller stops reading gives its place back.
    _, key = create_key(store, "--max-concurrent", "1")
    stream = streaming.complete_stream.remote({**body, "max_tokens": 400, "ignore_eos": True}, api_key=key)
    next(iter(stream))
    limited = handle_error(lambda: complete(key))
    assert isinstance(limited, RateLimited) and limited.code == "concurrency_limit_exceeded"
    stream.cancel()
    assert wait_for(lambda: _handle_served(complete, key), timeout=10)
    # A budget, until the operator raises it.
    key_id, key = create_key(store, "--budget-tokens", "40", "--budget-period", "day")
    assert complete(key, max_tokens=48, ignore_eos=True).choices
    spent = handle_error(lambda: complete(key))
    assert isinstance(spent, QuotaExceeded) and spent.retry_after_s >= 1
    from tierserve.cluster.cli import main

    raised = ["keys", "update", key_id, "--budget-tokens", "1000", "--budget-period", "day", "--store", str(store)]
    assert main(raised) == 0
    assert wait_for(lambda: _handle_served(complete, key), timeout=10)


def _handle_served(complete, key: str) -> bool:
    try:
        return bool(complete(key).choices)
    except Exception as exc:
        if isinstance(unwrap_error(exc), (RateLimited, QuotaExceeded)):
            return False
        raise


def test_audit_lines_logs_and_spans_never_hold_the_raw_prompt(app, authed, receiver):
    """A request full of personal data: its audit line says who, where, how much and what the
    guards found, and no log line nor span attribute anywhere holds the raw values."""
    import ray

    base, store = authed
    key_id, key = create_key(store)
    marker = f"zq{secrets.token_hex(6)}"
    card = luhn_card()
    content = f"My e-mail is {EMAIL} and my card is {card}; codename {marker}. Say hi."
    c = client(base, key)
    r = c.chat.completions.with_raw_response.create(
        model="one", messages=[{"role": "user", "content": content}], max_tokens=8
    )
    from tierserve.router.tracing import TRACE_ID_HEADER

    trace_id = r.headers[TRACE_ID_HEADER]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    audit = store.with_name("audit.jsonl")  # the default: beside the key store

    def audit_line():  # written once the response has gone out
        return next((x for x in map(json.loads, audit.read_text().splitlines()) if x["key_id"] == key_id), None)

    line = wait_for(audit_line, timeout=10)
    assert line, "no audit line for the request"
    assert line["route"] == "POST /v1/chat/completions" and line["status"] == 200 and line["tier"] == "one"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0 and line["outcome"] == "finished"
    assert line["guard_findings"]["input"]["EMAIL_ADDRESS"] == 1 and re.fullmatch(
        r"[0-9a-f]{64}", line["prompt_sha256"]
    )
    # Nothing raw in the audit log, nor any log file of the cluster ...
    raw = [EMAIL, card, card.replace(" ", ""), marker, "mallory.secret"]
    assert not [v for v in raw if v in audit.read_text()]
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            leaked = [v for v in raw if v in text]
            assert not leaked, f"{leaked} in {path}"
    # ... nor in any span attribute: the request's (its token spans included), or any other.
    receiver.wait_for(trace_id, lambda spans: any(x.name == "token" for x in spans))
    for span in receiver.spans:
        dumped = json.dumps(span.attributes, default=str)
        assert not [v for v in raw if v in dumped], span.name


def test_metrics_count_requests_tokens_and_refusals_per_key_id(app, authed):
    base, store = authed
    key_id, key = create_key(store, "--model", "one")
    c = client(base, key)
    ask(c, "one")
    with pytest.raises(openai.PermissionDeniedError):
        ask(c, "two")

    def series():
        text = httpx.get(app.metrics, timeout=30).text
        wanted = ("ray_tierserve_key_requests", "ray_tierserve_key_tokens", "ray_tierserve_key_refusals")
        found = {
            name: [ln for ln in text.splitlines() if ln.startswith(name) and f'key_id="{key_id}"' in ln]
            for name in wanted
        }
        return found if all(found.values()) else None

    found = wait_for(series, timeout=60, interval=1)
    assert found, "per-key series missing"
    assert any('code="model_not_allowed"' in ln for ln in found["ray_tierserve_key_refusals"])
    assert key not in httpx.get(app.metrics, timeout=30).text  # the id, never the key
