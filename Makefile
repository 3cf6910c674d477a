# The two commands a new machine needs:  `make demo`  and  `make test`.
# Both create the virtual environment and install detlens on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.detlens-installed
CONFIG ?= configs/fasterrcnn_synthetic.yaml
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Trains the demo detector on the built-in synthetic scenes with every callback on; W&B offline.
demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/detlens fit --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) wandb lightning_logs outputs data .pytest_cache
