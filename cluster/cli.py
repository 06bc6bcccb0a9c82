"""The `tierserve` command line.

tierserve serve [--config FILE] [--host H] [--port P] [--address A]   start the app and wait (Ctrl-C stops)
tierserve models prepare [NAME ...] [--verify]          build embedded checkpoints in the cache
tierserve models distill [NAME] [--layers N] [--minutes M] [--prompts N] [--max-new-tokens N] [--force]
                                                        train a speculative-decoding draft for NAME
tierserve models list                                   embedded models and their cache state
tierserve models check [TIER ...] [--config FILE] [--dtype D ...] [--json FILE]
                                                        each tier's engine against its checkpoint in transformers
tierserve config check FILE                             validate a config file
tierserve deploy render [--config FILE] --out DIR       write serve.yaml, cluster.yaml (ray up), rayservice.yaml
tierserve deploy apply [--config FILE] [--address URL]  deploy (or update in place) on a running Ray cluster
tierserve status [--url URL] [--address URL]            each tier's health, replicas, nodes, load and latency
tierserve scale TIER N | TIER --min A --max B [--address URL]   change a tier's replicas in place
tierserve router calibrate [--config FILE] --share TIER=FRACTION ... [--prompts FILE]
                                                        complexity thresholds for a share of traffic per tier
tierserve router profile [--url URL] --out FILE         record the tiers' step-cost models for the simulator
tierserve router simulate --profile FILE [--config FILE] [--replicas TIER=N ...] [--rate R] [--duration-s S]
                                                        the config's router on simulated replicas
tierserve rag ingest PATH ... --index NAME [--prune] [--rebuild] [--type T] [--meta K=V]
                                                        chunk, embed and publish documents into an index
tierserve rag delete DOC_ID ... --index NAME            delete documents from an index
tierserve rag list                                      indexes in the store
tierserve rag query TEXT [--index NAME] [--top-k K] [--filter K=V]   search an index
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from tierserve.cluster.config import AppConfig, ConfigError, load_config, model_cache_dir
from tierserve.cluster.key_commands import add_key_commands
from tierserve.cluster.ops import DEFAULT_DASHBOARD, OpsError, wait_serving
from tierserve.cluster.rag_commands import add_rag_commands
from tierserve.cluster.router_commands import add_router_commands

READY_WAIT_S = 60.0
"""How long `tierserve serve` waits, once Serve runs the application, for `/health` to say
every tier serves before it prints that it is ready (the router sees a tier that has just
started within a poll interval)."""


def prepare_models(config: AppConfig, cache_dir: Path) -> None:
    """Prepare every embedded model the config's tiers use, with a progress bar."""
    from tierserve.actors.checkpoints import prepare_embedded

    for name in sorted({t.embedded_name for t in config.tiers if t.embedded_name}):
        path = prepare_embedded(name, cache_dir, progress=True)
        print(f"model {name}: {path}", flush=True)


def taken_ports(config: AppConfig) -> list[str]:
    """The ports `tierserve serve` must bind that something else holds: the HTTP port, and on a
    private local cluster its metrics port (taken, Ray's node would wait half a minute and fail
    with a message that names neither). Checked by binding each one for a moment."""
    wanted = [(config.server.host, config.server.port, "the HTTP port (server.port, or --port)")]
    if not config.ray.address and config.ray.metrics_export_port:
        wanted.append(("", config.ray.metrics_export_port, "Ray's metrics port (ray.metrics_export_port)"))
    taken = []
    for host, port, what in wanted:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as exc:
                taken.append(f"{what} {host or '*'}:{port} ({exc.strerror})")
    return taken


def start_ray(config: AppConfig, **init_kwargs: object) -> None:
    """Join `config.ray.address`, or start a private local cluster, with `config.ray.env` set
    in every Ray process this job starts (Serve reads its tuning flags at import time)."""
    import ray

    os.environ.update(config.ray.env)
    runtime_env = {"env_vars": dict(config.ray.env)}
    if config.ray.address:
        ray.init(address=config.ray.address, runtime_env=runtime_env, **init_kwargs)
    else:
        local = {
            "num_cpus": config.ray.num_cpus,
            "include_dashboard": False,
            "_metrics_export_port": config.ray.metrics_export_port,
        }
        ray.init(address="local", runtime_env=runtime_env, **local, **init_kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from tierserve.cluster.app import build_application

    config = load_config(args.config)
    if args.address:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": args.address})})
    server = config.server.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    cache = model_cache_dir(config, None)
    config = config.model_copy(update={"server": server, "model_cache": str(cache)})
    taken = taken_ports(config)
    if taken:
        raise OpsError(f"cannot bind {'; '.join(taken)}. Is tierserve already running? (`tierserve status`)")
    if not args.no_prepare:
        prepare_models(config, cache)

    start_ray(config)
    http = {"host": server.host, "port": server.port}
    if server.request_timeout_s:
        http["request_timeout_s"] = server.request_timeout_s
    serve.start(http_options=http)
    print("starting tierserve: each tier's engine loads and warms up (a minute or more)", flush=True)
    serve.run(build_application(config), name=config.name, route_prefix="/")
    local = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    local = f"[{local}]" if ":" in local else local
    health = wait_serving(f"http://{local}:{server.port}", READY_WAIT_S)
    if health != "ok":
        print(f"warning: /health says {health!r} {READY_WAIT_S:g}s after start: see `tierserve status`", flush=True)
    print(f"tierserve is ready: http://{server.host}:{server.port}/v1  (OpenAI base_url; Ctrl-C stops)", flush=True)
    auth = config.ingress.auth
    if not auth.enabled:
        print(
            f"warning: API keys are off (ingress.auth.enabled: false): anyone who reaches {server.host}:{server.port} "
            "may use every tier and index; turn them on before exposing the port (docs/security.md)",
            file=sys.stderr,
            flush=True,
        )
    else:
        named = f" --config {args.config}" if args.config else ""
        print(f"API keys are on: make one with `tierserve keys create{named} --name NAME`", flush=True)

    # Explicit handlers: a process started in the background inherits SIGINT as ignored.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("stopping tierserve", flush=True)
    if config.ray.address:  # a shared cluster: remove only our application
        serve.delete(config.name)
    else:
        serve.shutdown()
    ray.shutdown()
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from tierserve.actors.checkpoints import EMBEDDED_MODELS, prepare_embedded, verify_checkpoint

    cache = model_cache_dir(None, args.cache_dir)
    for name in args.names or sorted(EMBEDDED_MODELS):
        path = prepare_embedded(name, cache, progress=True)
        print(f"model {name}: {path}", flush=True)
        if args.verify:
            bad = verify_checkpoint(path)
            if bad:
                print(f"checksum mismatch in {path}: {', '.join(bad)}", file=sys.stderr)
                return 1
            print(f"model {name}: checksums match the manifest", flush=True)
    return 0


def cmd_models_distill(args: argparse.Namespace) -> int:
    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.actors.distill import distill

    target = prepare_embedded(args.name, model_cache_dir(None, args.cache_dir), progress=True)
    try:
        report = distill(
            target,
            layers=args.layers,
            minutes=args.minutes,
            max_prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            force=args.force,
        )
    except FileExistsError as exc:
        print(f"tierserve: {exc}", file=sys.stderr)
        return 1
    print(f"draft for {args.name}: {report.draft_dir}", flush=True)
    print(
        f"held-out greedy acceptance {report.acceptance_before:.3f} -> {report.acceptance_after:.3f} "
        f"({report.held_out_prompts} prompts, {report.held_out_tokens} tokens)"
    )
    print(
        f"{report.layers} layers from target layers {report.init_layers}, trained on {report.tokens_trained} "
        f"tokens ({report.epochs:.1f} epochs of {report.train_tokens} from {report.train_prompts} prompts)"
    )
    print("seconds: " + ", ".join(f"{phase} {s:.0f}" for phase, s in report.seconds.items()))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from tierserve.actors.checkpoints import EMBEDDED_MODELS, checkpoint_dir, gguf_path, is_prepared, sha256_file

    cache = model_cache_dir(None, args.cache_dir)
    for name, spec in sorted(EMBEDDED_MODELS.items()):
        try:
            path = checkpoint_dir(cache, spec, sha256_file(gguf_path(spec)))
            state = f"prepared at {path}" if is_prepared(path) else "not prepared"
        except FileNotFoundError as exc:
            state = str(exc)
        print(f"embedded:{name}  {state}")
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tierserve.actors.checkpoints import resolve_model
    from tierserve.actors.fidelity import TOP_K, check_tier, reference

    config = load_config(args.config)
    names = [t.name for t in config.tiers]
    unknown = sorted(set(args.tiers) - set(names))
    if unknown:
        print(f"tierserve: no tier {', '.join(unknown)} in the config (tiers: {', '.join(names)})", file=sys.stderr)
        return 2
    cache = model_cache_dir(config, args.cache_dir)
    references = {}
    reports = []
    for tier in config.tiers:
        if args.tiers and tier.name not in args.tiers:
            continue
        path = resolve_model(tier.model, cache)
        if path not in references:
            print(f"reference: {path} in transformers, float32", flush=True)
            references[path] = reference(path)
        for dtype in args.dtype or [None]:
            report = asyncio.run(check_tier(tier, references[path], dtype, cache))
            reports.append(report)
            verdict = "PASS" if report.passed else "FAIL"
            print(
                f"{verdict} {report.label}: greedy agreement {report.agreement:.3f}, "
                f"{report.identical}/{len(report.results)} identical, "
                f"max top-{TOP_K} logprob diff {report.max_logprob_diff:.3f}",
                flush=True,
            )
            for line in report.failures():
                print(f"  {line}")
            for r in report.results:
                if r.reason and r.reference_text != r.candidate_text:
                    print(f"    reference: {r.reference_text!r}\n    served:    {r.candidate_text!r}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
    return 0 if all(r.passed for r in reports) else 1


def cmd_config_check(args: argparse.Namespace) -> int:
    from tierserve.cluster.fit import require_fit
    from tierserve.cluster.plan import pack, plan_nodes, stranded_gpus

    config = load_config(args.file)
    head, groups = plan_nodes(config)  # every replica fits a node type, the fewest fit together
    report = require_fit(config, groups)  # every GPU tier fits its GPUs' memory
    if report.fits or report.unchecked:
        print(report.text())
    for line in pack(config, head, groups, "max"):
        print(f"at most replicas: {line} (raise the groups' max_workers to let autoscaling reach them)")
    for line in stranded_gpus(config, groups):
        print(f"warning: {line}")
    print(f"{args.file}: ok ({len(config.tiers)} tier(s): {', '.join(t.name for t in config.tiers)})")
    return 0


def cmd_deploy_render(args: argparse.Namespace) -> int:
    """The three deploy files of one config (docs/deployment.md)."""
    from tierserve.cluster.manifests import render

    source = args.config or "the embedded config"
    config = load_config(args.config)
    for path in render(config, args.out, source):
        print(f"wrote {path}")
    if not config.ingress.auth.enabled:
        print("note: ingress.auth is on in these files (a cluster serves beyond this machine): docs/security.md")
    return 0


def cmd_deploy_apply(args: argparse.Namespace) -> int:
    """Send the config's Serve config to a cluster's dashboard, as `serve deploy` does, and wait
    until Serve runs it: a first deploy, or a rolling update of a running one."""
    import time

    from tierserve.cluster.manifests import serve_config
    from tierserve.cluster.ops import ServeAdmin, format_status, status_rows

    config = load_config(args.config)
    if not config.ingress.auth.enabled:
        print(
            "tierserve: warning: ingress.auth.enabled is false: anyone who reaches the cluster's HTTP port "
            "may use every tier (docs/security.md)",
            file=sys.stderr,
        )
    admin = ServeAdmin(args.address)
    sent = time.time()
    admin.deploy(serve_config(config))
    print(f"sent {config.name!r} to {args.address}", flush=True)
    if args.wait_s <= 0:
        return 0
    print(f"waiting for Serve to run it (at most {args.wait_s:g}s) ...", flush=True)
    admin.wait_running(config.name, args.wait_s, since=sent)
    rows = status_rows(_tiers_or_none(config, args.address), admin.details(), config.name)
    print(format_status(rows) if rows else f"{config.name!r} is running")
    return 0


def _tiers_or_none(config: AppConfig, address: str) -> list[dict]:
    """The ingress's /v1/tiers through the proxy on the dashboard's host, or [] if unreachable."""
    from urllib.parse import urlsplit

    from tierserve.cluster.ops import OpsError, ingress_tiers

    host = urlsplit(address).hostname or "127.0.0.1"
    try:
        return ingress_tiers(f"http://{host}:{config.server.port}")
    except OpsError:
        return []


def cmd_status(args: argparse.Namespace) -> int:
    """The ingress's view of each tier (health, replicas, load, recent latency), with the nodes
    its replicas run on when a dashboard is given."""
    from tierserve.cluster.ops import OpsError, ServeAdmin, format_status, ingress_tiers, status_rows

    tiers = ingress_tiers(args.url)
    details = None
    if args.address:
        try:
            details = ServeAdmin(args.address).details()
        except OpsError as exc:
            print(f"tierserve: no replica placement: {exc}", file=sys.stderr)
    print(format_status(status_rows(tiers, details, args.app)))
    return 0 if all((t.get("router") or {}).get("healthy") for t in tiers) else 1


def cmd_scale(args: argparse.Namespace) -> int:
    """A lightweight Serve update of one tier's replica count (or autoscaling bounds)."""
    from tierserve.cluster.ops import ServeAdmin, scaled_config

    admin = ServeAdmin(args.address)
    admin.deploy(scaled_config(admin.details(), args.app, args.tier, args.replicas, args.min, args.max))
    what = f"{args.replicas} replica(s)" if args.replicas is not None else f"min {args.min}, max {args.max}"
    print(f"tier {args.tier!r}: {what} requested; `tierserve status` shows the replicas as they start or stop")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierserve", description="Tiered LLM serving on Ray Serve and vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start tierserve and wait")
    s.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--address", help="join this Ray cluster (e.g. 'auto') instead of starting a private one")
    s.add_argument("--no-prepare", action="store_true", help="skip preparing embedded models first")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="embedded model checkpoints").add_subparsers(dest="models_command", required=True)
    mp = m.add_parser("prepare", help="convert embedded models into the cache (idempotent)")
    mp.add_argument("names", nargs="*", help="embedded model names (default: all)")
    mp.add_argument("--cache-dir")
    mp.add_argument("--verify", action="store_true", help="recompute checksums against the manifest")
    mp.set_defaults(func=cmd_models_prepare)
    md = m.add_parser("distill", help="train a speculative-decoding draft from an embedded model (CPU, ~20 min)")
    md.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="embedded target model")
    md.add_argument("--layers", type=int, default=4, help="decoder layers of the draft")
    md.add_argument("--minutes", type=float, default=10.0, help="training time; generating data adds ~6 min")
    md.add_argument("--prompts", type=int, help="use only this many training prompts (default: all)")
    md.add_argument("--max-new-tokens", type=int, default=128, help="length of the target's completions")
    md.add_argument("--cache-dir")
    md.add_argument("--force", action="store_true", help="replace an existing draft")
    md.set_defaults(func=cmd_models_distill)
    ml = m.add_parser("list", help="embedded models and whether they are prepared")
    ml.add_argument("--cache-dir")
    ml.set_defaults(func=cmd_models_list)
    mc = m.add_parser("check", help="check each tier's engine against its checkpoint in transformers (float32)")
    mc.add_argument("tiers", nargs="*", help="tier names (default: all)")
    mc.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    mc.add_argument("--dtype", action="append", help="check with this dtype instead of the tier's (repeatable)")
    mc.add_argument("--cache-dir")
    mc.add_argument("--json", help="also write the full reports to this file")
    mc.set_defaults(func=cmd_models_check)

    c = sub.add_parser("config", help="config files").add_subparsers(dest="config_command", required=True)
    cc = c.add_parser("check", help="validate a config file")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config_check)

    d = sub.add_parser("deploy", help="cluster deploy files").add_subparsers(dest="deploy_command", required=True)
    dr = d.add_parser("render", help="write serve.yaml, cluster.yaml (ray up) and rayservice.yaml (KubeRay)")
    dr.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    dr.add_argument("--out", required=True, help="directory to write the three files into")
    dr.set_defaults(func=cmd_deploy_render)
    da = d.add_parser("apply", help="deploy the config to a running Ray cluster, or update it in place")
    da.add_argument("--config", help="tierserve YAML (default: the embedded CPU config)")
    da.add_argument("--address", default=DEFAULT_DASHBOARD, help=f"Ray dashboard (default {DEFAULT_DASHBOARD})")
    da.add_argument("--wait-s", type=float, default=900, help="wait this long for Serve to run it (0: do not wait)")
    da.set_defaults(func=cmd_deploy_apply)

    st = sub.add_parser("status", help="each tier's health, replicas, nodes, load and recent latency")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    st.add_argument("--address", help="Ray dashboard, to show the nodes each tier's replicas run on")
    st.add_argument("--app", default="tierserve", help="Serve application name (the config's `name`)")
    st.set_defaults(func=cmd_status)

    sc = sub.add_parser("scale", help="change a tier's replicas in place (a lightweight Serve update)")
    sc.add_argument("tier")
    sc.add_argument("replicas", type=int, nargs="?", help="replicas of a tier with a fixed count")
    sc.add_argument("--min", type=int, help="autoscaling tiers: fewest replicas")
    sc.add_argument("--max", type=int, help="autoscaling tiers: most replicas")
    sc.add_argument("--address", default=DEFAULT_DASHBOARD, help=f"Ray dashboard (default {DEFAULT_DASHBOARD})")
    sc.add_argument("--app", default="tierserve", help="Serve application name (the config's `name`)")
    sc.set_defaults(func=cmd_scale)

    add_router_commands(sub)
    add_rag_commands(sub)
    add_key_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("TIERSERVE_LOG_LEVEL", "INFO"))
    # Not a line per HTTP request the commands make, nor faiss's report of each CPU build it
    # tries, nor vLLM's of a Triton without a CPU backend (it runs without one here).
    quiet = {"httpx": logging.WARNING, "faiss.loader": logging.WARNING, "vllm.triton_utils.importing": logging.ERROR}
    for chatty, level in quiet.items():
        logging.getLogger(chatty).setLevel(level)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OpsError, FileNotFoundError, ValueError, TimeoutError) as exc:
        print(f"tierserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
