"""The GPU path on a real GPU: the engine serves the embedded model, the fit check's estimate of
the KV cache agrees with what vLLM allocates, and FAISS searches on the GPU as on the CPU.

Not run in CI (no GPU there): `python -m pytest tests/gpu -s` on a GPU node verifies the path
in one command (docs/deployment.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tierserve.actors.checkpoints import prepare_embedded
from tierserve.actors.config import TierConfig
from tierserve.cluster.fit import GIB, estimate, model_shape

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: tests/gpu runs on GPU nodes", allow_module_level=True)

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return str(prepare_embedded(MODEL, progress=False))


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(checkpoint, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5, max_num_seqs=32)
    yield engine
    del engine
    torch.cuda.empty_cache()


def test_the_engine_answers_on_the_gpu(llm):
    from vllm import SamplingParams

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out.outputs[0].text


def test_the_fit_estimate_matches_vllms_kv_cache(llm, checkpoint):
    """The estimate of cluster/fit.py for this GPU against the KV tokens vLLM allocated: within a
    few percent, and not above it (the check must not pass a config vLLM would refuse)."""
    engine = {"dtype": "float32", "max_model_len": 2048, "gpu_memory_utilization": 0.5, "max_num_seqs": 32}
    tier = TierConfig(name="t", model=checkpoint, accelerator="gpu", engine=engine)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    fit = estimate(tier, "this node", torch.cuda.get_device_name(0), gpu_gib, model_shape(checkpoint), None, 1)
    cache = llm.llm_engine.vllm_config.cache_config
    allocated = cache.num_gpu_blocks * cache.block_size
    print(f"\n{fit.report()}\nvLLM allocated {allocated:,} KV tokens; estimated {fit.kv_tokens:,}")
    assert 0.85 * allocated <= fit.kv_tokens <= 1.02 * allocated


def test_faiss_searches_on_the_gpu_as_on_the_cpu():
    """tierserve's own move of a flat index to the GPU (rag/indexes.py `to_gpu`, what the retriever
    does on opening an index): it lands there and finds what the CPU index finds."""
    faiss = pytest.importorskip("faiss")
    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support (install faiss-gpu)")
    from tierserve.rag.indexes import to_gpu

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((10_000, 384)).astype("float32")
    queries = rng.standard_normal((16, 384)).astype("float32")
    cpu = faiss.IndexFlatIP(384)
    cpu.add(vectors)
    gpu, on_gpu = to_gpu(cpu, "flat", None)
    assert on_gpu and (cpu.search(queries, 5)[1] == gpu.search(queries, 5)[1]).all()
