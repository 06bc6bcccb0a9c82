"""What constrained decoding costs per token, against free text on the same tier.

Drives the embedded default's `small` tier engine (`VLLMEngine`, float32, in this process; its
engine-core and worker processes beside it) with the same chat questions as free text and
under each `response_format` kind, one after another in one run:

- free text;
- `json_object` (vLLM's xgrammar backend);
- `json_schema` with an object of strings (xgrammar);
- `json_schema` whose string has a pattern and length bounds, which xgrammar does not take, so
  vLLM decodes it with guidance (llguidance);
- two functions as `tools`: `auto` (free decoding, the hermes parser reading each delta) and
  `required` (decoding follows the calls' schema), rendered with the bundled tool template.

For each, at concurrency 1 and 8: time to first token, time per output token after the first
(the grammar's cost per token: the engine core computes each step's token mask, the worker
applies it), output tokens per second, and the ratios to free text; and, once per kind, the
time to first token of its very first request, which compiles its grammar (the engine caches
compiled grammars, so later requests with the same schema skip it). CPU time is not a column:
the engine's processes busy-wait, so their CPU time tracks wall time. The answers' lengths
differ between kinds (a schema ends an answer when it is complete), which is why the costs are
per token.

    .venv/bin/python bench/structured.py [--requests 16] [--tokens 64] [--no-write]

Prints a table and writes it to docs/structured-outputs.md (section `structured-cost`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "structured-outputs.md"
QUESTIONS = [
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "Describe a cat in one sentence.",
    "What is 12 times 7?",
    "Give me a name for a bakery.",
    "Which planet is the largest?",
    "Suggest a title for a book about the sea.",
    "What colour is the sky at noon?",
]
OBJECT = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 24},
        "reason": {"type": "string", "maxLength": 48},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["answer", "reason", "keywords"],
    "additionalProperties": False,
}
PATTERNED = {
    "type": "object",
    "properties": {"answer": {"type": "string", "pattern": "^[A-Za-z ,.]+$", "minLength": 8, "maxLength": 200}},
    "required": ["answer"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look the answer up in an encyclopedia",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 48},
                    "limit": {"type": "integer", "maximum": 9},
                },
                "required": ["query", "limit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "maxLength": 32}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
]
KINDS = {
    "free text": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema (xgrammar)": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": OBJECT}}
    },
    "json_schema, pattern + length (guidance)": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": PATTERNED}}
    },
    "tools, auto (hermes parser)": {"tools": TOOLS},
    "tools, required (xgrammar)": {"tools": TOOLS, "tool_choice": "required"},
}
"""Each kind's request fields besides the question. The tool kinds' prompts are longer (the
functions are rendered into the system turn), so their time to first token is not free text's."""


async def one(engine, i: int, fields: dict, tokens: int) -> dict:
    from tierserve.router.protocol import ChatCompletionRequest

    json_answer = "response_format" in fields
    body = {
        "model": "small",
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " Answer in JSON." * json_answer}],
        "max_tokens": tokens,
        "temperature": 0,
        **fields,
    }
    request = ChatCompletionRequest.model_validate(body).to_generate(f"r{i}-{time.monotonic_ns()}")
    start = time.perf_counter()
    first = None
    count = 0
    text = []
    calls = []
    async for chunk in engine.generate(request):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        count += len(chunk.token_ids)
        text.append(chunk.text)
        calls += chunk.tool_calls or []
    end = time.perf_counter()
    return {
        "ttft": (first - start) if first else None,
        "tpot": (end - first) / (count - 1) if first and count > 1 else None,
        "tokens": count,
        "text": "".join(text),
        "calls": calls,
    }


def parses(result: dict, fields: dict) -> bool:
    """A JSON answer that parses, or (tools) calls whose arguments do."""
    try:
        if "tools" in fields:
            return bool(result["calls"]) and all(json.loads(c.arguments) is not None for c in result["calls"])
        json.loads(result["text"])
        return True
    except ValueError:
        return False


async def run_kind(engine, fields: dict, requests: int, concurrency: int, tokens: int) -> dict:
    queue = list(range(requests))
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await one(engine, queue.pop(0), fields, tokens))

    wall0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    out_tokens = sum(r["tokens"] for r in results)
    valid = sum(parses(r, fields) for r in results)
    return {
        "ttft_ms": statistics.median(r["ttft"] for r in results if r["ttft"]) * 1000,
        "tpot_ms": statistics.mean(r["tpot"] for r in results if r["tpot"]) * 1000,
        "tok_s": out_tokens / wall,
        "mean_tokens": out_tokens / len(results),
        "parsed": f"{valid}/{len(results)}" if fields else "-",
    }


async def measure(requests: int, tokens: int) -> tuple[dict[str, float], list[tuple[str, int, dict]]]:
    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.actors.config import ToolsConfig
    from tierserve.actors.engine import VLLMEngine

    path = prepare_embedded("smollm2-135m-instruct", progress=False)
    options = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 32}
    engine = VLLMEngine(str(path), options, tools=ToolsConfig(parser="hermes", chat_template="chatml-tools"))
    engine.start()
    try:
        first = {}  # each kind's first request: its grammar compiled (a running tier then has it cached)
        for name, fields in KINDS.items():
            first[name] = (await one(engine, 0, fields, 8))["ttft"] * 1000
        rows = []
        for concurrency in (1, 8):
            for name, fields in KINDS.items():
                rows.append((name, concurrency, await run_kind(engine, fields, requests, concurrency, tokens)))
                print(name, concurrency, rows[-1][2], flush=True)
        return first, rows
    finally:
        engine.shutdown()


def table(first: dict[str, float], rows: list[tuple[str, int, dict]], requests: int, tokens: int) -> str:
    base = {c: r for name, c, r in rows if name == "free text"}
    lines = [
        f"`.venv/bin/python bench/structured.py --requests {requests} --tokens {tokens}` ({date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} cores; the embedded model on one engine, float32, "
        f"`max_num_seqs` 32 as on the `small` tier; {requests} greedy chat requests per row, "
        f"at most {tokens} tokens each):",
        "",
        "| kind | concurrency | answers (calls) that parse | mean tokens | TTFT p50 (ms) | TPOT (ms) "
        "| output tok/s | TTFT / free text | TPOT / free text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c, r in rows:
        b = base[c]
        lines.append(
            f"| {name} | {c} | {r['parsed']} | {r['mean_tokens']:.1f} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.1f} "
            f"| {r['tok_s']:.1f} | {r['ttft_ms'] / b['ttft_ms']:.2f}x | {r['tpot_ms'] / b['tpot_ms']:.2f}x |"
        )
    lines += ["", "First request of each kind (its grammar compiled; TTFT, ms, concurrency 1):", ""]
    lines += ["| kind | first TTFT (ms) |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in first.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    first, rows = asyncio.run(measure(args.requests, args.tokens))
    text = table(first, rows, args.requests, args.tokens)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import replace_section

        replace_section(DOC, "structured-cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
