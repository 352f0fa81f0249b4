# PersonaPlex Edge - the two commands a newcomer needs are `make demo` and `make test`.
# Everything installs into .venv from the repository's own files.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU torch for the export stack and the parity oracle (a CUDA build on a workstation is fine too).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: help venv demo test lint bench synth-tiny export-tiny clean

help:
	@echo "make demo    - synthesize a tiny PersonaPlex-shaped checkpoint and export it (no GPU, no download)"
	@echo "make test    - the whole CPU test suite (creates $(VENV) on first use)"
	@echo "make bench   - Mimi streaming benchmark: ONNX Runtime vs upstream PyTorch, side by side"
	@echo "make lint    - ruff"

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[export,audio,dev]"
	# The upstream Moshi package is the parity oracle only: its pins predate current torch.
	$(PIP) install --quiet --no-deps "moshi==0.2.13"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m personaplex_edge.export.cli synth --size tiny --seed 0 --out $(OUT)/tiny-checkpoint --force --quiet
	$(PY) -m personaplex_edge.export.cli onnx --checkpoint $(OUT)/tiny-checkpoint --out $(OUT)/tiny-build --force
	$(PY) -m personaplex_edge.export.cli inspect --build $(OUT)/tiny-build

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_mimi.py

clean:
	rm -rf $(OUT) .pytest_cache
