# minqwen: every target bootstraps a local .venv on first use and reuses it afterwards.
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.base-installed
DEV_STAMP := $(VENV)/.dev-installed
BENCH_STAMP := $(VENV)/.bench-installed
PROMPT ?= The capital of France is

.PHONY: run test test-fast test-emulated strip lab bench clean-venv

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

# llama-cpp-python builds from source (about 7 minutes on 2 cores); without a compiler the
# benchmark still runs and its llama.cpp row says why it was skipped.
$(BENCH_STAMP): $(DEV_STAMP) benchmarks/requirements-bench.txt
	$(PY) -m pip install --quiet -r benchmarks/requirements-bench.txt || echo "llama-cpp-python did not install: the benchmark will skip llama.cpp"
	touch $@

## run: fetch the real weights once, then continue a prompt with the real 0.5B model
run: $(BASE_STAMP)
	$(PY) -m minqwen "$(PROMPT)"

# The second nbval pass runs the notebooks as on another CPU, against the same stored outputs:
# PyTorch's non-vectorised kernels, MKL's SSE2 code path (each changes the last bits of an fp32
# F.linear), and each CPU-feature switch forced to the path this CPU does not take: the bf16 GEMM
# (native on CPUs with fast bf16, fp32 elsewhere) and the int8 kernel (fused by default).
# Recursive (=): evaluated when the recipe runs, after .venv exists. Override on the command line.
OTHER_BF16_GEMM = $(shell $(PY) -c "from minqwen.linear import cpu_has_fast_bf16_gemm as fast; print('fp32' if fast() else 'native')" || echo FAILED-see-Makefile)
EMULATED_CPU_ENV = ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE MINQWEN_BF16_GEMM=$(OTHER_BF16_GEMM) MINQWEN_INT8_KERNEL=dequant MINQWEN_INT4_KERNEL=dequant

## test: pytest (incl. HF parity and the real model), every notebook under nbval, then nbval again as on another CPU
test: $(DEV_STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval notebooks
	$(MAKE) --no-print-directory test-emulated

## test-fast: the inner loop: pytest on tiny models only (no real weights, no download, no notebooks), about 2 min
test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not real" tests

## test-emulated: the notebooks under nbval with another CPU's kernels and paths (EMULATED_CPU_ENV)
test-emulated: $(DEV_STAMP)
	@echo "emulated CPU: $(EMULATED_CPU_ENV)"
	env $(EMULATED_CPU_ENV) $(PY) -m pytest -q --nbval notebooks

## strip: drop the notebooks' execution timestamps and renumber their counts 1..N (before committing a notebook)
strip: $(BASE_STAMP)
	$(PY) tools/strip_notebooks.py notebooks/*.ipynb

## lab: open the notebooks in Jupyter Lab (with transformers: some notebooks compare with HF)
lab: $(DEV_STAMP)
	$(VENV)/bin/jupyter lab notebooks

## bench: minqwen vs HF transformers and llama.cpp on the real checkpoint (about half an hour on 2 cores); JSON in bench-results/
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
