# The two commands a new machine needs:  `make demo`  and  `make test`.
# Both create the virtual environment and install detlens on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.detlens-installed
CONFIG ?= configs/fasterrcnn_synthetic.yaml
PYTEST_ARGS ?=

.PHONY: install browser demo test bench bench-gpu clean

# The Ultralytics plugin (AGPL-3.0, plugins/detlens-ultralytics) and its tests come too.
# Ultralytics declares opencv-python, which would overwrite detlens' opencv-python-headless
# (both are the cv2 module): it is installed without its declared dependencies, plus those
# it needs for building and training detection models.
ULTRALYTICS_DEPS := 'ultralytics>=8.3,<9' 'ultralytics-thop>=2.0'
ULTRALYTICS_RUNTIME := 'polars>=0.20' 'psutil>=5.8'

$(STAMP): pyproject.toml plugins/detlens-ultralytics/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,damo]'
	$(BIN)/python -m pip install --quiet --no-deps $(ULTRALYTICS_DEPS)
	$(BIN)/python -m pip install --quiet $(ULTRALYTICS_RUNTIME)
	$(BIN)/python -m pip install --quiet --no-deps -e plugins/detlens-ultralytics
	touch $(STAMP)

install: $(STAMP)

# Trains the demo detector on the built-in synthetic scenes with every callback on; W&B offline.
demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/detlens fit --config $(CONFIG)

# The report test opens `detlens compare`'s HTML in headless Chromium (Debian's package).
# Installed here when missing and apt-get is usable (root); elsewhere that test is skipped
# with a note (and fails under CI=true, where it must run).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not found and apt-get unusable: the browser test of the report is skipped"; fi; }

# `lint-imports` checks the layers (pyproject.toml, [tool.importlinter]) and `ruff check` the style
# before any test runs.
# The tests marked `numerics` (they train, or compare against a trained model's numbers) run a
# second time on torch's portable kernels: another CPU picks other kernels and gets other
# floats, and a test that only passes with this machine's kernels fails for the next person.
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/ruff check
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -m numerics $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do [ "$$b" = benchmarks/gpu_suite.py ] || $(BIN)/python $$b || exit 1; done

# The figures on one GPU (at most 8 minutes); `--device cpu --quick` is its own test, run by `make test`.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_suite.py --device cuda

clean:
	rm -rf $(VENV) wandb lightning_logs outputs data runs detlens .pytest_cache .ruff_cache .import_linter_cache
