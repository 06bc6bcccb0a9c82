"""User errors keep their type, status and fields across pickling (the Ray boundary)."""

import pickle

import pytest

from tierserve.core.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    TierServeError,
    unwrap_error,
)


@pytest.mark.parametrize(
    "error, status, code",
    [
        (InvalidRequest("bad", "temperature"), 400, "invalid_request"),
        (ContextLengthExceeded("too long", "max_tokens"), 400, "context_length_exceeded"),
        (ModelNotFound("no such model", "model"), 404, "model_not_found"),
        (ServiceUnavailable("engine dead"), 503, "engine_unavailable"),
    ],
)
def test_errors_pickle_and_render(error, status, code):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.status_code, back.code, back.param, back.message) == (status, code, error.param, error.message)
    body = back.to_openai()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == code


def test_explicit_code_overrides_default():
    assert InvalidRequest("x", None, "invalid_json").code == "invalid_json"


def test_unwrap_follows_cause_chain():
    inner = ModelNotFound("m")

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    assert unwrap_error(Wrapper(Wrapper(inner))) is inner
    plain = ValueError("x")
    assert unwrap_error(plain) is plain
    assert isinstance(unwrap_error(Wrapper(inner)), TierServeError)
