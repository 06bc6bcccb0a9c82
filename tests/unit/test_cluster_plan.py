"""The cluster's node types: worker groups derived from the deployments, and the check that every
deployment's replica fits some node type, with what each node type lacks when none does."""

from pathlib import Path

import pytest
import yaml

from tierserve.cluster.config import AppConfig, ConfigError, load_config
from tierserve.cluster.plan import label_matches, pack, plan_nodes, stranded_gpus

REPO = Path(__file__).resolve().parents[2]


def app(tiers: list[dict], cluster: dict | None = None, **extra) -> AppConfig:
    return AppConfig.model_validate({"tiers": tiers, "rag": {"enabled": False}, "cluster": cluster or {}, **extra})


def gpu_tier(name: str = "large", tp: int = 4, **deployment) -> dict:
    return {"name": name, "model": "/m", "accelerator": "gpu", "tensor_parallel_size": tp, "deployment": deployment}


@pytest.mark.parametrize(
    "selector, value, matches",
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a", None, False),
        ("!a", "b", True),
        ("!a", None, True),  # absent is "not a", as in Ray's autoscaler
        ("!a", "a", False),
        ("in(a, b)", "b", True),
        ("in(a,b)", "c", False),
        ("!in(a,b)", "c", True),
        ("!in(a,b)", "a", False),
    ],
)
def test_label_selector_semantics(selector, value, matches):
    assert label_matches(selector, value) is matches


def test_cpu_deployments_stay_on_the_head():
    head, groups = plan_nodes(load_config(REPO / "configs" / "local.yaml", check_engine=False))
    assert groups == [] and head.cpus == 8


def test_a_gpu_tier_gets_a_group_sized_for_one_replica():
    deployment = {
        "num_cpus": 6,
        "autoscaling": {"min_replicas": 0, "max_replicas": 3},
        "accelerator_type": "A100",
        "resources": {"tier_large": 0.5},
        "label_selector": {"pool": "large", "zone": "in(z1,z2)", "market": "!spot"},
    }
    _, (group,) = plan_nodes(app([gpu_tier(**deployment)]))
    assert group.name == "tier-large" and (group.min_workers, group.max_workers) == (0, 3)
    # 7 CPUs: of a 7-CPU machine Ray gets the 6 the replica asks for (nodes.py: the system keeps 0.6)
    assert (group.cpus, group.ray_cpus(), group.gpus, group.accelerator_type) == (7, 6, 4, "A100")
    assert group.resources == {"tier_large": 1}  # whole units on a node
    # Equality and in(...) become labels; a negation is met by having no such label.
    assert group.labels == {"pool": "large", "zone": "z1"}
    assert group.ray_labels() == {"ray.io/accelerator-type": "A100", "pool": "large", "zone": "z1"}
    assert group.ray_resources() == {"CPU": 6, "GPU": 4, "accelerator_type:A100": 1, "tier_large": 1}


def test_cpu_deployments_leave_the_head_for_what_it_lacks_or_has_no_room_for():
    tiers = [
        {"name": "fits", "model": "/m", "deployment": {"num_cpus": 2, "num_replicas": 2}},
        {"name": "big", "model": "/m", "deployment": {"num_cpus": 4, "num_replicas": 2}},  # 4 + 8 > 8 CPUs
        {"name": "labelled", "model": "/m", "deployment": {"label_selector": {"pool": "cpu"}}},
        {"name": "special", "model": "/m", "deployment": {"resources": {"avx512": 1}}},
    ]
    head, groups = plan_nodes(app(tiers, ingress={"deployment": {"num_cpus": 1}}))
    assert [g.name for g in groups] == ["tier-big", "tier-labelled", "tier-special"]
    big, labelled, special = groups
    assert (big.ray_cpus(), big.gpus, big.min_workers, big.max_workers) == (4, 0, 2, 2)
    assert labelled.labels == {"pool": "cpu"} and special.resources == {"avx512": 1}


def test_a_head_with_the_labels_keeps_the_deployment():
    tier = {"name": "t", "model": "/m", "deployment": {"label_selector": {"pool": "cpu"}}}
    assert plan_nodes(app([tier], {"head": {"labels": {"pool": "cpu"}}}))[1] == []


A100 = {"name": "a100", "gpus": 8, "cpus": 96, "accelerator_type": "A100", "labels": {"pool": "large"}}


@pytest.mark.parametrize(
    "tier, group, lacks",
    [
        (
            gpu_tier(tp=4),
            {**A100, "gpus": 2},
            "a100: has 2 GPUs, needs 4 on one node (STRICT_PACK, tensor_parallel_size 4)",
        ),
        (gpu_tier(tp=4, num_cpus=128), A100, "a100: has 95 CPUs, needs 128"),
        (gpu_tier(accelerator_type="H100"), A100, "a100: has no H100 accelerator"),
        (gpu_tier(resources={"tier_large": 1}), A100, "a100: has 0 of resource 'tier_large', needs 1"),
        (gpu_tier(label_selector={"pool": "small"}), A100, "a100: has label pool=large, needs pool: small"),
        (gpu_tier(label_selector={"pool": "!large"}), A100, "a100: has label pool=large, needs pool: !large"),
        (gpu_tier(label_selector={"zone": "in(a,b)"}), A100, "a100: has no label zone, needs zone: in(a,b)"),
    ],
)
def test_a_replica_that_fits_no_node_type_is_named_with_what_each_lacks(tier, group, lacks):
    with pytest.raises(ConfigError) as err:
        plan_nodes(app([tier], {"worker_groups": [group]}))
    message = str(err.value)
    assert "tier 'large' fits no node type" in message and lacks in message
    assert "head: has 0 GPUs" in message  # the head is a node type too, without GPUs


def test_ranks_that_need_not_share_a_node_fit_smaller_nodes():
    # SPREAD/PACK place each rank's bundle where it fits; only STRICT_PACK needs all GPUs on one node.
    small = {**A100, "gpus": 1, "max_workers": 4}
    assert plan_nodes(app([{**gpu_tier(tp=4), "placement_strategy": "SPREAD"}], {"worker_groups": [small]}))
    with pytest.raises(ConfigError, match="has 1 GPUs, needs 4 on one node"):
        plan_nodes(app([gpu_tier(tp=4)], {"worker_groups": [small]}))
    # ... as long as the group has nodes enough for all four ranks
    with pytest.raises(ConfigError, match="tier 'large': 1 of 1 replicas find no room"):
        plan_nodes(
            app([{**gpu_tier(tp=4), "placement_strategy": "SPREAD"}], {"worker_groups": [{**small, "max_workers": 3}]})
        )


def test_all_replicas_together_must_fit_the_cluster_at_its_largest():
    """Each replica fitting some node is not enough: the fewest replicas of every deployment must
    fit the head and every group's max_workers nodes together, or nothing could start."""
    two = {"autoscaling": {"min_replicas": 2, "max_replicas": 4}}
    tiers = [gpu_tier("a", tp=4, **two), gpu_tier("b", tp=4, num_replicas=1)]
    group = {**A100, "max_workers": 1}  # one node of 8 GPUs: room for two 4-GPU replicas, not three
    with pytest.raises(ConfigError, match="do not fit on the head and every group's max_workers nodes") as err:
        plan_nodes(app(tiers, {"worker_groups": [group]}))
    assert "tier 'b': 1 of 1 replicas find no room" in str(err.value)  # a's two took the node's 8 GPUs
    # With two nodes the fewest fit; at a's maximum (4 + 1 replicas, 20 GPUs of 16) one does not.
    config = app(tiers, {"worker_groups": [{**group, "max_workers": 2}]})
    head, groups = plan_nodes(config)
    assert pack(config, head, groups, "min") == []
    assert pack(config, head, groups, "max") == ["tier 'b': 1 of 1 replicas find no room"]
    # Labels count: a replica goes only where its selector matches.
    picky = app([gpu_tier("a", tp=4, label_selector={"pool": "large"})], {"worker_groups": [{**group, "labels": {}}]})
    with pytest.raises(ConfigError, match="fits no node type"):
        plan_nodes(picky)


def test_every_deployment_is_checked_and_named():
    config = app(
        [gpu_tier(tp=1)],
        {"worker_groups": [{"name": "gpu", "gpus": 1, "cpus": 1}]},
        ingress={"deployment": {"num_cpus": 16}},
        rag={"enabled": True, "deployment": {"num_gpus": 0.5, "accelerator_type": "L4"}},
    )
    with pytest.raises(ConfigError) as err:
        plan_nodes(config)
    message = str(err.value)
    assert "the ingress fits no node type:\n    head: has 7 CPUs, needs 16\n    gpu: has 1 CPUs, needs 16" in message
    assert "the retriever fits no node type" in message and "gpu: has no L4 accelerator" in message
    assert "tier 'large'" not in message


def test_the_gpu_example_fits_its_own_cluster_section():
    head, groups = plan_nodes(load_config(REPO / "configs" / "gpu.yaml", check_engine=False))
    assert [g.name for g in groups] == ["l40s", "a100"] and head.cpus == 16


def test_config_check_says_when_autoscaling_cannot_reach_its_maximum(tmp_path, capsys):
    from tierserve.cluster.cli import main

    tiers = [gpu_tier("a", tp=4, autoscaling={"min_replicas": 1, "max_replicas": 3})]
    config = {"tiers": tiers, "rag": {"enabled": False}, "cluster": {"worker_groups": [{**A100, "max_workers": 1}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "at most replicas: tier 'a': 1 of 3 replicas find no room (raise the groups' max_workers" in out


def test_a_fraction_of_a_gpu_beside_whole_gpu_tiers_is_flagged():
    """The retriever's 0.1 GPU on a node whose one GPU an 8B replica needs whole strands 0.9 of it."""
    group = {"name": "l40s", "gpus": 1, "cpus": 16, "accelerator_type": "L40S", "max_workers": 4}
    rag = {"enabled": True, "deployment": {"num_cpus": 2, "num_gpus": 0.1}}
    config = app([gpu_tier("fast", tp=1)], {"worker_groups": [group]}, rag=rag)
    _, groups = plan_nodes(config)
    (line,) = stranded_gpus(config, groups)
    assert line.startswith("the retriever asks for 0.1 GPU and may land on l40s, whose GPUs tier 'fast' takes whole")
    pinned = {"enabled": True, "deployment": {"num_cpus": 2}}  # on CPUs: nothing to say
    config = app([gpu_tier("fast", tp=1)], {"worker_groups": [group]}, rag=pinned)
    assert stranded_gpus(config, plan_nodes(config)[1]) == []
