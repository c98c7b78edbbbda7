# Two commands on a fresh clone:  `make demo` (the main job)  and  `make test` (the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install system demo test bench

# pip takes torch/torchvision from local wheels where the machine has them (see requirements.txt)
$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/grafit matrix jobs/matrix/omniglot.yaml

# system tools the tests use (Debian packages; needs root or an existing install): headless
# Chromium renders the MLflow UI, `ss` (iproute2) checks which address each server listens on,
# a C compiler builds the exact-AP counting loop (grafit_core/ap_kernel.c; without one, a slower
# torch path runs)
system:
	@command -v chromium >/dev/null && command -v ss >/dev/null && command -v cc >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium iproute2 gcc >/dev/null)

test: install system
	$(BIN)/python -m pytest -q --durations=15 -n 2

bench: install
	$(BIN)/python benchmarks/omniglot_methods.py
