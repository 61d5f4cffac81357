# minqwen: every target bootstraps a local .venv on first use and reuses it afterwards.
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.base-installed
DEV_STAMP := $(VENV)/.dev-installed
PROMPT ?= The capital of France is

.PHONY: run test lab bench clean-venv

# torch goes in first and alone: pinned to 2.13.0, a CPU build, so nothing pulls a CUDA build.
$(BASE_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(DEV_STAMP): $(BASE_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

## run: fetch the real weights once, then continue a prompt with the real 0.5B model
run: $(BASE_STAMP)
	$(PY) -m minqwen "$(PROMPT)"

## test: pytest (incl. HF parity) and every notebook under nbval
test: $(DEV_STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval notebooks

## lab: open the notebooks in Jupyter Lab (with transformers: some notebooks compare with HF)
lab: $(DEV_STAMP)
	$(VENV)/bin/jupyter lab notebooks

## bench: minqwen vs HF transformers on the real checkpoint (about half an hour on 2 cores); JSON in bench-results/
bench: $(DEV_STAMP)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
