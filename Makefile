# mpbatch: the two set-up commands are `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
# Demo iterations: the seed preset's 500 would triple the masks' share of the time for the
# five photos on 2 CPU cores; 150 already show the picture. Measured on 2026-11-26 on a quiet
# 2-core machine, from a clean clone with .venv installed: 2 min 4 s (masks 25 s, scoring the
# masks and both baselines 91 s).
DEMO_ITERATIONS ?= 150

.PHONY: install references test test-slow lint format demo smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The tests' references, installed only for the tests (`make demo` needs none of them).
# What they import is installed first; then each reference with --no-deps, which runs no
# resolver check, so pip prints no conflict about the pins that are left out on purpose.
references: $(VENV)/.references

$(VENV)/.references: $(VENV)/.installed
	# Quantus's MPRT needs OpenCV (its pin names the GUI build opencv-python; the headless
	# build gives the same cv2 module), scikit-learn and cachetools
	$(BIN)/pip install --quiet opencv-python-headless scikit-learn cachetools
	# TorchRay without its unmaintained pins (the modules the tests import need only torch,
	# numpy and matplotlib, installed above)
	$(BIN)/pip install --quiet --no-deps torchray==1.0.0.2
	# ROAD: grad-cam's port of road_evaluation's imputer (tests/test_road.py loads that one
	# file; the package's own imports, OpenCV and ttach, are not needed)
	$(BIN)/pip install --quiet --no-deps grad-cam==1.5.7
	# the sanity check: Quantus's MPRT (tests/test_randomisation.py)
	$(BIN)/pip install --quiet --no-deps quantus==0.6.0
	touch $@

test: references
	$(BIN)/python -m pytest -q

test-slow: references
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install
	$(BIN)/mpbatch run examples -o $(DEMO_OUT) --iterations $(DEMO_ITERATIONS) --batch-size 5
	$(BIN)/mpbatch show $(DEMO_OUT) -o $(DEMO_OUT)/figures
	@echo "figures in $(DEMO_OUT)/figures, table in $(DEMO_OUT)/report.csv"

# What CI runs after the tests: the demo on two images with a few iterations.
smoke: install
	$(BIN)/mpbatch run examples -o smoke-out --limit 2 --iterations 3 --batch-size 2 --step 1792 \
		--baselines center --overwrite --quiet
	$(BIN)/mpbatch show smoke-out -o smoke-out/figures
	test -s smoke-out/report.csv
	test "$$(ls smoke-out/figures/*.png | wc -l)" -eq 2

clean:
	rm -rf $(DEMO_OUT) smoke-out
