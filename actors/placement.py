"""Where a tier's tensor-parallel ranks run.

GPU: like Ray Serve LLM, a replica reserves a placement group with one bundle per rank, each
holding one GPU; the replica actor itself sits in the first bundle (its CPUs and custom resources
are added to that bundle), and vLLM's Ray executor starts one worker per rank inside the
reservation. STRICT_PACK keeps all ranks of a replica on one node, where they share NVLink. The
tier's accelerator type and node labels are asked of every bundle, since each rank's GPU is
reserved by its own bundle.

CPU: vLLM starts one worker process per rank and binds each rank's OpenMP threads to its own
cores (`VLLM_CPU_OMP_THREADS_BIND`, e.g. "0|1"). vLLM's automatic binding wants one NUMA node per
rank and always starts from the first core, so two tiers on one node would share a core. Here the
replica's CPU reservation decides how many cores each rank gets, and a small node-local claims
file hands out the least-used cores, so tiers on one node spread over its cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tierserve.actors.config import TierConfig

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
CLAIMS_FILE = Path(tempfile.gettempdir()) / "tierserve-cpu-claims.json"


ACCELERATOR_DEMAND = 0.001
"""How much of `accelerator_type:<type>` Ray asks for `accelerator_type=<type>` (a node with that
accelerator has 1 of it), so any number of ranks fit on the node."""


def accelerator_resource(accelerator_type: str) -> str:
    """The Ray resource of nodes with that accelerator: 'A100' -> 'accelerator_type:A100'."""
    return f"accelerator_type:{accelerator_type}"


def rank_bundles(tier: TierConfig) -> list[dict[str, float]]:
    """GPU tiers: the placement-group bundles of one replica, the replica's own resources
    merged into the first (rank 0) bundle."""
    rank: dict[str, float] = {"GPU": 1.0}
    if tier.deployment.accelerator_type:
        rank[accelerator_resource(tier.deployment.accelerator_type)] = ACCELERATOR_DEMAND
    bundles = [dict(rank) for _ in range(tier.tensor_parallel_size)]
    first = bundles[0]
    first["CPU"] = tier.deployment.num_cpus
    for name, amount in tier.deployment.resources.items():
        first[name] = first.get(name, 0.0) + amount
    return bundles


def placement_options(tier: TierConfig) -> dict[str, Any]:
    """Serve deployment options for the tier's placement (merged over the deployment's own)."""
    options = tier.deployment.serve_options()
    if tier.accelerator == "gpu":
        actor = options["ray_actor_options"]
        for moved in ("num_gpus", "resources", "accelerator_type", "label_selector"):
            actor.pop(moved, None)  # the bundles carry them now
        bundles = rank_bundles(tier)
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = tier.placement_strategy
        if tier.deployment.label_selector:
            options["placement_group_bundle_label_selector"] = [dict(tier.deployment.label_selector) for _ in bundles]
    return options


def engine_placement_options(tier: TierConfig) -> dict[str, Any]:
    """vLLM engine options that follow from the placement."""
    options: dict[str, Any] = {"tensor_parallel_size": tier.tensor_parallel_size}
    if tier.accelerator == "gpu":
        # The replica holds no GPU itself; Ray workers in the placement group's bundles do.
        options["distributed_executor_backend"] = "ray"
    return options


def plan_cpu_binding(ranks: int, cores_per_rank: int, allowed: list[int], claims: Counter[int]) -> list[list[int]]:
    """Cores for each rank: the `ranks * cores_per_rank` least-claimed allowed cores (ties go to
    the lower id), in id order so neighbouring cores serve one rank. When the node has fewer
    cores than asked for, ranks share cores rather than fail."""
    want = ranks * cores_per_rank
    ordered = sorted(allowed, key=lambda core: (claims[core], core))
    chosen = sorted(ordered[:want]) if want <= len(ordered) else [ordered[i % len(ordered)] for i in range(want)]
    return [chosen[r * cores_per_rank : (r + 1) * cores_per_rank] for r in range(ranks)]


def binding_spec(cores: list[list[int]]) -> str:
    """vLLM's syntax: ranks separated by '|', cores of a rank by ','."""
    return "|".join(",".join(str(c) for c in rank) for rank in cores)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _claims(path: Path) -> Iterator[dict[str, list[int]]]:
    """The node's core claims ({pid: cores}) under an exclusive lock; dead pids are dropped and
    what the caller changes is written back."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            claims = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            claims = {}
        claims = {pid: cores for pid, cores in claims.items() if _alive(int(pid))}
        yield claims
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(claims))
        tmp.replace(path)


def claim_cpu_binding(ranks: int, reserved_cpus: float, path: Path = CLAIMS_FILE) -> list[list[int]]:
    """Pick and claim cores for this process's ranks: `reserved_cpus // ranks` cores each (at
    least one) from the cores this process may run on. The claim lasts while the process lives."""
    allowed = sorted(os.sched_getaffinity(0))
    cores_per_rank = max(1, int(reserved_cpus // ranks))
    with _claims(path) as claims:
        counts = Counter(core for cores in claims.values() for core in cores)
        plan = plan_cpu_binding(ranks, cores_per_rank, allowed, counts)
        claims[str(os.getpid())] = [core for rank in plan for core in rank]
    return plan


def release_cpu_binding(path: Path = CLAIMS_FILE) -> None:
    with _claims(path) as claims:
        claims.pop(str(os.getpid()), None)
