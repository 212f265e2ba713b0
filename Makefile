# One-command set-up. Every target creates what it needs when missing and
# says what it does. Environments are listed in ENVS; each has a requirements
# lock under requirements/ and a stamp file that is refreshed when the lock
# or pyproject.toml changes (the Triton backend's numpy<2 environment is added
# the same way: requirements/triton.txt + a .venv-triton rule).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
TRITON_VENV  := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_LOCK  := requirements/triton.txt
TORCH_WHEEL_DIR ?= /opt/wheels

.PHONY: env triton-env demo test bench clean help

help:
	@echo "make demo   - create the environment if missing, run the embedded demo"
	@echo "make test   - create the environment if missing, run the test suite"
	@echo "make env    - only create/refresh the environment ($(VENV))"
	@echo "make .venv-triton - only create/refresh the Triton backend's environment (numpy<2, torch, transformers)"
	@echo "make clean  - remove the environment and the data directory"

env: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@echo ">> creating/refreshing Python environment in $(VENV) (lock: $(LOCK))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)
	@echo ">> environment ready"

# The Triton python backend's own environment: its stub is built against numpy 1,
# while the main environment needs numpy 2 (River). serving/ points the stub at it.
triton-env: $(TRITON_STAMP)

$(TRITON_VENV): $(TRITON_STAMP)

$(TRITON_STAMP): $(TRITON_LOCK)
	@echo ">> creating/refreshing the Triton backend environment in $(TRITON_VENV) (lock: $(TRITON_LOCK))"
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	@$(TRITON_VENV)/bin/python -m pip install --quiet -r $(TRITON_LOCK)
	@touch $(TRITON_STAMP)
	@echo ">> Triton backend environment ready"

demo: env $(TRITON_STAMP)
	@echo ">> running the embedded demo (broker + simulated world)"
	@$(VENV)/bin/osmf demo

test: env $(TRITON_STAMP)
	@bash tests/setup-system.sh
	@echo ">> running the test suite"
	@HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) $(TRITON_VENV) data
