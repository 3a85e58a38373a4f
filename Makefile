# Two commands on a fresh clone: `make test` and `make demo`. Each creates .venv when missing
# (torch first, pinned, so pip takes the CPU wheel instead of several GB of CUDA wheels),
# then does its job; later runs reuse the venv until pyproject.toml changes.

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

.PHONY: venv test demo bench ui clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/compaction demo --params $(PARAMS)

# The MLflow UI over the project's store, on loopback only; one worker and no background job
# runners (mlflow's defaults start 4 workers and job runners: too much for a small machine).
UI_PORT ?= 5000
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui \
		--backend-store-uri sqlite:///$(abspath mlflow.db) --default-artifact-root $(abspath mlartifacts) \
		--host 127.0.0.1 --port $(UI_PORT) --workers 1

bench: $(STAMP)
	$(BIN)/python bench/grading.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/kernels.py

clean:
	rm -rf artifacts mlartifacts mlflow.db .pytest_cache
