"""`tierserve keys ...`: create, list, revoke and rotate the API keys the ingress accepts.

The store is the config's `ingress.auth.store` (default `<model cache>/auth/keys.db`), hashed
with the server secret of `ingress.auth` (its environment variable, else its file, made if
missing); a running ingress sees a change within `ingress.auth.refresh_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tierserve.cluster.config import load_config, model_cache_dir


def _store(args: argparse.Namespace) -> Any:
    """The key store, saying on stderr where its server secret comes from: keys made with
    another secret than the ingress's never work there."""
    from tierserve.router.keys import open_store, secret_file

    config = load_config(args.config, check_engine=False)
    auth = config.ingress.auth
    if args.store:
        auth = auth.model_copy(update={"store": args.store})
    cache = model_cache_dir(config, args.cache_dir)
    if os.environ.get(auth.secret_env):
        print(f"server secret: ${auth.secret_env}", file=sys.stderr)
    else:
        path = secret_file(auth, cache)
        made = "" if path.exists() else " (made now: the ingress must read this file, or the same secret)"
        print(f"server secret: {path}{made}", file=sys.stderr)
    return open_store(auth, cache)


def _policy(args: argparse.Namespace) -> Any:
    from tierserve.router.keys import Budget, KeyPolicy

    budget = None
    if args.budget_tokens is not None or args.budget_cost is not None:
        budget = Budget(period=args.budget_period, tokens=args.budget_tokens, cost=args.budget_cost)
    return KeyPolicy(
        tiers=args.model or None,
        indexes=args.index or [],
        admin=args.admin,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrent=args.max_concurrent,
        budget=budget,
    )


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Make a key and print it once: it is stored only as a salted hash."""
    store = _store(args)
    key, token = store.create(args.name, _policy(args))
    print(json.dumps({**key.summary(), "key": token}, indent=2))
    print("# The key is shown only now: store it in a secret manager. tierserve keeps only its hash.")
    return 0


def cmd_keys_update(args: argparse.Namespace) -> int:
    """Replace a key's policy (its secret stays): the flags give the whole new policy."""
    store = _store(args)
    try:
        store.update(args.key_id, _policy(args))
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    print(json.dumps(store.keys()[args.key_id].summary(), indent=2))
    print("# Running ingresses apply it within ingress.auth.refresh_s.")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = sorted(_store(args).keys().values(), key=lambda k: k.created)
    shown = [k.summary() for k in keys if args.all or k.revoked is None]
    print(json.dumps(shown, indent=2))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        _store(args).revoke(args.key_id)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    print(f"revoked {args.key_id}; running ingresses refuse it within ingress.auth.refresh_s")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """A new secret for the key (same id and policy); the old secret stops working."""
    try:
        token = _store(args).rotate(args.key_id)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    print(json.dumps({"id": args.key_id, "key": token}, indent=2))
    print("# The new key is shown only now; the old one stops working within ingress.auth.refresh_s.")
    return 0


def add_key_commands(sub: Any) -> None:
    """The `keys` command group, on the top-level parser's subparsers `sub`."""
    g = sub.add_parser("keys", help="API keys (ingress.auth)").add_subparsers(dest="keys_command", required=True)

    def store_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="tierserve YAML whose `ingress.auth` applies (default: the embedded one)")
        q.add_argument("--store", help="key store file (default: ingress.auth.store, else <model cache>/auth/keys.db)")
        q.add_argument("--cache-dir")

    def policy_options(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--model",
            action="append",
            help="a model it may use (auto, a tier, or the embedding model); repeat; default: all",
        )
        q.add_argument(
            "--index", action="append", help="a retrieval index it may query ('*': all); repeat; default: none"
        )
        q.add_argument("--admin", action="store_true", help="the admin scope (/v1/tiers, /v1/indexes, /docs, /health)")
        q.add_argument("--rpm", type=int, help="requests per minute")
        q.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute")
        q.add_argument("--max-concurrent", type=int, help="requests in progress at once")
        q.add_argument("--budget-tokens", type=int, help="tokens per budget period")
        q.add_argument("--budget-cost", type=float, help="cost per budget period (the tiers' price unit)")
        q.add_argument("--budget-period", choices=["day", "month"], default="month")

    c = g.add_parser("create", help="make a key and print it once")
    c.add_argument("--name", required=True, help="who or what the key is for (shown in `keys list`)")
    policy_options(c)
    store_options(c)
    c.set_defaults(func=cmd_keys_create)
    u = g.add_parser("update", help="replace a key's policy (the flags give all of it); its secret stays")
    u.add_argument("key_id")
    policy_options(u)
    store_options(u)
    u.set_defaults(func=cmd_keys_update)
    ls = g.add_parser("list", help="keys and their policies (never their secrets)")
    ls.add_argument("--all", action="store_true", help="revoked keys too")
    store_options(ls)
    ls.set_defaults(func=cmd_keys_list)
    r = g.add_parser("revoke", help="stop a key from working")
    r.add_argument("key_id")
    store_options(r)
    r.set_defaults(func=cmd_keys_revoke)
    ro = g.add_parser("rotate", help="a new secret for a key; the old one stops working")
    ro.add_argument("key_id")
    store_options(ro)
    ro.set_defaults(func=cmd_keys_rotate)
