# Development and CI entry points. `make test` works on a fresh clone: it builds .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: pinned here (not in pyproject) so CI never downloads a CUDA build,
# while GPU images keep the torch they ship.
TORCH_PIN ?= torch==2.13.0
# OpenCLIP is the reference implementation the equivalence tests compare against. It is
# installed without its dependencies because it pulls torchvision, whose PyPI wheel would
# replace the CPU torch; the tests import only its torch-only modules.
OPENCLIP_PIN ?= open-clip-torch==3.3.0

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(OPENCLIP_PIN)
	touch $@

test: install
	$(BIN)/pytest tests

demo: install
	$(BIN)/clipflow demo

clean:
	rm -rf $(VENV) .clipflow
