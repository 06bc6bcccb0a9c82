"""How long a tier's engine takes to start, with vLLM's compile cache cold and warm.

A tier that loses its engine is back only once a new engine has started, so this is most of a
tier's recovery time. Starts the embedded model's `VLLMEngine` (bfloat16, one core) in a fresh
process three times: with an empty compile cache (vLLM compiles the model and saves it), then
twice with the saved compilation (loaded, thanks to `actors/vllm_fixes.py`'s
`_aot_compile_cache_load`), and checks that all three give the same greedy tokens.

    .venv/bin/python bench/engine_start.py [--no-write]

Prints a table and writes it to docs/reliability.md (section `engine-start`). Moves the user's
vLLM compile cache (~/.cache/vllm/torch_compile_cache) aside for the cold start and back after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import replace_section  # noqa: E402

CACHE = Path.home() / ".cache" / "vllm" / "torch_compile_cache"
PROMPTS = ["What is the capital of France?", "Write a haiku about rivers.", "2+2="]


async def start_once() -> dict:
    """One engine start and three greedy answers, timed (run in a process of its own)."""
    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.actors.engine import VLLMEngine
    from tierserve.actors.types import GenerateRequest, SamplingOptions
    from tierserve.core.types import ChatMessage

    path = prepare_embedded("smollm2-135m-instruct", progress=False)
    engine = VLLMEngine(str(path), {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 4})
    started = time.perf_counter()
    engine.start()
    seconds = time.perf_counter() - started
    answers = []
    for i, question in enumerate(PROMPTS):
        request = GenerateRequest(
            f"q{i}", SamplingOptions(max_tokens=16, temperature=0), messages=[ChatMessage("user", question)]
        )
        answers.append([t async for chunk in engine.generate(request) for t in chunk.token_ids])
    engine.shutdown()
    return {"start_s": seconds, "answers": answers}


def run_child() -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(start_once())))
        return 0

    aside = CACHE.with_name(CACHE.name + ".bench-aside")
    if CACHE.exists():
        CACHE.rename(aside)
    try:
        runs = [("cold (compiles, saves)", run_child())]
        runs += [(f"warm {i} (loads the saved compilation)", run_child()) for i in (1, 2)]
    finally:
        if aside.exists():
            shutil.rmtree(CACHE, ignore_errors=True)
            aside.rename(CACHE)
    same = all(r["answers"] == runs[0][1]["answers"] for _, r in runs)
    lines = ["| engine start | seconds |", "|---|---|"]
    lines += [f"| {name} | {r['start_s']:.1f} |" for name, r in runs]
    text = "\n".join(lines) + f"\n\nSame greedy tokens on all three starts: {'yes' if same else 'NO'}."
    print(text)
    if not args.no_write:
        head = (
            f"`.venv/bin/python bench/engine_start.py` ({time.strftime('%Y-%m-%d')}, 2 cores; `VLLMEngine.start()` "
            "of the embedded model, bfloat16, in a fresh process each time):\n\n"
        )
        replace_section(REPO / "docs" / "reliability.md", "engine-start", head + text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
