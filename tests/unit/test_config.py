"""Config loading: the bundled files load, and every kind of mistake names its YAML path and line."""

from pathlib import Path

import pytest

from tierserve.cluster.config import ConfigError, bundled_config, load_config, yaml_path
from tierserve.core.config import DeploymentOptions

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
tiers:
  - name: small
    model: embedded:smollm2-135m-instruct
    engine:
      max_model_len: 1024
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_bundled_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.tiers


def test_default_is_the_packaged_local_config():
    assert bundled_config().name == "local.yaml"
    config = load_config()
    assert config.tiers[0].embedded_name == "smollm2-135m-instruct"
    assert config.ingress.default_tier == config.tiers[0].name


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.server.port == 8000
    assert config.tiers[0].engine == {"max_model_len": 1024}
    assert config.tiers[0].deployment.serve_options()["num_replicas"] == 1


@pytest.mark.parametrize(
    "text, where",
    [
        # wrong type, nested in a list
        (
            GOOD + "    deployment:\n      num_cpus: many\n",
            ":7: tiers[0].deployment.num_cpus: Input should be a valid number",
        ),
        # unknown key
        (GOOD + "    deployment:\n      cpus: 1\n", ":7: tiers[0].deployment.cpus: Extra inputs are not permitted"),
        # engine options are checked against vLLM's AsyncEngineArgs
        (
            GOOD + "      max_modle_len: 5\n",
            ":6: tiers[0].engine.max_modle_len: not an option of vLLM's AsyncEngineArgs",
        ),
        # a tool-call parser vLLM does not have, a template that is neither bundled nor a file
        (GOOD + "    tools: {parser: hermess}\n", ":6: tiers[0].tools.parser: unknown tool-call parser 'hermess'"),
        (GOOD + "    tools: {chat_template: chatml}\n", ":6: tiers[0].tools.chat_template: Value error, a bundled"),
        # missing required field
        ("tiers:\n  - name: small\n", ":2: tiers[0].model: Field required"),
        ("server:\n  port: 8000\n", ":1: tiers: Field required"),
        # value constraints
        (GOOD.replace("name: small", "name: Small Tier"), ":2: tiers[0].name: String should match pattern"),
        (GOOD + "server:\n  port: 70000\n", ":7: server.port: Input should be less than or equal to 65535"),
    ],
)
def test_errors_name_the_yaml_path_and_line(tmp_path, text, where):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert where in str(err.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("  - name: small\n    model: x\n", "tier names must be unique; repeated: small"),
        ("  - name: auto\n    model: x\n", "'auto' is reserved"),
    ],
)
def test_tier_set_rules(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD + extra))


def test_default_tier_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="ingress.default_tier 'large' is not a tier"):
        load_config(write(tmp_path, GOOD + "ingress:\n  default_tier: large\n"))


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "tiers: [\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_path_formatting():
    assert yaml_path(("tiers", 0, "engine", "dtype")) == "tiers[0].engine.dtype"
    assert yaml_path(()) == "<root>"


def test_deployment_options_map_to_serve():
    opts = DeploymentOptions(
        num_replicas=2,
        num_cpus=4,
        num_gpus=1,
        resources={"tier_large": 1},
        label_selector={"pool": "large"},
        accelerator_type="A100",
        max_replicas_per_node=1,
        env={"A": "1"},
    )
    serve_opts = opts.serve_options()
    assert serve_opts["num_replicas"] == 2 and serve_opts["max_replicas_per_node"] == 1
    assert serve_opts["ray_actor_options"] == {
        "num_cpus": 4,
        "num_gpus": 1,
        "resources": {"tier_large": 1},
        "label_selector": {"pool": "large"},
        "accelerator_type": "A100",
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    assert "max_replicas_per_node" not in DeploymentOptions().serve_options()


def test_serve_throughput_mode_is_the_default_ray_env(tmp_path):
    env = load_config(write(tmp_path, GOOD)).ray.env
    assert env == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
        "RAY_SERVE_PROXY_USE_GRPC": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    }
    assert load_config(write(tmp_path, GOOD + "ray:\n  env: {}\n")).ray.env == {}


@pytest.mark.parametrize(
    "tier_yaml, message",
    [
        ("    engine:\n      tensor_parallel_size: 2\n", "engine.tensor_parallel_size is set by the tier's"),
        ("    tensor_parallel_size: 2\n", r"deployment.num_cpus \(1\) must be at least tensor_parallel_size \(2\)"),
        ("    accelerator: gpu\n    deployment:\n      num_gpus: 1\n", "leave deployment.num_gpus at 0"),
        ("    accelerator: tpu\n", r":4: tiers\[0\].accelerator: Input should be 'cpu' or 'gpu'"),
        ("    speculative:\n      method: draft_model\n", "method 'draft_model' needs `model`"),
        ("    speculative:\n      method: ngram\n      model: /d\n", "method 'ngram' takes no `model`"),
        ("    speculative:\n      method: medusa\n", "Input should be 'draft_model' or 'ngram'"),
        (
            "    speculative:\n      method: ngram\n      prompt_lookup_min: 5\n      prompt_lookup_max: 2\n",
            "prompt_lookup_min must not exceed prompt_lookup_max",
        ),
        (
            "    accelerator: gpu\n    tensor_parallel_size: 4\n    speculative:\n      method: draft_model\n"
            "      model: /d\n      draft_tensor_parallel_size: 1\n",
            r"draft_tensor_parallel_size must equal tensor_parallel_size \(4\), got 1: vLLM's draft-model proposer",
        ),
        (  # vLLM's own check of its per-batch-size schedule
            "    speculative:\n      method: ngram\n      tokens_per_batch_size: [[2, 8, 3]]\n",
            "The first batch-size range must start at 1",
        ),
        (
            "    speculative:\n      method: ngram\n      disable_above_batch_size: 4\n"
            "      tokens_per_batch_size: [[1, 8, 3]]\n",
            "set disable_above_batch_size or tokens_per_batch_size, not both",
        ),
        ("    deployment:\n      num_replicas: 2\n      autoscaling: {max_replicas: 4}\n", "not both"),
        (  # Ray's own label selector syntax
            '    deployment:\n      label_selector: {pool: "in(a,"}\n',
            r":5: tiers\[0\].deployment.label_selector: Value error, Invalid label selector value `in\(a,`",
        ),
        (
            "    accelerator: gpu\n    deployment:\n      max_replicas_per_node: 2\n",
            "max_replicas_per_node is not for accelerator 'gpu'",
        ),
        ("    deployment:\n      autoscaling: {max_replicas: 0}\n", "max_replicas"),
    ],
)
def test_tier_placement_and_speculation_rules(tmp_path, tier_yaml, message):
    text = "tiers:\n  - name: small\n    model: embedded:smollm2-135m-instruct\n" + tier_yaml
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_autoscaling_replaces_num_replicas():
    opts = DeploymentOptions(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    serve_opts = opts.serve_options()
    assert "num_replicas" not in serve_opts
    assert serve_opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


def test_autoscaling_bounds():
    assert DeploymentOptions(num_replicas=3).replica_bounds() == (3, 3)
    assert DeploymentOptions(autoscaling={"min_replicas": 0, "max_replicas": 4}).replica_bounds() == (0, 4)
    assert DeploymentOptions().replica_bounds() == (1, 1)


CLUSTER = GOOD + "cluster:\n"


@pytest.mark.parametrize(
    "cluster_yaml, where",
    [
        ("  nodes: 3\n", ":7: cluster.nodes: Extra inputs are not permitted"),
        ("  name: Tier_Serve\n", ":7: cluster.name: String should match pattern"),
        ("  provider: {region: us-west-2}\n", ":7: cluster.provider: Value error, provider needs a `type`"),
        ("  head: {gpus: 1}\n", ":7: cluster.head.gpus: Extra inputs are not permitted"),
        ("  head: {labels: {'-bad': x}}\n", ":7: cluster.head.labels: Value error, Invalid label key name"),
        ("  head: {pod: {containers: []}}\n", "cluster.head.pod: Value error, pod.containers is tierserve's own"),
        (
            "  worker_groups:\n    - {name: gpu, gpus: 1, min_workers: 3, max_workers: 2}\n",
            ":8: cluster.worker_groups[0]: Value error, min_workers (3) must not exceed max_workers (2)",
        ),
        (
            "  worker_groups:\n    - {name: gpu, accelerator_type: A100}\n",
            "cluster.worker_groups[0]: Value error, accelerator_type needs gpus",
        ),
        ("  worker_groups:\n    - {name: GPU}\n", ":8: cluster.worker_groups[0].name: String should match pattern"),
        (
            "  worker_groups:\n    - {name: gpu}\n    - {name: gpu}\n",
            "cluster: Value error, worker group names must be unique; repeated: gpu",
        ),
        ("  worker_groups:\n    - {name: head}\n", "'head' names the head node"),
    ],
)
def test_cluster_section_errors_name_the_yaml_path(tmp_path, cluster_yaml, where):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, CLUSTER + cluster_yaml))
    assert where in str(err.value)
