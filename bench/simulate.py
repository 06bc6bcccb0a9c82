"""Routing at scale, in simulation: the real router (`tierserve.router.sim`) on simulated replicas.

    .venv/bin/python bench/simulate.py calibrate [--rates 1,3,5] [--duration-s 60] [--tier NAME]
        the embedded default for real and in simulation, on the same arrivals, side by side
        (with --tier, every request asks for that tier: one engine, the other core left to the
        front end)
    .venv/bin/python bench/simulate.py scale [--sizes 8,64] [--duration-s 30] [--max-rate 1000]
        configs/gpu.yaml's tiers with published GPU step times: the router against
        single-tier, round-robin, random and least-loaded, load sweeps (as shipped, 3:1; the
        largest size also 1:1 and with a third, 3B tier up to --max-rate), arrival patterns,
        failures
    .venv/bin/python bench/simulate.py predictions [--size 64] [--multiple 2]
        the router's TPOT predictions against the simulated TPOT, routing.tpot_counts_prefill off and on

Each writes its sections of docs/routing-simulation.md (between `<!-- begin/end: NAME -->`
markers) and its plots under docs/images/.

A request meets its SLO when it is served within its class's TTFT and TPOT budgets (measured from
its arrival, as a client measures); shed and failed requests do not. Goodput is the share that
does. "Hard on strong" is the share of requests whose complexity score reaches the strong tier's
`min_complexity` that the strong tier served: what the router's quality routing buys.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "routing-simulation.md"
IMAGES = REPO / "docs" / "images"
PROFILES = REPO / "bench" / "profiles"
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from report import replace_section  # noqa: E402

from tierserve.router.sim import Arrival, Event, Outcome, Summary, TrafficMix, poisson_arrivals, simulate, summarize  # noqa: E402

BASELINES = ("round_robin", "random", "least_loaded")


def machine() -> str:
    return f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def error(simulated: float | None, measured: float | None) -> str:
    if simulated is None or not measured:
        return "-"
    return f"{(simulated - measured) / measured:+.0%}"


def scorer_of(config):
    """The config's own complexity scorer (what its router scores with), loaded once a run."""
    from tierserve.cluster.config import model_cache_dir
    from tierserve.router.complexity import scorer_for

    return scorer_for(config.routing.complexity, model_cache_dir(config, None) / "router")


def scores_of(scorer, texts: Sequence[str]) -> list[float]:
    return [s.value for s in scorer.score_many(list(texts), [1] * len(texts))]


# ----- calibration: the embedded default, for real and in simulation -------------------------


def calibrate(args: argparse.Namespace) -> None:
    from routing_load import deploy, drive, start_ray_and_serve, workload
    from transformers import AutoTokenizer

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.ops import ingress_tiers
    from tierserve.cluster.router_commands import simulated_tiers, tier_profiles
    from tierserve.router.simengine import FrontEnd, save_profiles

    rates = [float(r) for r in args.rates.split(",")]
    model = args.tier or "auto"
    base, config = start_ray_and_serve()
    deploy(base, config, "priority")
    budgets = {name: (c.ttft_ms, c.tpot_ms) for name, c in config.routing.sla_classes.items()}
    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded("smollm2-135m-instruct"))

    def arrivals(seed: int, rate: float, duration_s: float, tier: str | None = None) -> list[Arrival]:
        items = workload(seed, rate, duration_s)
        scores = scores_of(scorer, [p for _, p, _, _ in items])
        out = []
        for (at, prompt, sla_class, max_tokens), score in zip(items, scores):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            out.append(Arrival(at, len(chat), max_tokens, sla_class, score, tier))
        return out

    async def measure():
        # The front end's CPU: every process but the engines' (the load generator's included,
        # as it shares the cores), idle and under the warm-up's load.
        cpu, started = front_cpu_s(), time.perf_counter()
        await asyncio.sleep(10)
        idle_rate = (front_cpu_s() - cpu) / (time.perf_counter() - started)
        print("warm-up (the tiers' step-cost models see the batch sizes of the runs)", flush=True)
        cpu, started = front_cpu_s(), time.perf_counter()
        warm = await drive(base, "warm-up", model, max(rates), 30, args.seed + 99, budgets)
        warm_cpu = front_cpu_s() - cpu - idle_rate * (time.perf_counter() - started)
        profiles, warnings = tier_profiles(ingress_tiers(base), f"the embedded default, {machine()}")
        for w in warnings:
            print(f"warning: {w}")
        # The ingress's own time before a request reaches a tier (parsing, guards, routing),
        # from a separate light run on one tier, not from the runs compared below.
        front = await drive(base, "front", "small", 0.5, 20, args.seed + 7, budgets)
        runs, engine_tpot, refits = [], [], []
        for rate in rates:
            runs.append(await drive(base, f"{rate:g} req/s", model, rate, args.duration_s, args.seed, budgets))
            # What each engine itself delivered (its decayed mean), before the front end's relay.
            listed = ingress_tiers(base)
            loads = {t["name"]: (t.get("router") or {}).get("load") or {} for t in listed}
            engine_tpot.append({name: load.get("tpot_ms") for name, load in loads.items()})
            refits.append(tier_profiles(listed, f"refitted during the {rate:g} req/s run")[0])
        return profiles, front, runs, (warm, warm_cpu), engine_tpot, refits

    # refits: each tier's step-cost model as fitted by the end of each run
    profiles, front, runs, (warm, warm_cpu), engine_tpot, refits = asyncio.run(measure())
    scorer = scorer_of(config)  # after the runs: its embedder would take CPU from the service
    profile_file = PROFILES / (f"cpu-measured-{args.tier}.json" if args.tier else "cpu-measured.json")
    save_profiles(profile_file, profiles)
    tiers = simulated_tiers(config, profiles, {})
    light = arrivals(args.seed + 7, 0.5, 20, "small")
    idle = simulate(light, tiers, config.routing).outcomes
    gaps = [o.ttft_ms - s.ttft_s * 1e3 for o, s in zip(front.outcomes, idle) if o.ttft_ms and s.ttft_s]
    front_ms = max(0.0, statistics.median(gaps))
    # Its work per token: the warm-up's front-end CPU less its requests' `front_ms` each, over
    # the tokens it served (max_tokens each: the load asks for ignore_eos).
    warm_served = [w for w, o in zip(workload(args.seed + 99, max(rates), 30), warm.outcomes) if o.status == 200]
    tokens = sum(max_tokens for *_, max_tokens in warm_served)
    token_ms = max(0.0, 1e3 * (warm_cpu - len(warm_served) * front_ms / 1e3) / max(1, tokens))
    front_end = FrontEnd(request_ms=max(0.0, front_ms - token_ms), token_ms=token_ms, cores=args.front_cores)
    print(
        f"front: {front_ms:.0f} ms before the tier (median of {len(gaps)}); in the warm-up "
        f"{1e3 * warm_cpu / max(1, len(warm_served)):.0f} ms CPU a request beyond idle, {token_ms:.2f} ms a token"
    )

    traces = [arrivals(args.seed, rate, args.duration_s, args.tier) for rate in rates]
    rows = []
    for rate, run, trace in zip(rates, runs, traces):
        sim = summarize(simulate(trace, tiers, config.routing, front=front_end).outcomes)
        served = [o for o in run.outcomes if o.status == 200]

        def q(attr: str, p: int, served: list = served) -> float | None:
            values = [getattr(o, attr) for o in served if getattr(o, attr) is not None]
            return float(np.percentile(values, p)) if values else None

        small = sum(o.tier == "small" for o in served) / max(1, len(run.outcomes))
        pairs = [
            (q("ttft_ms", 50), sim.ttft_p50_ms),
            (q("ttft_ms", 95), sim.ttft_p95_ms),
            (q("tpot_ms", 50), sim.tpot_p50_ms),
            (q("tpot_ms", 95), sim.tpot_p95_ms),
        ]
        cells = " | ".join(f"{ms(m)} / {ms(s)} ({error(s, m)})" for m, s in pairs)
        rows.append(
            f"| {rate:g} | {len(run.outcomes)} | {run.met:.1%} / {sim.goodput:.1%} "
            f"({100 * (sim.goodput - run.met):+.1f} pt) | {cells} | "
            f"{small:.0%} / {sim.tier_shares.get('small', 0) * (1 - sim.shed - sim.failed):.0%} |"
        )
    fitted = "; ".join(
        f"`{name}`: {p.step_ms_base:.1f} ms + {p.step_ms_per_seq:.2f} ms a sequence + "
        f"{p.step_ms_per_kprompt:.1f} ms per 1,000 prompt tokens, {p.tokens_per_step:.2f} tokens a step"
        for name, p in profiles.items()
        if args.tier in (None, name)
    )
    command = f".venv/bin/python bench/simulate.py calibrate --rates {args.rates} --duration-s {args.duration_s:g}"
    command += f" --tier {args.tier}" if args.tier else ""
    command += f" --front-cores {args.front_cores:g}" if args.front_cores != 1 else ""
    asked = f"every request for `{args.tier}`" if args.tier else "`auto`"
    text = f"""`{command}` ({machine()}; each rate {args.duration_s:g} s of Poisson arrivals, {asked}, the same
arrivals for real and in simulation; profile `{profile_file.relative_to(REPO)}`: {fitted}; the ingress's own
time before the tier, {front_ms:.0f} ms, from a separate light run; its CPU a token, {token_ms:.2f} ms, from the
warm-up's CPU time; the front end simulated as one first-come first-served server of {args.front_cores:g} core):

{CALIBRATION_HEADER}
""" + "\n".join(rows)
    own = "; ".join(
        f"{rate:g} req/s: " + ", ".join(f"`{name}` {ms(v)} ms" for name, v in tpot.items() if v is not None)
        for rate, tpot in zip(rates, engine_tpot)
    )
    text += f"\n\nThe engines' own time per token at the end of each run (a decayed mean, before the relay): {own}."
    # A diagnostic, not a calibration: the same arrivals on the models the runs themselves fitted.
    insample = []
    for rate, refit, trace in zip(rates, refits, traces):
        refit_tiers = simulated_tiers(config, {**profiles, **refit}, {})
        again = summarize(simulate(trace, refit_tiers, config.routing, front=front_end).outcomes)
        insample.append(f"{rate:g} req/s {again.goodput:.1%}, TPOT p50 {ms(again.tpot_p50_ms)} ms")
    text += (
        " Simulated on the step-cost models fitted by the end of each run instead of the warm-up's "
        f"(in-sample, to tell a drifting fit from a wrong model): {'; '.join(insample)}."
    )
    print(text)
    replace_section(DOC, f"calibration-{args.tier}" if args.tier else "calibration", text)


CALIBRATION_HEADER = (
    "| rate req/s | requests | goodput measured / simulated | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms "
    "| TPOT p95 ms | served by small |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def front_cpu_s() -> float:
    """CPU seconds used so far by every process on the machine but the engines'."""
    from serving import ENGINE_ROLES, cpu_times

    return sum(t for role, t in cpu_times().items() if role not in ENGINE_ROLES)


# ----- at scale: configs/gpu.yaml with published GPU step times --------------------------------


def hard_on_strong(outcomes: Sequence[Outcome], strong: str, threshold: float) -> float:
    hard = [o for o in outcomes if (o.arrival.complexity or 0.0) >= threshold]
    return sum(o.status == 200 and o.tier == strong for o in hard) / len(hard) if hard else float("nan")


class Scale:
    """configs/gpu.yaml's tiers and router on `size` replicas, split between the tiers by
    `shares` (as shipped: three quarters on the fast tier); `three_tiers` puts a Llama 3.2 3B
    tier in front of them (its profile derived from the 8B's, as its `source` says)."""

    def __init__(self, args: argparse.Namespace, shares: dict[str, float] | None = None, three_tiers: bool = False):
        from tierserve.cluster.config import load_config
        from tierserve.router.complexity import load_prompts
        from tierserve.router.config import TierCost, TierRouting
        from tierserve.router.simengine import load_profiles

        self.args = args
        config = load_config(str(REPO / "configs" / "gpu.yaml"), check_engine=False)
        if three_tiers:
            small = config.tiers[0].model_copy(update={"name": "llama-3b"})
            cost = TierCost(input_per_million=0.02, output_per_million=0.04)
            tiers = dict(config.routing.tiers)
            tiers[config.tiers[0].name] = tiers[config.tiers[0].name].model_copy(update={"min_complexity": 0.2})
            routing = config.routing.model_copy(update={"tiers": {"llama-3b": TierRouting(cost=cost), **tiers}})
            config = config.model_copy(update={"tiers": [small, *config.tiers], "routing": routing})
        self.config = config
        self.profiles = load_profiles(Path(args.profile))
        names = [t.name for t in config.tiers]
        self.fast, self.strong = names[0], names[-1]
        self.shares = shares or {self.fast: 0.75, self.strong: 0.25}
        self.threshold = config.routing.tiers[self.strong].min_complexity
        texts = [p.text for p in load_prompts()]
        self.mix = TrafficMix(complexity=tuple(scores_of(scorer_of(config), texts)))

    def tiers(self, size: int):
        from tierserve.cluster.router_commands import simulated_tiers

        names = [t.name for t in self.config.tiers]
        counts = {n: max(1, round(size * self.shares[n])) for n in names[:-1]}
        counts[names[-1]] = size - sum(counts.values())
        return simulated_tiers(self.config, self.profiles, counts)

    def described(self, size: int) -> str:
        return ", ".join(f"{t.replicas} x {t.name}" for t in self.tiers(size))

    def trace(self, rate, duration_s: float, seed: int, mix: TrafficMix | None = None, peak: float | None = None):
        return poisson_arrivals(rate, duration_s, random.Random(seed), (mix or self.mix).arrival, peak)

    def outcomes(self, arrivals: list[Arrival], size: int, policy: str, events=()) -> list[Outcome]:
        if policy == "single":
            arrivals = [
                Arrival(a.at_s, a.prompt_tokens, a.output_tokens, a.sla_class, a.complexity, self.fast)
                for a in arrivals
            ]
            policy = "router"
        return simulate(arrivals, self.tiers(size), self.config.routing, policy, events, seed=self.args.seed).outcomes

    def run(self, arrivals: list[Arrival], size: int, policy: str, events=()) -> tuple[Summary, float]:
        outcomes = self.outcomes(arrivals, size, policy, events)
        return summarize(outcomes), hard_on_strong(outcomes, self.strong, self.threshold)

    def fast_capacity(self, size: int) -> float:
        """The highest rate (to 5%) at which the fast tier alone keeps >= 95% within budget."""
        low, high = 0.0, 4.0 * size
        while self.run(self.trace(high, self.args.duration_s, self.args.seed), size, "single")[0].goodput >= 0.95:
            low, high = high, 2 * high
        while high - low > 0.05 * high:
            mid = (low + high) / 2
            ok = self.run(self.trace(mid, self.args.duration_s, self.args.seed), size, "single")[0].goodput >= 0.95
            low, high = (mid, high) if ok else (low, mid)
        return low


POLICIES = ("router", "single", *BASELINES)
LABELS = {
    "router": "router",
    "single": "fast tier alone",
    "round_robin": "round-robin",
    "random": "random",
    "least_loaded": "least-loaded",
}


def row(label: str, rate: float, s: Summary, hard: float) -> str:
    cost = "-" if s.cost_per_1k_tokens is None else f"{1e3 * s.cost_per_1k_tokens:.3f}"
    return (
        f"| {label} | {rate:.0f} | **{s.goodput:.1%}** | {s.shed:.1%} | {s.failed:.1%} | "
        f"{ms(s.ttft_p50_ms)} / {ms(s.ttft_p95_ms)} | {ms(s.tpot_p50_ms)} / {ms(s.tpot_p95_ms)} | "
        f"{cost} | {hard:.0%} |"
    )


HEADER = (
    "| policy | rate req/s | goodput | shed | failed | TTFT p50 / p95 ms | TPOT p50 / p95 ms "
    "| cost per 1M tokens | hard on strong |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def fluid_rate(profile, tpot_ms: float, mean_prompt: float, mean_output: float) -> float:
    """Requests a second one replica serves with every token within `tpot_ms`, in a fluid
    estimate: a step costs `base + per_seq * n` plus its share of the prompts prefilled beside it
    (`r * mean_prompt` tokens a second), and `n = r * mean_output * tpot` requests run at once."""
    load = profile.step_ms_per_seq * mean_output / 1e3 + profile.step_ms_per_kprompt * mean_prompt / 1e6
    return max(0.0, (tpot_ms - profile.step_ms_base) / (tpot_ms * load))


def fluid_bound(s: Scale, size: int) -> float:
    """What the cluster can serve within budgets, in the fluid estimate: the fast tier at the
    tightest TPOT budget (the interactive requests go there), every other tier at the loosest."""
    trace = s.trace(100.0, 60.0, s.args.seed)
    prompt = statistics.mean(a.prompt_tokens for a in trace)
    output = statistics.mean(a.output_tokens for a in trace)
    budgets = [c.tpot_ms for c in s.config.routing.sla_classes.values() if c.tpot_ms is not None]
    total = 0.0
    for i, tier in enumerate(s.tiers(size)):
        tpot = min(budgets) if i == 0 else max(budgets)
        total += tier.replicas * fluid_rate(tier.profile, tpot, prompt, output)
    return total


def sweep(
    s: Scale, size: int, multiples: list[float], up_to_rate: float | None = None
) -> tuple[str, dict[str, list], float]:
    """Every policy at each multiple of the fast tier's capacity alone (and at `up_to_rate`),
    on the same arrivals: the table's section, the points to plot, and that capacity."""
    capacity = s.fast_capacity(size)
    if up_to_rate is not None and up_to_rate > max(multiples) * capacity:
        multiples = [*multiples, round(up_to_rate / capacity, 2)]
    print(f"{s.described(size)}: the fast tier alone keeps 95% up to {capacity:.1f} req/s", flush=True)
    bound = fluid_bound(s, size)
    lines = [
        f"**{size} replicas** ({s.described(size)}); the fast tier alone keeps >= 95% within budget up to "
        f"**{capacity:.1f} req/s**; the whole cluster, in a fluid estimate, about {bound:.0f} req/s "
        f"(**{bound / capacity:.1f}x** that):",
        "",
        HEADER,
    ]
    points: dict[str, list] = {p: [] for p in POLICIES}
    for m in multiples:
        rate = m * capacity
        trace = s.trace(rate, s.args.duration_s, s.args.seed)
        for policy in POLICIES:
            summary, hard = s.run(trace, size, policy)
            points[policy].append((m, summary, hard))
            lines.append(row(f"{LABELS[policy]} at {m:g}x", rate, summary, hard))
            print(lines[-1], flush=True)
    return "\n".join(lines), points, capacity


def scale(args: argparse.Namespace) -> None:
    shipped = Scale(args)
    multiples = [float(m) for m in args.multiples.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    sweeps: dict[str, dict[str, list]] = {}
    sections = []
    for size in sizes:
        section, sweeps[f"{size} replicas (3:1)"], capacity = sweep(shipped, size, multiples)
        sections.append(section)
    size = sizes[-1]
    even = Scale(args, {shipped.fast: 0.5, shipped.strong: 0.5})
    even_section, sweeps[f"{size} replicas (1:1)"], _ = sweep(even, size, multiples)
    three = Scale(args, {"llama-3b": 0.5, "llama-8b": 0.375, "llama-70b": 0.125}, three_tiers=True)
    three_section, sweeps[f"{size} replicas, three tiers"], _ = sweep(
        three, size, [m for m in multiples if m >= 1], args.max_rate
    )
    plot(sweeps, IMAGES / "routing-simulation-goodput.png", lambda x: x[1].goodput, "goodput (share within SLO)", 0.95)
    plot(
        sweeps,
        IMAGES / "routing-simulation-cost.png",
        lambda x: 1e3 * (x[1].cost_per_1k_tokens or 0),
        "cost per 1M tokens ($)",
    )
    command = (
        f".venv/bin/python bench/simulate.py scale --sizes {args.sizes} --multiples {args.multiples} "
        f"--duration-s {args.duration_s:g} --seed {args.seed} --max-rate {args.max_rate:g}"
    )
    head = f"`{command}` ({machine()}; {args.duration_s:g} simulated seconds of arrivals a point):"
    replace_section(DOC, "scale", head + "\n\n" + "\n\n".join(sections))
    replace_section(DOC, "shapes", even_section + "\n\n" + three_section)
    replace_section(DOC, "patterns", patterns(shipped, size, 2.0 * capacity))
    replace_section(DOC, "failures", failures(shipped, size, 1.5 * capacity))


def predictions(args: argparse.Namespace) -> None:
    """How the router's predicted time per token compares with what each tier then delivered,
    with and without `routing.tpot_counts_prefill`, at `--multiple` times the fast tier's capacity."""
    lines = [
        f"`.venv/bin/python bench/simulate.py predictions --size {args.size} --multiple {args.multiple:g} "
        f"--duration-s {args.duration_s:g} --seed {args.seed}` ({machine()}): the router's predicted time per "
        "output token against the simulated one, configs/gpu.yaml's router with `tpot_counts_prefill` off and on:",
        "",
        "| cluster, rate | tpot_counts_prefill | tier | requests | simulated / predicted p10 | p50 | p90 | goodput |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for shares in ({"llama-8b": 0.75, "llama-70b": 0.25}, {"llama-8b": 0.5, "llama-70b": 0.5}):
        s = Scale(args, shares)
        rate = args.multiple * s.fast_capacity(args.size)
        trace = s.trace(rate, args.duration_s, args.seed)
        for counts in (False, True):
            s.config = s.config.model_copy(
                update={"routing": s.config.routing.model_copy(update={"tpot_counts_prefill": counts})}
            )
            outcomes = s.outcomes(trace, args.size, "router")
            goodput = summarize(outcomes).goodput
            for tier in (t.name for t in s.tiers(args.size)):
                ratios = [
                    1e3 * o.tpot_s / o.predicted_tpot_ms
                    for o in outcomes
                    if o.tier == tier and o.tpot_s is not None and o.predicted_tpot_ms
                ]
                if ratios:
                    q = np.percentile(ratios, [10, 50, 90])
                    lines.append(
                        f"| {s.described(args.size)}, {rate:.0f} req/s | {'on' if counts else 'off'} | {tier} | "
                        f"{len(ratios)} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {goodput:.1%} |"
                    )
                    print(lines[-1], flush=True)
    replace_section(DOC, "predictions", "\n".join(lines))


def patterns(s: Scale, size: int, rate: float) -> str:
    d = s.args.duration_s
    shapes = {
        "steady (Poisson)": (rate, None),
        "bursty (3x for 5 s of every 20 s)": (lambda t: rate * (3.0 if t % 20 < 5 else 1 / 3), 3 * rate),
        "diurnal (0.2x to 1.8x and back)": (lambda t: rate * (1 - 0.8 * math.cos(2 * math.pi * t / d)), 1.8 * rate),
    }
    lines = [
        f"{size} replicas, mean rate {rate:.0f} req/s (2x the fast tier's capacity alone):",
        "",
        HEADER.replace("| policy |", "| arrivals, policy |"),
    ]
    for name, (shape, peak) in shapes.items():
        trace = s.trace(shape, d, s.args.seed, peak=peak)
        for policy in ("router", "single", "least_loaded"):
            summary, hard = s.run(trace, size, policy)
            lines.append(row(f"{name}, {LABELS[policy]}", len(trace) / d, summary, hard))
            print(lines[-1], flush=True)
    return "\n".join(lines)


def failures(s: Scale, size: int, rate: float) -> str:
    d = max(s.args.duration_s, 60.0)
    fast_replicas = s.tiers(size)[0].replicas
    lost = max(1, fast_replicas // 4)
    long_prompts = TrafficMix(prompt_median=6000, prompt_sigma=0.3, prompt_max=12000, complexity=s.mix.complexity)
    normal = s.trace(rate, d, s.args.seed)
    burst = [a for a in s.trace(rate / 2, d, s.args.seed + 1, long_prompts) if d / 3 <= a.at_s < d / 3 + 10]
    scenarios: dict[str, tuple[list[Arrival], list[Event]]] = {
        "no failure": (normal, []),
        f"{lost} of {fast_replicas} {s.fast} replicas lost at {d / 3:.0f} s (back 30 s later)": (
            normal,
            [Event(d / 3, "kill", s.fast, detect_s=2.0, restart_s=30.0) for _ in range(lost)],
        ),
        f"{s.fast}'s steps twice as slow from {d / 3:.0f} s (a noisy neighbour)": (
            normal,
            [Event(d / 3, "slow", s.fast, factor=2.0)],
        ),
        f"{len(burst)} long prompts (about 6,000 tokens) in 10 s from {d / 3:.0f} s": (
            sorted(normal + burst, key=lambda a: a.at_s),
            [],
        ),
    }
    lines = [
        f"{size} replicas, {rate:.0f} req/s (1.5x the fast tier's capacity alone), {d:g} s:",
        "",
        HEADER.replace("| policy |", "| scenario, policy |"),
    ]
    for name, (trace, events) in scenarios.items():
        for policy in ("router", "least_loaded"):
            summary, hard = s.run(trace, size, policy, events)
            lines.append(row(f"{name}, {LABELS[policy]}", len(trace) / d, summary, hard))
            print(lines[-1], flush=True)
    return "\n".join(lines)


def plot(sweeps, path: Path, value: Callable, ylabel: str, goal: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 4), squeeze=False, sharey=True)
    for ax, (title, by_policy) in zip(axes[0], sweeps.items()):
        for policy, points in by_policy.items():
            ax.plot([p[0] for p in points], [value(p) for p in points], marker="o", label=LABELS[policy])
        if goal is not None:  # >= 95% within budget at twice the fast tier's capacity alone
            ax.axhline(goal, color="grey", linestyle="--", linewidth=0.8)
            ax.axvline(2.0, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("offered load / the fast tier's capacity alone")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(REPO)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="the embedded default for real and in simulation")
    c.add_argument("--rates", default="1,3,5")
    c.add_argument("--duration-s", type=float, default=60.0)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--tier", help="send every request to this tier (default: auto, the router decides)")
    c.add_argument("--front-cores", type=float, default=1.0, help="CPU the simulated front end has")
    c.set_defaults(func=calibrate)
    s = sub.add_parser("scale", help="configs/gpu.yaml at scale against baselines")
    s.add_argument("--profile", default=str(PROFILES / "gpu-published.json"))
    s.add_argument("--sizes", default="8,64", help="replicas in all (three quarters on the fast tier)")
    s.add_argument(
        "--multiples", default="0.5,1,1.5,2,3", help="offered loads, as multiples of the fast tier's capacity"
    )
    s.add_argument("--duration-s", type=float, default=30.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-rate", type=float, default=1000.0, help="the three-tier sweep's last rate, req/s")
    s.set_defaults(func=scale)
    q = sub.add_parser("predictions", help="the router's TPOT predictions against the simulated TPOT")
    q.add_argument("--profile", default=str(PROFILES / "gpu-published.json"))
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--multiple", type=float, default=2.0)
    q.add_argument("--duration-s", type=float, default=30.0)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=predictions)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
