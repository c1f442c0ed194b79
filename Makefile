# Two commands (see README): `make demo` runs the tiny default job, `make test` the suite.
# Both create or refresh the virtualenv in $(VENV) first.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch is installed explicitly on machines without an NVIDIA driver:
# a plain `torch` requirement would pull a multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install -q -e ".[dev,hf]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/megarlhf demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
