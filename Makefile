# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch on a machine without a GPU; override, e.g. TORCH_SPEC="torch>=2.1", on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/demo.py --out $(DEMO_DIR)
