"""Fidelity: each served tier of the embedded default generates what its checkpoint generates in
transformers (float32): greedy tokens and top-k logprobs on the fixed prompt set, through the
tier's deployment handle, the engine exactly as it serves (`tierserve.actors.fidelity`)."""

from __future__ import annotations

import pytest

from tierserve.actors import fidelity

from .conftest import TIERS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference():
    from tierserve.actors.checkpoints import prepare_embedded

    return fidelity.reference(str(prepare_embedded("smollm2-135m-instruct", progress=False)))


def served(app, tier: str, prompts_ids: list[list[int]]) -> list[fidelity.Greedy]:
    from ray import serve

    from tierserve.cluster.app import tier_deployment_name

    handle = serve.get_deployment_handle(tier_deployment_name(tier), app_name=app.name).options(stream=True)
    streams = [
        handle.generate.remote(fidelity.greedy_request(f"fidelity-{tier}-{i}", ids))
        for i, ids in enumerate(prompts_ids)
    ]
    return [fidelity.chunks_greedy([chunk for batch in stream for chunk in batch]) for stream in streams]


@pytest.mark.parametrize("tier", TIERS)
def test_served_tier_generates_what_its_checkpoint_generates(app, reference, tier):
    report = fidelity.check(
        tier, reference.prompts, reference.generations, served(app, tier, reference.prompts_ids), reference.tokenizer
    )
    print(
        f"{tier}: agreement {report.agreement:.3f}, {report.identical}/{len(report.results)} identical, "
        f"max logprob diff {report.max_logprob_diff:.4f}"
    )
    assert report.passed, report.failures()
    capital = report.results[fidelity.PROMPTS.index("What is the capital of France?")]
    assert "Paris" in capital.candidate_text
