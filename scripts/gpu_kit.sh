#!/usr/bin/env bash
# PersonaPlex Edge GPU kit: run on a machine with an NVIDIA GPU (a workstation, or the Jetson itself).
#
#  1. installs what the TensorRT path needs into .venv (tensorrt, cuda-python; on a Jetson the
#     venv sees JetPack's own TensorRT through --system-site-packages),
#  2. tiny synthetic checkpoint -> ONNX build -> the GPU tests (tests/gpu: FP32 engines equal ONNX
#     Runtime through the backend interface, refusals, CUDA graph replay) -> FP16 engines, parity
#     and benchmark,
#  3. optionally (--full, or PPX_KIT_FULL=1) the full-size synthetic checkpoint (PersonaPlex-7B
#     shapes, random weights): FP16 ONNX build -> engines at PPX_KIT_PRECISION (default fp16;
#     int8 / fp8 / int4-awq quantize the build first with `ppx-export quantize`) -> parity against
#     ONNX Runtime for a few steps -> per-network and LM-step benchmark with achieved GB/s vs peak.
#
# Disk (the full run): checkpoint 16.7 GB, FP16 ONNX build ~16.6 GB, FP16 engines ~29 GB (the
# temporal step and prefill engines hold the same weights). The checkpoint is deleted once exported
# and the ONNX build once the engines are built (unless --keep), so the peak is ~46 GB; the kit
# checks for 50 GB free first (64 GB with --keep).
#
# Usage: scripts/gpu_kit.sh [--full] [--keep] [--frames N] [--out DIR] [--no-install]
# Environment: PPX_KIT_FULL=1, PPX_KIT_PRECISION=fp16|int8|fp8|int4-awq, PPX_KIT_OUT, PPX_KIT_FRAMES,
#              PPX_KIT_TENSORRT (pip requirement, default tensorrt-cuXX>=10.3,<11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FULL="${PPX_KIT_FULL:-0}"
KEEP=0
INSTALL=1
FRAMES="${PPX_KIT_FRAMES:-200}"
OUT="${PPX_KIT_OUT:-$ROOT/out/gpu-kit}"
PRECISION="${PPX_KIT_PRECISION:-fp16}"
while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --keep) KEEP=1 ;;
    --no-install) INSTALL=0 ;;
    --frames) FRAMES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_kit: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_kit: %s\n' "$*" >&2; exit 1; }
free_gb() { df -P -B1G "$1" | awk 'NR==2 {print $4}'; }

# -- the GPU ---------------------------------------------------------------------------------
JETSON=0
if [ -f /etc/nv_tegra_release ]; then
  JETSON=1
  log "Jetson: $(tr -d '\0' < /proc/device-tree/model 2>/dev/null || echo unknown), $(head -n1 /etc/nv_tegra_release)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  log "GPU: $(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | head -n1)"
else
  die "no NVIDIA GPU here (no nvidia-smi, not a Jetson): the GPU kit needs one"
fi

# -- environment -------------------------------------------------------------------------------
cuda_major() {  # the CUDA major version of the driver (dGPU) or of JetPack's toolkit
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi | grep -q "CUDA Version"; then
    nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    /usr/local/cuda/bin/nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p' | head -n1
  elif grep -q "^# R38" /etc/nv_tegra_release 2>/dev/null; then
    echo 13  # JetPack 7
  else
    echo 12
  fi
}
PY="$ROOT/.venv/bin/python"
if [ "$INSTALL" = 1 ]; then
  CUDA_MAJOR="$(cuda_major)"
  CUDA_MAJOR="${CUDA_MAJOR:-12}"
  if [ ! -x "$PY" ]; then
    log "creating .venv"
    if [ "$JETSON" = 1 ]; then
      python3 -m venv --system-site-packages .venv  # JetPack's tensorrt lives in the system site-packages
    else
      python3 -m venv .venv
    fi
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet "${TORCH:-torch}"
    "$PY" -m pip install --quiet -e ".[export,onnx,dev]"
  fi
  if ! "$PY" -c "import tensorrt" 2>/dev/null; then
    [ "$JETSON" = 1 ] && die "tensorrt is not importable: install JetPack's python3-libnvinfer (apt) and make .venv with --system-site-packages"
    log "installing TensorRT for CUDA ${CUDA_MAJOR}"
    "$PY" -m pip install --quiet --extra-index-url https://pypi.nvidia.com \
      "${PPX_KIT_TENSORRT:-tensorrt-cu${CUDA_MAJOR}>=10.3,<11}"
  fi
  if ! "$PY" -c "from cuda.bindings import runtime" 2>/dev/null && ! "$PY" -c "from cuda import cudart" 2>/dev/null; then
    log "installing cuda-python ${CUDA_MAJOR}.x"
    "$PY" -m pip install --quiet "cuda-python>=${CUDA_MAJOR}.0,<$((CUDA_MAJOR + 1))"
  fi
fi
"$PY" -c "import tensorrt, sys; print('tensorrt', tensorrt.__version__, 'python', sys.version.split()[0])"
export_cli() { "$PY" -m personaplex_edge.export.cli "$@"; }
engines() {  # engines BUILD TARGET OUT: ppx-export engines, through the library call
  "$PY" - "$@" <<'PYEOF'
import sys
from pathlib import Path
from personaplex_edge.export.engines import build_engines
from personaplex_edge.runtime.errors import PpxError
try:
    build_engines(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), force=True,
                  timing_cache=Path(sys.argv[3]).parent / "timing.cache")
except PpxError as exc:
    sys.exit(f"ppx-export engines: error: {exc}")
PYEOF
}
mkdir -p "$OUT"

# -- tiny ----------------------------------------------------------------------------------------
log "tiny synthetic checkpoint -> ONNX build"
export_cli synth --size tiny --seed 0 --out "$OUT/tiny-ckpt" --force --quiet
export_cli onnx --checkpoint "$OUT/tiny-ckpt" --out "$OUT/tiny-build" --prefill-steps 64 --force --quiet

log "GPU tests (tests/gpu)"
"$PY" -m pytest -q -rs tests/gpu

log "tiny FP16 build -> strongly typed FP16 engines: parity and benchmark"
export_cli onnx --checkpoint "$OUT/tiny-ckpt" --out "$OUT/tiny-build-fp16" --dtype fp16 --prefill-steps 64 --force --quiet
"$PY" bench/bench_engines.py --write-target "$OUT/tiny-fp16.yaml" --precision fp16 --target-name kit-tiny-fp16 \
  --prefill-max-steps 64
engines "$OUT/tiny-build-fp16" "$OUT/tiny-fp16.yaml" "$OUT/tiny-engines"
"$PY" bench/bench_engines.py --engines "$OUT/tiny-engines" --parity "$OUT/tiny-build-fp16" --frames "$FRAMES" \
  --json "$OUT/tiny-bench.json"

# -- full size (optional) --------------------------------------------------------------------------
if [ "$FULL" = 1 ]; then
  need=50
  [ "$KEEP" = 1 ] && need=64
  have="$(free_gb "$OUT")"
  [ "$have" -ge "$need" ] || die "the full-size run needs ${need} GB free under $OUT, there are ${have} GB (--keep needs more)"
  log "full-size synthetic checkpoint (~16.7 GB) -> FP16 ONNX build"
  export_cli synth --size full --seed 0 --out "$OUT/full-ckpt" --force --quiet
  export_cli onnx --checkpoint "$OUT/full-ckpt" --out "$OUT/full-build" --dtype fp16 --force --quiet
  [ "$KEEP" = 1 ] || rm -rf "$OUT/full-ckpt"
  BUILD="$OUT/full-build"
  if [ "$PRECISION" != fp16 ]; then
    log "quantizing the LM to $PRECISION"
    export_cli quantize --build "$BUILD" --precision "$PRECISION" --out "$OUT/full-$PRECISION" --force
    [ "$KEEP" = 1 ] || rm -rf "$OUT/full-build"
    BUILD="$OUT/full-$PRECISION"
  fi
  "$PY" bench/bench_engines.py --write-target "$OUT/full.yaml" --precision "$PRECISION" --mimi-precision fp16 \
    --target-name "kit-full-$PRECISION"
  log "full-size engines ($PRECISION LM, FP16 Mimi)"
  engines "$BUILD" "$OUT/full.yaml" "$OUT/full-engines"
  PARITY=()
  [ -d "$BUILD" ] && PARITY=(--parity "$BUILD" --parity-steps 3 --parity-frames 4)
  log "full-size parity against ONNX Runtime (CPU, a few steps) and benchmark"
  "$PY" bench/bench_engines.py --engines "$OUT/full-engines" "${PARITY[@]}" --frames "$FRAMES" \
    --json "$OUT/full-bench.json"
  [ "$KEEP" = 1 ] || rm -rf "$BUILD"
fi
log "done: results in $OUT (*-bench.json)"
