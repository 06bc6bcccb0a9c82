"""`tierserve router ...`: calibrate the complexity thresholds, record the tiers' step-cost models,
and run the config's router on simulated replicas (`tierserve.router.sim`)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from tierserve.cluster.config import AppConfig, load_config, model_cache_dir


def _prompt_sample(path: str | None) -> list[tuple[str, int]]:
    """Prompts to calibrate on: a file of JSON lines with `text` (and optionally `turns`), or of
    plain text lines; default the bundled labelled prompts, both splits."""
    import json

    from tierserve.router.complexity import load_prompts

    if path is None:
        return [(p.text, p.turns) for p in load_prompts()]
    sample = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            sample.append((str(row["text"]), int(row.get("turns", 1))))
        else:
            sample.append((line, 1))
    if not sample:
        raise ValueError(f"{path}: no prompts")
    return sample


def cmd_router_calibrate(args: argparse.Namespace) -> int:
    """RouteLLM-style calibration: the `min_complexity` per tier that sends each tier its share
    of a traffic sample, with the config's own scorer."""
    from tierserve.router.calibration import calibrate_thresholds
    from tierserve.router.complexity import scorer_for
    from tierserve.router.config import TierRouting
    from tierserve.router.policy import TierView, ranked_tiers

    config = load_config(args.config, check_engine=False)
    shares: dict[str, float] = {}
    for item in args.share:
        tier, _, value = item.partition("=")
        if tier not in {t.name for t in config.tiers} or not value:
            raise ValueError(f"--share {item!r}: expected TIER=FRACTION with TIER one of the config's tiers")
        shares[tier] = float(value)
    routing = config.routing
    views = [
        TierView(t.name, routing.tiers.get(t.name, TierRouting()).min_complexity)
        for t in config.tiers
        if t.name in shares
    ]
    order = [v.name for v in ranked_tiers(views)]
    complexity = routing.complexity
    scorer = scorer_for(complexity, model_cache_dir(config, args.cache_dir) / "router")
    sample = _prompt_sample(args.prompts)
    scores = [s.value for s in scorer.score_many([t for t, _ in sample], [n for _, n in sample])]
    thresholds = calibrate_thresholds(scores, [shares[t] for t in order])
    print(f"{len(scores)} prompts scored ({complexity.mode}); tiers weakest to strongest: {', '.join(order)}")
    print("routing:\n  tiers:")
    chosen = [max(i for i, t in enumerate(thresholds) if score >= t) for score in scores]
    for i, (tier, threshold) in enumerate(zip(order, thresholds)):
        share = chosen.count(i) / len(scores)
        shown = min(threshold, 1.0)  # a zero share at the top: inf, i.e. only a perfect score
        print(f"    {tier}:\n      min_complexity: {shown:.4f}   # {share:.1%} of the sample")
    return 0


def tier_profiles(tiers: list[dict[str, Any]], source: str) -> tuple[dict[str, Any], list[str]]:
    """The simulator's profile of each tier `GET /v1/tiers` lists (the load the router last
    polled: its fitted step-cost model), and a warning for each tier it cannot profile well."""
    from tierserve.actors.types import TierLoad
    from tierserve.router.simengine import TierProfile

    known = {f.name for f in dataclasses.fields(TierLoad)}
    profiles, warnings = {}, []
    for tier in tiers:
        name, load = tier["name"], (tier.get("router") or {}).get("load")
        if load is None:
            warnings.append(f"tier {name}: no load polled yet ({tier.get('error') or 'no answer'}); not profiled")
            continue
        polled = TierLoad(**{k: v for k, v in load.items() if k in known})
        if polled.step_samples < 200:
            warnings.append(
                f"tier {name}: its step-cost model has seen {polled.step_samples} steps; send it traffic of "
                "the batch sizes and prompt lengths you want to simulate first"
            )
        profiles[name] = TierProfile.from_load(polled, source=source)
    return profiles, warnings


def cmd_router_profile(args: argparse.Namespace) -> int:
    """Record each tier's step-cost model from a running service, for `router simulate`."""
    from tierserve.cluster.ops import ingress_tiers
    from tierserve.router.simengine import save_profiles

    source = f"{args.url}, {platform.machine()} {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}"
    profiles, warnings = tier_profiles(ingress_tiers(args.url), source)
    for warning in warnings:
        print(f"tierserve: {warning}", file=sys.stderr)
    if not profiles:
        raise ValueError("no tier could be profiled")
    save_profiles(Path(args.out), profiles)
    for name, p in profiles.items():
        print(
            f"{name}: step = {p.step_ms_base:.2f} + {p.step_ms_per_seq:.3f}/sequence + "
            f"{p.step_ms_per_kprompt:.2f}/1k prompt tokens ms, {p.max_num_seqs} slots, "
            f"{p.tokens_per_step:.2f} tokens/step"
        )
    print(f"wrote {args.out}")
    return 0


def simulated_tiers(config: AppConfig, profiles: dict[str, Any], replicas: dict[str, int]) -> list[Any]:
    """The config's tiers with their profiled engines, Serve limits and replicas (`--replicas`
    over the config's `num_replicas`; an autoscaling tier at its `max_replicas`)."""
    from tierserve.router.simengine import TierSpec

    specs = []
    for tier in config.tiers:
        if tier.name not in profiles:
            raise ValueError(f"no profile for tier {tier.name!r} (profiled: {', '.join(profiles) or 'none'})")
        profile = profiles[tier.name]
        batched = tier.engine.get("max_num_batched_tokens")
        if batched and profile.max_num_batched_tokens is None:
            profile = dataclasses.replace(profile, max_num_batched_tokens=int(batched))
        d = tier.deployment
        count = replicas.get(tier.name) or d.num_replicas or int((d.autoscaling or {}).get("max_replicas", 1))
        specs.append(TierSpec(tier.name, profile, count, d.max_ongoing_requests, d.max_queued_requests))
    return specs


def cmd_router_simulate(args: argparse.Namespace) -> int:
    """The config's router on simulated replicas of its tiers, against the baselines."""
    from tierserve.router.sim import POLICIES, TrafficMix, poisson_arrivals, simulate, summarize
    from tierserve.router.simengine import load_profiles

    config = load_config(args.config, check_engine=False)
    replicas = {}
    for item in args.replicas or []:
        name, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--replicas {item!r}: expected TIER=N with N >= 1")
        replicas[name] = int(count)
    tiers = simulated_tiers(config, load_profiles(Path(args.profile)), replicas)
    arrivals = poisson_arrivals(args.rate, args.duration_s, random.Random(args.seed), TrafficMix().arrival)
    print(
        f"{len(arrivals)} requests in {args.duration_s:g} s ({args.rate:g}/s); tiers: "
        + ", ".join(f"{t.name} x{t.replicas}" for t in tiers)
    )
    print(
        "| policy | goodput | shed | failed | TTFT p50 / p95 ms | TPOT p50 / p95 ms | cost per 1k tokens | served by |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for policy in args.policy or POLICIES:
        s = summarize(simulate(arrivals, tiers, config.routing, policy, seed=args.seed).outcomes)
        shares = ", ".join(f"{t} {v:.0%}" for t, v in s.tier_shares.items())
        cost = "-" if s.cost_per_1k_tokens is None else f"{s.cost_per_1k_tokens:.6f}"
        print(
            f"| {policy} | {s.goodput:.1%} | {s.shed:.1%} | {s.failed:.1%} | {s.ttft_p50_ms} / {s.ttft_p95_ms} "
            f"| {s.tpot_p50_ms} / {s.tpot_p95_ms} | {cost} | {shares} |"
        )
    return 0


def add_router_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="the router").add_subparsers(dest="router_command", required=True)
    rc = r.add_parser("calibrate", help="complexity thresholds that give each tier a share of traffic")
    rc.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    rc.add_argument(
        "--share", action="append", required=True, metavar="TIER=FRACTION", help="repeat per tier; fractions sum to 1"
    )
    rc.add_argument("--prompts", help="traffic sample: JSON lines with 'text', or text lines (default: bundled set)")
    rc.add_argument("--cache-dir")
    rc.set_defaults(func=cmd_router_calibrate)

    rp = r.add_parser("profile", help="record the tiers' step-cost models from a running service")
    rp.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    rp.add_argument("--out", required=True, help="profile file to write (JSON)")
    rp.set_defaults(func=cmd_router_profile)

    rs = r.add_parser("simulate", help="the config's router on simulated replicas, against baselines")
    rs.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    rs.add_argument("--profile", required=True, help="the tiers' profiles (`tierserve router profile`)")
    rs.add_argument("--replicas", action="append", metavar="TIER=N", help="replicas of a tier (repeat per tier)")
    rs.add_argument("--rate", type=float, default=5.0, help="requests per second, Poisson (default 5)")
    rs.add_argument("--duration-s", type=float, default=120.0, help="simulated seconds of arrivals (default 120)")
    rs.add_argument("--policy", action="append", help="router, round_robin, random, least_loaded (default all)")
    rs.add_argument("--seed", type=int, default=0)
    rs.set_defaults(func=cmd_router_simulate)
