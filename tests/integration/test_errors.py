"""Bad input gets a 4xx in the OpenAI error schema, never a 500 or a hang."""

import openai
import pytest

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "path, body, status, code, param",
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/chat/completions", b'{"model": "auto", "messages": "hi"}', 400, "invalid_request", "messages"),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            400,
            "invalid_request",
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
            "invalid_request",
            "max_tokens",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request", "model"),
        ("/v1/chat/completions", b'{"model": "auto", "messages": []}', 400, "invalid_request", "messages"),
        ("/v1/completions", b'{"model": "auto", "prompt": 5}', 400, "invalid_request", "prompt"),
        ("/v1/completions", b'{"model": "auto", "prompt": ["a", "b"]}', 400, "invalid_request", "prompt"),
        ("/v1/completions", b"[1, 2]", 400, "invalid_request", None),
    ],
)
def test_malformed_requests(http, path, body, status, code, param):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["code"] == code
    if param:
        assert err["param"].startswith(param)


GOOD = b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_a_json_body_of_another_content_type_is_a_400_that_says_so(http, content_type):
    """What `curl -d` without a header sends. JSON is read only from application/json (or none
    given): a browser must ask CORS before it may send that, not before a form."""
    r = http.post("/v1/chat/completions", content=GOOD, headers={"content-type": content_type})
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "invalid_content_type" and "Content-Type: application/json" in err["message"]
    for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        assert (
            http.post("/v1/chat/completions", content=GOOD, headers={"content-type": content_type}).status_code == 200
        )


def test_json_nested_past_the_decoders_depth_is_invalid_json(http):
    r = http.post("/v1/chat/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(client, stream):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MSG, stream=stream)
    assert err.value.code == "model_not_found" and err.value.param == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_over_context_is_400(client, stream):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="small", messages=MSG, max_tokens=4096, stream=stream)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 2048" in err.value.message


def test_prompt_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="small", prompt="word " * 3000, max_tokens=1)
    assert err.value.code == "context_length_exceeded"
    # `auto` sends it to the tier with the longest context, and over that one too it is a 400.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="auto", prompt="word " * 9000, max_tokens=1)
    assert err.value.code == "context_length_exceeded" and "8192" in err.value.message


def test_token_ids_outside_vocab_are_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="auto", prompt=[1, 10_000_000], max_tokens=1)
    assert err.value.param == "prompt"


BAD = [
    # (path, body fields, param the 400 names) — each answered 500 before the fix
    ("/v1/chat/completions", {"min_tokens": 30, "max_tokens": 10}, "min_tokens"),
    ("/v1/chat/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/chat/completions", {"seed": 2**70}, "seed"),
    ("/v1/chat/completions", {"top_k": 2**70}, "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "messages.0"),
    ("/v1/chat/completions", {"retrieval": {"index": "../x"}}, "retrieval.index"),
    ("/v1/chat/completions", {"retrieval": {"filters": {"n": 12345678901234567890123}}}, "retrieval.filters.n"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20}, "min_tokens"),
]


@pytest.mark.parametrize("path, fields, param", BAD)
def test_bad_values_are_400_naming_the_field(http, path, fields, param):
    body = {"model": "auto", **({"prompt": "x"} if path == "/v1/completions" else {"messages": MSG}), **fields}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"].startswith(param)


@pytest.mark.parametrize(
    "raw, param",
    [
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e999}',
            "repetition_penalty",
        ),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "slo_ttft_ms": 1e999}', "slo_ttft_ms"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ],
)
def test_numbers_and_text_json_cannot_carry_are_400(http, raw, param):
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert error_of(r)["param"].startswith(param)


def test_a_body_over_the_limit_is_413(http):
    big = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}'
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield big[: 1 << 20]
        yield big[1 << 20 :]

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_logprobs_above_limit_are_400(http):
    r = http.post("/v1/completions", json={"model": "auto", "prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and error_of(r)["param"] == "logprobs"


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["message"]
