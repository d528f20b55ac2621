# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-stack install lock clean vllm-env

install: $(STAMP)

# Reinstall only when the dependency declarations change.
$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints-cpu.txt -e ".[test,stack]"
	$(BIN)/python -m pip install -q --no-deps fanoutqa==1.1.1  # data only (FanOutQA dev set), not its spaCy runtime
	touch $(STAMP)

run: install  ## install, then run the whole pipeline on the embedded offline default
	$(BIN)/arft pipeline

test: install  ## install, then run the test suite
	$(BIN)/python -m pytest

test-stack: install  ## the team stack end to end (`arft stack up`, a scheduled retraining on the GPU pool; ~6 min)
	$(BIN)/python -m pytest -m stack -n 0

lock:  ## re-resolve the CPU lock from pyproject.toml (torch pinned to the CPU build)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0 -e ".[test,stack]"
	.lock-venv/bin/pip install -q --no-deps fanoutqa==1.1.1
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^arft' > requirements/constraints-cpu.txt
	rm -rf .lock-venv

vllm-env:  ## the vLLM CPU environment (.vllm-venv), beside the main one (infra/vllm/cpu_env.sh)
	bash infra/vllm/cpu_env.sh .vllm-venv

clean:  ## remove generated data, models, reports and tracking stores (not the venv)
	rm -rf data models reports tracking dvc.lock
