# Two commands for a fresh checkout: `make demo` and `make test`. Both create or refresh the
# virtual environment in $(VENV) first; the refresh is skipped while pyproject.toml is unchanged.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# torch/torchvision go in first, pinned, so no other package pulls a different torch build.
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.hncl-installed

.PHONY: venv test demo bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/hncl demo

# the CPU benchmarks of docs/PERFORMANCE.md (about 15 minutes on 2 cores); GPU: benchmarks/gpu_suite.py
bench: $(STAMP)
	$(PY) benchmarks/method_overhead.py
	$(PY) benchmarks/method_overhead.py --world 2 --tag w2
	$(PY) benchmarks/queue_scaling.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/heatmap_extraction.py --faces 8
	$(PY) benchmarks/ray_scaling.py

clean-venv:
	rm -rf $(VENV)
