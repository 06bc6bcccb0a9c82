"""`handle_error`: Ray's and Serve's failures of a handle call as the user errors they mean.

Ray's exception types are built here as Ray raises them (no cluster needed); the wrapping a
callee's error gets on its way back is Ray's own `RayTaskError.as_instanceof_cause`."""

from __future__ import annotations

import pytest
import ray.exceptions
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from tierserve.core.errors import InvalidRequest, Overloaded, ServiceUnavailable
from tierserve.router.handles import handle_error

RETRIEVER = {
    "unavailable_code": "retriever_unavailable",
    "full_queue": ServiceUnavailable,
    "retry_after_s": 1.0,
}


def _wrapped(cause: BaseException) -> BaseException:
    """`cause` as a caller of a Serve handle sees it: inside Ray's task error."""
    return ray.exceptions.RayTaskError("generate", "traceback", cause).as_instanceof_cause()


def test_a_callee_user_error_comes_back_as_itself():
    error = InvalidRequest("max_tokens is 9999", "max_tokens")
    mapped = handle_error(_wrapped(error), "tier 'small'", "model")
    assert type(mapped) is InvalidRequest and mapped.param == "max_tokens" and str(mapped) == "max_tokens is 9999"


@pytest.mark.parametrize(
    "failure",
    [
        ray.exceptions.RayActorError(),
        ray.exceptions.ActorUnavailableError("the actor is restarting", None),
        DeploymentUnavailableError(DeploymentID(name="tier-small", app_name="tierserve")),
    ],
)
def test_a_dead_or_missing_replica_is_unavailable(failure):
    tier = handle_error(failure, "tier 'small'", "model")
    assert isinstance(tier, ServiceUnavailable)
    assert (tier.status_code, tier.param, tier.code, tier.retry_after_s) == (503, "model", "engine_unavailable", None)
    assert str(tier).startswith("tier 'small' is unavailable")
    retriever = handle_error(failure, "the retriever", "retrieval", **RETRIEVER)
    assert (retriever.status_code, retriever.param, retriever.code) == (503, "retrieval", "retriever_unavailable")
    assert retriever.retry_after_s == 1.0


def test_a_full_queue_is_429_for_a_tier_and_503_for_the_retriever():
    full = BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=3.0)
    tier = handle_error(full, "tier 'small'", "model")
    assert isinstance(tier, Overloaded)
    assert (tier.status_code, tier.code, tier.retry_after_s) == (429, "overloaded", 3.0)
    retriever = handle_error(full, "the retriever", "retrieval", **RETRIEVER)
    assert type(retriever) is ServiceUnavailable
    assert (retriever.status_code, retriever.code, retriever.retry_after_s) == (503, "retriever_unavailable", 3.0)
    unproposed = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    assert handle_error(unproposed, "tier 'small'", "model").retry_after_s == Overloaded.default_retry_after_s
    assert handle_error(unproposed, "the retriever", "retrieval", **RETRIEVER).retry_after_s == 1.0


def test_anything_else_is_a_bug_and_comes_back_unwrapped():
    bug = KeyError("missing")
    assert handle_error(_wrapped(bug), "tier 'small'", "model") is bug
    assert handle_error(_wrapped(bug), "the retriever", "retrieval", **RETRIEVER) is bug
