"""Which node types a cluster deploy has, and whether every deployment's replica fits one of them.

A replica demands resources of the node it lands on: its CPUs and GPUs, custom resources, the
`accelerator_type:<type>` resource of its accelerator type, and node labels. A GPU tier's replica
is a placement group of one bundle per rank; under STRICT_PACK the bundles share one node, so
that node needs all of the replica's GPUs. Two checks: can one replica start on an empty node
of some type, and do all deployments' replicas fit the whole cluster together (`pack`: their
fewest replicas must, or the config is refused; their most are reported by `tierserve config
check` when the groups' `max_workers` cannot hold them).

When the `cluster:` section names no worker groups they are derived: every deployment stays on
the head while the head has room for all of its replicas, and gets a worker group of its own
otherwise (always for GPU tiers, since the head has no GPUs), sized for one replica per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierserve.actors.config import TierConfig
from tierserve.actors.placement import ACCELERATOR_DEMAND, accelerator_resource, rank_bundles
from tierserve.cluster.config import AppConfig, ConfigError
from tierserve.cluster.nodes import HeadNode, NodeType, WorkerGroup
from tierserve.core.config import DeploymentOptions


@dataclass(frozen=True)
class Demand:
    """What one replica of a deployment asks of one node."""

    name: str
    """How errors name the deployment: "tier 'large'", "the ingress"."""
    group: str
    """The worker group derived for it when it needs one."""
    need: dict[str, float]
    """Ray resources one node must offer (STRICT_PACK: the whole replica; else its largest bundle)."""
    replicas: tuple[int, int]
    label_selector: dict[str, str] = field(default_factory=dict)
    accelerator_type: str | None = None
    packed_ranks: int = 1
    """GPU bundles that must share the node (STRICT_PACK tensor parallelism), for the error message."""


def _options_demand(name: str, group: str, options: DeploymentOptions) -> Demand:
    need = {"CPU": options.num_cpus, **options.resources}
    if options.num_gpus:
        need["GPU"] = options.num_gpus
    if options.accelerator_type:
        need[accelerator_resource(options.accelerator_type)] = ACCELERATOR_DEMAND
    return Demand(name, group, need, options.replica_bounds(), dict(options.label_selector), options.accelerator_type)


def tier_demand(tier: TierConfig) -> Demand:
    name, group = f"tier {tier.name!r}", f"tier-{tier.name.replace('_', '-')}"
    if tier.accelerator == "cpu":
        return _options_demand(name, group, tier.deployment)
    bundles = rank_bundles(tier)
    packed = tier.placement_strategy == "STRICT_PACK"
    need: dict[str, float] = {}
    for bundle in bundles if packed else bundles[:1]:  # the first bundle holds the most
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    options = tier.deployment
    return Demand(
        name,
        group,
        need,
        options.replica_bounds(),
        dict(options.label_selector),
        options.accelerator_type,
        packed_ranks=len(bundles) if packed else 1,
    )


def demands(config: AppConfig) -> list[Demand]:
    """One demand per deployment of the application: the ingress, the retriever, each tier."""
    out = [_options_demand("the ingress", "ingress", config.ingress.deployment)]
    if config.rag.enabled:
        out.append(_options_demand("the retriever", "retriever", config.rag.deployment))
    return out + [tier_demand(tier) for tier in config.tiers]


def label_matches(selector: str, value: str | None) -> bool:
    """Ray's label selector on one label: 'a' (equal), '!a' (not equal, or absent), 'in(a,b)', '!in(a,b)'."""
    negate = selector.startswith("!")
    body = selector[1:] if negate else selector
    values = {v.strip() for v in body[3:-1].split(",")} if body.startswith("in(") else {body}
    return (value not in values) if negate else (value in values)


def shortfall(demand: Demand, node: NodeType) -> list[str]:
    """What a node of this type lacks for one replica of the demand; empty when the replica fits."""
    have, labels = node.ray_resources(), node.ray_labels()
    missing = []
    for key, amount in demand.need.items():
        got = have.get(key, 0)
        if amount <= got + 1e-9:
            continue
        if key == "CPU":
            missing.append(f"has {got:g} CPUs, needs {amount:g}")
        elif key == "GPU":
            packed = f" on one node (STRICT_PACK, tensor_parallel_size {demand.packed_ranks})"
            missing.append(f"has {got:g} GPUs, needs {amount:g}" + (packed if demand.packed_ranks > 1 else ""))
        elif key == accelerator_resource(demand.accelerator_type or ""):
            missing.append(f"has no {demand.accelerator_type} accelerator")
        else:
            missing.append(f"has {got:g} of resource {key!r}, needs {amount:g}")
    for key, selector in demand.label_selector.items():
        if not label_matches(selector, labels.get(key)):
            now = f"has label {key}={labels[key]}" if key in labels else f"has no label {key}"
            missing.append(f"{now}, needs {key}: {selector}")
    return missing


def _labels_for(selector: dict[str, str]) -> dict[str, str]:
    """Node labels that satisfy a selector: the value, or the first of in(...); negations need none."""
    labels = {}
    for key, value in selector.items():
        if not value.startswith("!"):
            labels[key] = value[3:-1].split(",")[0].strip() if value.startswith("in(") else value
    return labels


def _group_for(demand: Demand) -> WorkerGroup:
    """A worker group sized for one replica of the demand per node."""
    accelerator = accelerator_resource(demand.accelerator_type) if demand.accelerator_type else None
    custom = {k: math.ceil(v) for k, v in demand.need.items() if k not in ("CPU", "GPU", accelerator)}
    gpus = math.ceil(demand.need.get("GPU", 0))
    cpus = max(1, math.ceil(demand.need.get("CPU", 0)))
    while NodeType(cpus=cpus).ray_cpus() < demand.need.get("CPU", 0):  # the machine also keeps some
        cpus += 1
    return WorkerGroup(
        name=demand.group,
        cpus=cpus,
        gpus=max(gpus, 1) if demand.accelerator_type else gpus,
        accelerator_type=demand.accelerator_type,
        resources=custom,
        labels=_labels_for(demand.label_selector),
        min_workers=demand.replicas[0],
        max_workers=demand.replicas[1],
    )


def derive_worker_groups(head: HeadNode, wanted: list[Demand]) -> list[WorkerGroup]:
    """Keep each deployment on the head while the head fits all its replicas; give the others a group."""
    free: dict[str, float] = dict(head.ray_resources())
    groups = []
    for demand in wanted:
        total = {key: amount * demand.replicas[1] for key, amount in demand.need.items()}
        if not shortfall(demand, head) and all(amount <= free.get(key, 0) + 1e-9 for key, amount in total.items()):
            for key, amount in total.items():
                free[key] -= amount
        else:
            groups.append(_group_for(demand))
    return groups


def _pieces(config: AppConfig) -> list[tuple[Demand, list[dict[str, float]]]]:
    """Each deployment's demand with what one replica places on nodes: one piece, or one per
    rank bundle for a GPU tier whose bundles may go to different nodes (not STRICT_PACK)."""
    out = []
    tiers = {f"tier {t.name!r}": t for t in config.tiers}
    for demand in demands(config):
        tier = tiers.get(demand.name)
        spread = tier is not None and tier.accelerator == "gpu" and tier.placement_strategy != "STRICT_PACK"
        out.append((demand, rank_bundles(tier) if spread else [demand.need]))
    return out


def pack(config: AppConfig, head: HeadNode, groups: list[WorkerGroup], at: str) -> list[str]:
    """Place every replica of every deployment (its fewest replicas, `at="min"`, or its most,
    `at="max"`) on the cluster at its largest (the head and `max_workers` nodes of each group),
    the largest replicas first, each piece on the first node with the labels and the room it
    asks for. Returns a line per deployment whose replicas did not all fit; empty when all did."""
    nodes: list[tuple[NodeType, dict[str, float]]] = [(head, dict(head.ray_resources()))]
    for group in groups:
        nodes += [(group, dict(group.ray_resources())) for _ in range(group.max_workers)]
    replicas = []
    for demand, pieces in _pieces(config):
        count = demand.replicas[0] if at == "min" else demand.replicas[1]
        replicas += [(demand, pieces)] * count
    replicas.sort(key=lambda r: (-sum(p.get("GPU", 0) for p in r[1]), -sum(p.get("CPU", 0) for p in r[1])))
    missing: dict[str, list[int]] = {}
    for demand, pieces in replicas:
        taken = []  # (free, piece) placed so far, given back if the replica does not fit whole
        for piece in pieces:
            for node, free in nodes:
                labels = node.ray_labels()
                if all(label_matches(v, labels.get(k)) for k, v in demand.label_selector.items()) and all(
                    amount <= free.get(key, 0) + 1e-9 for key, amount in piece.items()
                ):
                    for key, amount in piece.items():
                        free[key] -= amount
                    taken.append((free, piece))
                    break
        placed = len(taken) == len(pieces)
        if not placed:
            for free, piece in taken:
                for key, amount in piece.items():
                    free[key] += amount
        count = missing.setdefault(demand.name, [0, 0])
        count[0] += not placed
        count[1] += 1
    return [f"{name}: {lost} of {total} replicas find no room" for name, (lost, total) in missing.items() if lost]


def stranded_gpus(config: AppConfig, groups: list[WorkerGroup]) -> list[str]:
    """CPU deployments asking for part of a GPU on a group whose GPUs a GPU tier takes whole: the
    rest of that GPU is then of no use to the tier (its replica needs whole GPUs)."""
    gpu_tiers = [tier_demand(t) for t in config.tiers if t.accelerator == "gpu"]
    out = []
    for demand in demands(config):
        part = demand.need.get("GPU", 0)
        if not 0 < part < 1:
            continue
        for group in groups:
            shared = [t.name for t in gpu_tiers if group.gpus and not shortfall(t, group)]
            if group.gpus and shared and not shortfall(demand, group):
                out.append(
                    f"{demand.name} asks for {part:g} GPU and may land on {group.name}, whose GPUs "
                    f"{' and '.join(shared)} {'takes' if len(shared) == 1 else 'take'} whole: pin it elsewhere "
                    "(accelerator_type, label_selector, "
                    "resources) or run it on CPUs"
                )
    return out


def plan_nodes(config: AppConfig) -> tuple[HeadNode, list[WorkerGroup]]:
    """The head and the worker groups of the cluster; ConfigError naming each deployment that fits
    no node type and what each node type lacks for it, or the deployments whose fewest replicas
    do not fit the whole cluster together (`pack`)."""
    head, wanted = config.cluster.head, demands(config)
    groups = config.cluster.worker_groups or derive_worker_groups(head, wanted)
    nodes = [("head", head), *((group.name, group) for group in groups)]
    problems = []
    for demand in wanted:
        lacks = [(name, shortfall(demand, node)) for name, node in nodes]
        if all(why for _, why in lacks):
            where = [f"    {name}: {'; '.join(why)}" for name, why in lacks]
            problems.append(f"  {demand.name} fits no node type:\n" + "\n".join(where))
    if problems:
        raise ConfigError("cluster: a replica cannot be placed\n" + "\n".join(problems))
    crowded = pack(config, head, groups, "min")
    if crowded:
        raise ConfigError(
            "cluster: the deployments' fewest replicas do not fit on the head and every group's max_workers "
            "nodes together\n  " + "\n  ".join(crowded)
        )
    return head, groups
