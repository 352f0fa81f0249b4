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

.PHONY: help venv demo test lint docs try bench bench-project soak gpu-kit clean

help:
	@echo "make demo    - tiny random PersonaPlex: export, compile the default persona, play a spoken input"
	@echo "make test    - the whole CPU test suite (creates $(VENV) on first use)"
	@echo "make bench   - benchmarks side by side with upstream: real-size Mimi, the tiny runtime, the VAD in road noise, echo cancellation, mic-to-speaker latency"
	@echo "make lint    - ruff"
	@echo "make try     - the daemon on virtual audio devices (no hardware); ctl works against it"
	@echo "make docs    - the docs site into site/ (SERVE=1: serve it on localhost:8000)"
	@echo "make gpu-kit - NVIDIA GPU only: TensorRT engines (tiny; FULL=1 also 7B-size), parity, benchmark"
	@echo "make bench-project - roofline projection of the 7B per Jetson target (no GPU needed)"
	@echo "make soak    - serve for SOAK_MINUTES (60) on virtual ALSA devices with faults injected"

# Two stamps: the demo needs only python3 (the graph export and ONNX Runtime come as wheels; no
# torch); the test suite also needs torch and the export stack, and system packages
# (scripts/system_deps.sh names them all) for pyalsaaudio, the virtual ALSA devices, systemd's
# analyzers and the report's browser check.
DEMO_STAMP := $(VENV)/.installed-demo
PIP_QUIET  := --quiet --disable-pip-version-check
# pip's and the build backend's chatter goes to a log; on failure its tail is shown.
INSTALL_LOG := $(VENV)/install.log
QUIETLY     = >>$(INSTALL_LOG) 2>&1 || { tail -n 25 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }

venv: $(STAMP)

$(DEMO_STAMP): pyproject.toml Makefile
	@scripts/system_deps.sh venv
	@$(PYTHON) -m venv $(VENV)
	@echo "installing the graph export and ONNX Runtime into $(VENV) (log: $(INSTALL_LOG))"
	@$(PIP) install $(PIP_QUIET) --upgrade pip $(QUIETLY)
	@$(PIP) install $(PIP_QUIET) -e ".[graphs,onnx]" $(QUIETLY)
	@touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP) scripts/system_deps.sh
	@scripts/system_deps.sh test
	@echo "installing torch, the export stack, the device, test and report extras into $(VENV) (log: $(INSTALL_LOG))"
	@$(PIP) install $(PIP_QUIET) "$(TORCH)" $(QUIETLY)
	@$(PIP) install $(PIP_QUIET) -e ".[export,onnx,device,dev,report,aec,update,network]" $(QUIETLY)
	@# The upstream Moshi package is the parity oracle only: its pins predate current torch.
	@$(PIP) install $(PIP_QUIET) --no-deps "moshi==0.2.13" $(QUIETLY)
	@touch $(STAMP)

DEMO_INPUT ?= tests/data/driver_questions_24k.wav

demo: $(DEMO_STAMP)
	$(PY) -m personaplex_edge.export.cli synth --size tiny --seed 0 --out $(OUT)/tiny-checkpoint --force --quiet
	$(PY) -m personaplex_edge.export.cli onnx --checkpoint $(OUT)/tiny-checkpoint --out $(OUT)/tiny-build --force --quiet
	$(PY) -m personaplex_edge.export.cli inspect --build $(OUT)/tiny-build
	rm -rf $(OUT)/snapshots
	$(PY) -m personaplex_edge.runtime.cli play $(DEMO_INPUT) --build $(OUT)/tiny-build --persona copilot \
		--seed 42 --snapshot-dir $(OUT)/snapshots --out $(OUT)/reply.wav --transcript $(OUT)/transcript.txt
	@echo "reply audio: $(OUT)/reply.wav, transcript: $(OUT)/transcript.txt (random weights: the words are noise)"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(OUT)/site
	$(PY) -m pytest -q

# `serve` on virtual ALSA devices (no sound card), the microphone a spoken file: try `ppx-runtime
# ctl --config $(OUT)/try/runtime.yaml status` from another terminal; Ctrl-C stops it.
try: $(STAMP) $(OUT)/tiny-build/manifest.json
	$(PY) -m personaplex_edge.sim.try_daemon --build $(OUT)/tiny-build --dir $(OUT)/try

$(OUT)/tiny-build/manifest.json: | $(DEMO_STAMP)
	$(PY) -m personaplex_edge.export.cli synth --size tiny --seed 0 --out $(OUT)/tiny-checkpoint --force --quiet
	$(PY) -m personaplex_edge.export.cli onnx --checkpoint $(OUT)/tiny-checkpoint --out $(OUT)/tiny-build --force --quiet

# The docs site (docs/, mkdocs-material) into site/; `make docs SERVE=1` serves it on :8000.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs $(if $(SERVE),serve,build --strict)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_mimi.py
	$(PY) bench/bench_runtime.py
	$(PY) bench/bench_dsp.py
	$(PY) bench/bench_vad.py
	$(PY) bench/bench_aec.py
	$(PY) bench/bench_latency.py
	$(PY) bench/bench_conversation.py

bench-project: $(STAMP)
	$(PY) bench/bench_engines.py --project

# No stamp: the kit makes and fills .venv itself, matched to the driver (no ALSA, no CUDA torch).
SOAK_MINUTES ?= 60

# serve in real time on clocked virtual ALSA devices with faults injected; `make test` runs 3 minutes.
soak: $(STAMP)
	$(PY) tests/soak.py --minutes $(SOAK_MINUTES)

gpu-kit:
	PPX_KIT_FULL=$(FULL) scripts/gpu_kit.sh

clean:
	rm -rf $(OUT) .pytest_cache
