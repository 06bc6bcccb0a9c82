"""The fidelity comparison (`tierserve.actors.fidelity.compare`), on hand-made generations."""

from tierserve.actors import fidelity


def test_a_flip_the_reference_does_not_call_a_tie_fails():
    # Position 1: the candidate chose the reference's runner-up, ranked 2 nats below: an error.
    reference = fidelity.Greedy([5, 7, 9], [{5: -0.1}, {7: -0.2, 8: -2.2}, {9: -0.1}])
    candidate = fidelity.Greedy([5, 8, 3], [{5: -0.1}, {8: -0.3, 7: -0.4}, {3: -0.1}])
    result = fidelity.compare("p", reference, candidate)
    assert (result.agreed, result.diverged_at, result.passed) == (1, 1, False)
    assert "2.00 nats" in result.reason
    # Within twice the tolerance (0.1 nats of noise on each side could swap them): it passes.
    reference.top[1][8] = -0.35
    assert fidelity.compare("p", reference, candidate).passed
    # A candidate token outside the reference's top-k fails whatever the margin.
    candidate.token_ids[1] = 4
    candidate.top[1] = {4: -0.1, 7: -0.2}
    assert "not in the reference's top" in fidelity.compare("p", reference, candidate).reason


def test_identical_generations_pass_only_with_logprobs_within_the_tolerance():
    reference = fidelity.Greedy([5, 7], [{5: -0.1, 6: -3.0}, {7: -0.2}])
    candidate = fidelity.Greedy([5, 7], [{5: -0.15, 6: -2.92}, {7: -0.2}])
    result = fidelity.compare("p", reference, candidate)
    assert result.passed and result.diverged_at is None and result.agreed == 2
    assert abs(result.max_logprob_diff - 0.08) < 1e-9
    # The same tokens with a runner-up 0.3 nats off (bfloat16 kernels moved them that far).
    candidate.top[0][6] = -2.7
    result = fidelity.compare("p", reference, candidate)
    assert not result.passed and result.agreed == 2 and "position 0: token 6" in result.reason


def test_a_generation_that_ends_where_the_other_goes_on_fails():
    # Both sides keep their end-of-sequence token: choosing it is a divergence like any other.
    reference = fidelity.Greedy([5, 2], [{5: -0.1}, {2: -0.3, 9: -0.4}])  # 2 ends the sequence
    candidate = fidelity.Greedy([5, 9, 4], [{5: -0.1}, {9: -0.3, 2: -0.35}, {4: -0.1}])
    assert fidelity.compare("p", reference, candidate).passed  # a near tie at position 1
    # A strict prefix ended without choosing a token at all.
    result = fidelity.compare("p", fidelity.Greedy([5, 9], [{5: -0.1}, {9: -0.1}]), fidelity.Greedy([5], [{5: -0.1}]))
    assert result.diverged_at == 1 and not result.passed


def test_a_report_fails_when_any_prompt_fails():
    same = fidelity.Greedy([1], [{1: -0.1}])
    other = fidelity.Greedy([2], [{2: -0.1}])
    report = fidelity.check("t", ["a", "b"], [same, same], [same, other])
    assert not report.passed and report.identical == 1 and report.agreement == 0.5
    assert len(report.failures()) == 1
