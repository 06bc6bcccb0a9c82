"""Where a tier's tensor-parallel ranks run: GPU placement groups and CPU core binding."""

import os
import subprocess
import sys
from collections import Counter

import pytest
from ray import serve

from tierserve.actors.config import TierConfig
from tierserve.actors.placement import (
    binding_spec,
    claim_cpu_binding,
    engine_placement_options,
    placement_options,
    plan_cpu_binding,
    release_cpu_binding,
)


def gpu_tier(tp: int, **extra) -> TierConfig:
    return TierConfig(name="big", model="/m", accelerator="gpu", tensor_parallel_size=tp, **extra)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gpu_replica_reserves_one_gpu_bundle_per_rank_strict_pack(tp):
    tier = gpu_tier(tp, deployment={"num_cpus": 4, "resources": {"a100": 0.5}})
    options = placement_options(tier)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == tp and all(b["GPU"] == 1 for b in bundles)
    # The replica actor sits in the first bundle: its CPUs and custom resources go there only.
    assert bundles[0] == {"GPU": 1, "CPU": 4, "a100": 0.5}
    assert all(b == {"GPU": 1} for b in bundles[1:])
    assert options["placement_group_strategy"] == "STRICT_PACK"
    actor = options["ray_actor_options"]
    assert "num_gpus" not in actor and "resources" not in actor and actor["num_cpus"] == 4
    # vLLM starts one Ray worker per rank inside the replica's placement group.
    assert engine_placement_options(tier) == {"tensor_parallel_size": tp, "distributed_executor_backend": "ray"}


def test_gpu_placement_strategy_is_configurable():
    options = placement_options(gpu_tier(2, placement_strategy="SPREAD"))
    assert options["placement_group_strategy"] == "SPREAD"


@serve.deployment
class _Probe:
    """A deployment to hand the options to, so Serve's own checks run on them."""


@pytest.mark.parametrize("tp", [1, 4])
def test_gpu_accelerator_type_and_labels_are_asked_of_every_rank_bundle(tp):
    selector = {"pool": "large", "zone": "in(a,b)"}
    tier = gpu_tier(tp, deployment={"num_cpus": 2, "accelerator_type": "A100", "label_selector": selector})
    options = placement_options(tier)
    # Ray asks 0.001 of `accelerator_type:A100` for accelerator_type="A100"; each rank's GPU is its own bundle.
    assert all(b["accelerator_type:A100"] == 0.001 and b["GPU"] == 1 for b in options["placement_group_bundles"])
    assert options["placement_group_bundle_label_selector"] == [selector] * tp
    actor = options["ray_actor_options"]
    assert "label_selector" not in actor and "accelerator_type" not in actor  # the bundles hold them
    replica = _Probe.options(name="probe", **options)._replica_config
    assert replica.placement_group_bundle_label_selector == [selector] * tp


def test_cpu_tier_asks_labels_accelerator_and_per_node_cap_of_its_actor():
    deployment = {"accelerator_type": "L4", "label_selector": {"market": "!spot"}, "max_replicas_per_node": 2}
    options = placement_options(TierConfig(name="c", model="/m", deployment=deployment))
    assert options["ray_actor_options"] == {
        "num_cpus": 1,
        "accelerator_type": "L4",
        "label_selector": {"market": "!spot"},
    }
    assert options["max_replicas_per_node"] == 2 and "placement_group_bundles" not in options
    assert _Probe.options(name="probe", **options)._replica_config.max_replicas_per_node == 2


def test_cpu_tier_has_no_placement_group_and_keeps_vllms_executor():
    tier = TierConfig(name="c", model="/m", tensor_parallel_size=2, deployment={"num_cpus": 2})
    options = placement_options(tier)
    assert "placement_group_bundles" not in options and options["ray_actor_options"]["num_cpus"] == 2
    assert engine_placement_options(tier) == {"tensor_parallel_size": 2}


@pytest.mark.parametrize(
    "ranks, per_rank, allowed, claimed, expected",
    [
        (1, 1, [0, 1], {}, [[0]]),
        (1, 1, [0, 1], {0: 1}, [[1]]),  # a second tier on the node gets the free core
        (2, 1, [0, 1], {}, [[0], [1]]),
        (2, 2, [0, 1, 2, 3, 4, 5, 6, 7], {0: 1, 1: 1}, [[2, 3], [4, 5]]),
        (1, 2, [4, 5, 6, 7], {5: 2, 6: 1}, [[4, 7]]),  # unclaimed cores first
        (2, 1, [3], {}, [[3], [3]]),  # fewer cores than ranks: ranks share rather than fail
    ],
)
def test_plan_cpu_binding(ranks, per_rank, allowed, claimed, expected):
    assert plan_cpu_binding(ranks, per_rank, allowed, Counter(claimed)) == expected


def test_binding_spec_is_vllms_syntax():
    assert binding_spec([[0, 1], [2, 3]]) == "0,1|2,3"
    assert binding_spec([[5]]) == "5"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_claims_spread_tiers_over_cores_and_end_with_the_process(tmp_path):
    claims = tmp_path / "claims.json"
    first_core = min(os.sched_getaffinity(0))
    # Another live process (a sleeping child) holds the first core; a dead pid's claim is dropped.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claims.write_text(f'{{"{holder.pid}": [{first_core}], "999999999": [{first_core}]}}')
        plan = claim_cpu_binding(1, 1.0, claims)
        assert plan[0] != [first_core]
        release_cpu_binding(claims)
        assert str(os.getpid()) not in claims.read_text() and "999999999" not in claims.read_text()
    finally:
        holder.kill()
        holder.wait()
    # With the holder gone, its claim no longer counts.
    assert claim_cpu_binding(1, 1.0, claims) == [[first_core]]
    release_cpu_binding(claims)
