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
TORCH_WHEEL_DIR ?= /opt/wheels

.PHONY: env demo test bench clean help

help:
	@echo "make demo   - create the environment if missing, run the embedded demo"
	@echo "make test   - create the environment if missing, run the test suite"
	@echo "make env    - only create/refresh the environment ($(VENV))"
	@echo "make clean  - remove the environment and the data directory"

env: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@echo ">> creating/refreshing Python environment in $(VENV) (lock: $(LOCK))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)
	@echo ">> environment ready"

demo: env
	@echo ">> running the embedded demo (broker + simulated world)"
	@$(VENV)/bin/osmf demo

test: env
	@echo ">> running the test suite"
	@HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) data
