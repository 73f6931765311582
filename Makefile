# The two commands of README.md on a fresh machine (Python >= 3.10, make):
#   make demo   export the main job's artifact (CLIP ViT-B/32, INT8, random weights: offline) and embed the
#               bundled sample photos with it
#   make test   lint (ruff), the import contract of the architecture (lint-imports) and the test suite
#               (CPU; GPU tests skip)
#   make test-cpu-classes  the CPU-dependent tests on every x86 CPU class reachable here: oneDNN capped with
#               ONEDNN_MAX_CPU_ISA (AVX2, AVX-512 without VNNI, AVX-512 VNNI), ONNX Runtime under
#               qemu-x86_64 -cpu Haswell (Debian package qemu-user), and this CPU uncapped (tests/cpu_classes.py)
# Both create .venv and install imgembed with its dev extras first; the stamp file .venv/.installed makes
# them reinstall when pyproject.toml changes (and disappears with .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# ruff is pinned so that a fresh machine lints with the rules the tree was checked with.
RUFF := ruff==0.17.6
ARTIFACT := artifacts/clip-vit-b32-int8
SAMPLES := artifacts/samples

.PHONY: demo test test-cpu-classes install

demo: $(STAMP)
	$(BIN)/imgembed export clip-vit-b32 --random-init --int8 --out $(ARTIFACT)
	$(BIN)/python -c "from imgembed.bench.suite import write_sample_files; write_sample_files('$(SAMPLES)')"
	$(BIN)/imgembed embed $(ARTIFACT) $(SAMPLES) --out artifacts/sample-embeddings.npy

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-cpu-classes: $(STAMP)
	$(BIN)/python -m tests.cpu_classes

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]" "$(RUFF)"
	touch $(STAMP)
