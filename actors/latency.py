"""What a tier's latency looks like now, measured from its own engine steps, for the router.

The router predicts a new request's time to first token (TTFT) and time per output token
(TPOT) on each tier before it sends it anywhere. A tier cannot know that for a request it has
not seen, but it can say what its steps cost: vLLM runs continuous batching, so a request's
first token comes after the step that prefills it, and each later token after one decode step
of the whole batch. `StepCostModel` fits

    step_ms = base + per_seq * running_sequences + per_kprompt * prefill_tokens / 1000

to the engine's own steps by recursive least squares with forgetting, so the fit follows the
tier as its load and its speculation change. With it, and with the tier's recent output
length and tokens per step, the router's policy (`tierserve.router.policy`) turns a load into
a predicted TTFT and TPOT. `LatencyTracker` also keeps the TTFT and TPOT the tier actually
delivered, shown at `GET /v1/tiers` beside the model (the router does not use them yet).
"""

from __future__ import annotations

import time

import numpy as np

from tierserve.actors.types import TierLoad


class StepCostModel:
    """Decayed least-squares fit of step time to batch size and prefill tokens."""

    FEATURES = 3

    SLOPE_RIDGE = 1e-4
    """A lasting pull of the two slopes towards 0 (in the units of the normal equations: one
    step's weight is 1). Steps that vary the load outweigh it at once; it decides only what
    the steps cannot: with one request at a time for thousands of steps every step runs one
    sequence, the constant and the per-sequence term are the same column, and once the prior
    has faded the equations are singular. Then the fit takes no slope, as the prior does."""

    def __init__(self, forgetting: float = 0.995, prior_ms: float = 50.0, prior_weight: float = 0.01):
        self.forgetting = forgetting
        # A weak prior: `prior_ms` per step whatever the load, until steps say otherwise.
        self._a = np.eye(self.FEATURES) * prior_weight
        self._b = np.array([prior_ms, 0.0, 0.0]) * prior_weight
        self._coef = np.array([prior_ms, 0.0, 0.0])
        self.samples = 0

    @staticmethod
    def _x(running: int, prefill_tokens: int) -> np.ndarray:
        return np.array([1.0, float(running), prefill_tokens / 1000.0])

    def observe(self, running: int, prefill_tokens: int, step_ms: float) -> None:
        x = self._x(running, prefill_tokens)
        self._a = self.forgetting * self._a + np.outer(x, x)
        self._b = self.forgetting * self._b + x * step_ms
        self.samples += 1
        if self.samples <= 32 or self.samples % 8 == 0:  # a 3x3 solve; no need every step
            self._coef = self._solve()

    def _solve(self) -> np.ndarray:
        """Least squares with the slopes kept >= 0: step time never falls with load, and a
        negative slope is what noise over a narrow range of loads looks like. A slope that
        comes out negative is fixed at 0 and the rest refitted without it. The equations stay
        solvable (`SLOPE_RIDGE`): the constant's own entry is the decayed count of steps, > 0."""
        a = self._a + np.diag([0.0] + [self.SLOPE_RIDGE] * (self.FEATURES - 1))
        free = [0, 1, 2]
        while True:
            coef = np.zeros(self.FEATURES)
            coef[free] = np.linalg.solve(a[np.ix_(free, free)], self._b[free])
            negative = [i for i in free[1:] if coef[i] < 0]
            if not negative:
                coef[0] = max(coef[0], 1e-3)
                return coef
            free.remove(negative[0])

    @property
    def coefficients(self) -> tuple[float, float, float]:
        base, per_seq, per_kprompt = (float(c) for c in self._coef)
        return base, per_seq, per_kprompt


class Ewma:
    """Exponentially weighted mean; None until the first value."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class LatencyTracker:
    """Everything a tier reports in its `TierLoad`: step costs, output lengths, delivered latency."""

    def __init__(self, max_num_seqs: int, prior_step_ms: float = 50.0):
        self.max_num_seqs = max_num_seqs
        self.priority_scheduling = False
        """Whether the engine schedules by request priority (set once it has started)."""
        self.steps = StepCostModel(prior_ms=prior_step_ms)
        self.tokens_per_step = Ewma(0.05)
        """Tokens a running sequence gets per decode step (above 1 with accepted speculation)."""
        self.prefill_tokens = Ewma(0.05)
        """Prompt tokens prefilled per step, over all steps (chunked prefill shares steps with decoding)."""
        self.output_tokens = Ewma(0.1)
        self.ttft_ms = Ewma(0.2)
        self.tpot_ms = Ewma(0.2)

    def observe_step(self, running: int, prefill_tokens: int, generated: int, step_s: float) -> None:
        if running <= 0:
            return
        self.steps.observe(running, prefill_tokens, 1e3 * step_s)
        self.prefill_tokens.add(float(prefill_tokens))
        if not prefill_tokens and generated:
            self.tokens_per_step.add(generated / running)

    def observe_request(self, ttft_s: float | None, tpot_s: float | None, output_tokens: int) -> None:
        if ttft_s is not None:
            self.ttft_ms.add(1e3 * ttft_s)
        if tpot_s is not None:
            self.tpot_ms.add(1e3 * tpot_s)
        if output_tokens:
            self.output_tokens.add(float(output_tokens))

    def load(self, running: int, waiting: int, max_model_len: int) -> TierLoad:
        base, per_seq, per_kprompt = self.steps.coefficients
        return TierLoad(
            running=running,
            waiting=waiting,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_model_len,
            step_ms_base=base,
            step_ms_per_seq=per_seq,
            step_ms_per_kprompt=per_kprompt,
            tokens_per_step=self.tokens_per_step.value or 1.0,
            mean_output_tokens=self.output_tokens.value,
            prefill_tokens_per_step=self.prefill_tokens.value or 0.0,
            ttft_ms=self.ttft_ms.value,
            tpot_ms=self.tpot_ms.value,
            step_samples=self.steps.samples,
            priority_scheduling=self.priority_scheduling,
            at=time.time(),
        )
