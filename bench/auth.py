"""What API keys add to each request at the ingress: CPU per request of each step the `Gate`,
`Access` and the audit line run, with auth on, against the same steps with auth off.

Plain code on this machine (no Ray, no engine): the key store is a real SQLite file with
`--keys` keys, the prompt a real chat request of `--prompt-chars` characters, the audit line
written to a real file. Each step is timed over `--requests` calls, best of `--rounds`, and
reported in microseconds per request. The serving benchmark (docs/benchmarks/serving.md) puts
these next to the gateway's whole cost per request and per token.

    .venv/bin/python bench/auth.py

Prints a table and writes docs/benchmarks/auth.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from report import replace_section  # noqa: E402

from tierserve.router.access import Access  # noqa: E402
from tierserve.router.audit import Auditor, AuditRecord  # noqa: E402
from tierserve.router.config import AuthConfig  # noqa: E402
from tierserve.router.keys import Budget, KeyPolicy, KeyStore, load_server_secret  # noqa: E402
from tierserve.router.protocol import ChatCompletionRequest  # noqa: E402


def per_call_us(fn, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = KeyStore(root / "keys.db", load_server_secret("TIERSERVE_BENCH_NO_ENV", root / "keys.secret"))
        policy = KeyPolicy(
            tiers=["auto", "small"],
            requests_per_minute=10**9,
            tokens_per_minute=10**12,
            max_concurrent=10**6,
            budget=Budget(tokens=10**15),
        )
        tokens = [store.create(f"key-{i}", policy)[1] for i in range(args.keys)]
        token = tokens[len(tokens) // 2]
        on = Access(AuthConfig(enabled=True, store=str(root / "keys.db")), store)
        off = Access(AuthConfig(enabled=False), None)
        principal = on.authenticate(token, "10.0.0.1")
        body = ChatCompletionRequest.model_validate(
            {"model": "auto", "messages": [{"role": "user", "content": "x" * args.prompt_chars}]}
        )
        auditor = Auditor(str(root / "audit.jsonl"), store.server_secret)
        quiet = Auditor(None, store.server_secret)

        def admitted(access: Access, who) -> None:
            access.admit(who, "auto").end(120, 1e-5)

        def audited(a: Auditor) -> None:
            record = AuditRecord("POST /v1/chat/completions", "10.0.0.1", key_id=principal.key_id, model="auto")
            record.prompt_sha256 = a.fingerprint(body)
            record.status = 200
            a.close(record)

        n, r = args.requests, args.rounds
        rows = [
            (
                "authenticate: parse, look up, HMAC, compare",
                per_call_us(lambda: on.authenticate(token, "x"), n, r),
                per_call_us(lambda: off.authenticate(None, "x"), n, r),
            ),
            (
                "admit and end: tiers, rpm, tpm, concurrency, budget",
                per_call_us(lambda: admitted(on, principal), n, r),
                per_call_us(lambda: admitted(off, off.authenticate(None)), n, r),
            ),
            (
                f"audit line: prompt HMAC ({args.prompt_chars} chars), fields, JSON, file write",
                per_call_us(lambda: audited(auditor), n, r),
                per_call_us(lambda: audited(quiet), n, r),
            ),
        ]
        reload_ms = per_call_us(on.reload, 20, r) / 1e3

    total_on = sum(row[1] for row in rows)
    total_off = sum(row[2] for row in rows)
    lines = ["| step, per request | auth and audit on, µs | both off, µs |", "|---|---|---|"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} |" for name, a, b in rows]
    lines.append(f"| **all** | **{total_on:.1f}** | **{total_off:.1f}** |")
    text = "\n".join(lines) + (
        "\n\nWith both off the ingress still counts the request by key (the metrics), and neither "
        "fingerprints the prompt nor writes a line. Rereading the store "
        f"({args.keys} keys, every `refresh_s`, in a thread off the event loop): {reload_ms:.1f} ms."
    )
    print(text)
    if not args.no_write:
        head = (
            f"`.venv/bin/python bench/auth.py` ({time.strftime('%Y-%m-%d')}, x86_64, 2 cores; {args.keys} keys, "
            f"best of {args.rounds} rounds of {args.requests} requests):\n\n"
        )
        path = REPO / "docs" / "benchmarks" / "auth.md"
        if not path.exists():
            path.write_text(
                "# What API keys cost per request\n\n"
                "The steps the ingress adds per request with `ingress.auth.enabled` (docs/security.md), "
                "timed alone on plain code.\n\n<!-- begin: auth -->\n<!-- end: auth -->\n"
            )
        replace_section(path, "auth", head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
