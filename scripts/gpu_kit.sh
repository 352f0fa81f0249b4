#!/usr/bin/env bash
# PersonaPlex Edge GPU kit: run on a machine with an NVIDIA GPU (a workstation, or the Jetson itself).
#
#  1. reads the driver's CUDA version and installs into .venv what the TensorRT path needs, matched
#     to it: a CPU torch (the kit needs no CUDA from torch), the project, and pyproject's extra for
#     that CUDA major - tensorrt-cu12 or tensorrt-cu13 (TensorRT wheels and cuda-python of one
#     major) on a workstation; on a Jetson JetPack's own TensorRT (the venv is made with
#     --system-site-packages) and jetpack6 / jetpack7 (cuda-python of JetPack's CUDA),
#  2. tiny synthetic checkpoint -> fp32 and fp16 ONNX builds -> fp32 engines (the parity
#     reference) and strongly typed fp16 engines, built once with one timing cache -> the GPU
#     tests (tests/gpu) on those same engines -> fp16 parity and benchmark,
#  3. optionally (--full, or PPX_KIT_FULL=1) the full-size synthetic checkpoint (PersonaPlex-7B
#     shapes, random weights): FP16 ONNX build -> engines at PPX_KIT_PRECISION (default fp16;
#     int8 / fp8 / int4-awq quantize the fp16 build first with `ppx-export quantize`) -> parity
#     against ONNX Runtime for a few steps -> per-network and LM-step benchmark with achieved GB/s.
#
# Every stage prints its time; the tiny part (2.) fits in 10 minutes on one datacenter GPU.
# A mismatch (driver against cuda-python or TensorRT, no libcuda, no package index) stops the kit
# with one line naming both sides and the fix, before anything is installed.
#
# Disk (the full run): checkpoint 16.7 GB, FP16 ONNX build ~16.6 GB, FP16 engines ~29 GB. The
# checkpoint and the ONNX build are deleted once used (unless --keep): peak ~46 GB; the kit checks
# for 50 GB free first (64 GB with --keep).
#
# No package index on the GPU machine: fill a wheel folder on a connected machine of the same CPU
# architecture and Python version, copy it over, and point the kit at it:
#   scripts/gpu_kit.sh --fetch-wheels DIR --extra tensorrt-cu12      # or tensorrt-cu13, jetpack6, jetpack7
#   PPX_KIT_WHEELS=DIR scripts/gpu_kit.sh                             # on the GPU machine
# (Jetson: add --cuda-python 'cuda-python==12.6.*', JetPack's CUDA.) PyPI's tensorrt-cu12/-cu13
# only fetch their wheels from NVIDIA's index; where PyPI answers but that index does not,
# PPX_KIT_TENSORRT=DIR takes TensorRT and cuda-python alone from such a folder.
#
# Usage: scripts/gpu_kit.sh [--full] [--keep] [--frames N] [--out DIR] [--no-install] [--check]
#        scripts/gpu_kit.sh --fetch-wheels DIR [--extra EXTRA] [--cuda-python REQUIREMENT]
# --check: the GPU, driver and package sources only; installs and builds nothing.
# Environment: PPX_KIT_FULL=1, PPX_KIT_PRECISION=fp16|int8|fp8|int4-awq, PPX_KIT_OUT, PPX_KIT_FRAMES,
#              PPX_KIT_WHEELS=DIR, PPX_KIT_TENSORRT=DIR, PPX_KIT_NVIDIA_INDEX (https://pypi.nvidia.com),
#              PPX_KIT_TORCH_INDEX (https://download.pytorch.org/whl/cpu), TORCH (the CPU torch, default torch)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FULL="${PPX_KIT_FULL:-0}"
KEEP=0
INSTALL=1
CHECK=0
FETCH=""
FETCH_EXTRA="tensorrt-cu12"
FETCH_CUDA_PYTHON=""
FRAMES="${PPX_KIT_FRAMES:-200}"
OUT="${PPX_KIT_OUT:-$ROOT/out/gpu-kit}"
PRECISION="${PPX_KIT_PRECISION:-fp16}"
WHEELS="${PPX_KIT_WHEELS:-}"
TRT_WHEELS="${PPX_KIT_TENSORRT:-$WHEELS}"
NV_INDEX="${PPX_KIT_NVIDIA_INDEX:-https://pypi.nvidia.com}"
CPU_TORCH_INDEX="${PPX_KIT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"  # or a mirror of it
SYS_PY="${PYTHON:-python3}"
PY="$ROOT/.venv/bin/python"
while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --keep) KEEP=1 ;;
    --no-install) INSTALL=0 ;;
    --check) CHECK=1 ;;
    --frames) FRAMES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --fetch-wheels) FETCH="$2"; shift ;;
    --extra) FETCH_EXTRA="$2"; shift ;;
    --cuda-python) FETCH_CUDA_PYTHON="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_kit: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_kit: %s\n' "$*" >&2; exit 1; }
free_gb() { df -P -B1G "$1" | awk 'NR==2 {print $4}'; }
reachable() {  # reachable URL: silent when a server answers, else why not (one line, exit 1)
  "$SYS_PY" - "$1" <<'PYEOF'
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=15).close()
except urllib.error.HTTPError as exc:  # an answer; only a server error counts as down
    if exc.code >= 500:
        sys.exit(print(f"HTTP {exc.code}") or 1)
except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, TLS: say which
    reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    sys.exit(print(reason.splitlines()[0]) or 1)
PYEOF
}

# -- a wheel folder for an offline GPU machine (run where there is an index) --------------------
if [ -n "$FETCH" ]; then
  case "$FETCH_EXTRA" in
    tensorrt-cu12|tensorrt-cu13) NV=(--extra-index-url "$NV_INDEX") ;;
    jetpack6|jetpack7) NV=() ;;
    *) die "--extra $FETCH_EXTRA: one of tensorrt-cu12, tensorrt-cu13, jetpack6, jetpack7" ;;
  esac
  "$SYS_PY" -m pip --version >/dev/null 2>&1 || die "$SYS_PY has no pip: install python3-pip, or run this from a venv"
  mkdir -p "$FETCH"
  log "CPU torch, the build backend, and .[export,onnx,dev,$FETCH_EXTRA] as wheels into $FETCH"
  TMP_TORCH="$(mktemp -d)"
  "$SYS_PY" -m pip download --quiet --no-deps -d "$TMP_TORCH" --index-url "$CPU_TORCH_INDEX" "${TORCH:-torch}"
  TORCH_WHL="$(ls "$TMP_TORCH"/torch-*.whl)"
  mv "$TORCH_WHL" "$FETCH/" && rm -rf "$TMP_TORCH"
  "$SYS_PY" -m pip wheel --quiet -w "$FETCH" setuptools
  # The CPU torch file itself as a requirement: a bare `torch` would resolve to PyPI's newer
  # CUDA build, with a CUDA toolkit and cuda-bindings of its own major.
  "$SYS_PY" -m pip wheel --quiet -w "$FETCH" "${NV[@]}" "$FETCH/$(basename "$TORCH_WHL")" \
    ".[export,onnx,dev,$FETCH_EXTRA]" ${FETCH_CUDA_PYTHON:+"$FETCH_CUDA_PYTHON"}
  rm -f "$FETCH"/personaplex_edge-*.whl  # the kit installs the checkout itself (editable)
  log "done: copy $FETCH to the GPU machine and run PPX_KIT_WHEELS=DIR scripts/gpu_kit.sh there"
  exit 0
fi

# -- the GPU and its driver ------------------------------------------------------------------
JETSON=0
if [ -f /etc/nv_tegra_release ]; then
  JETSON=1
  log "Jetson: $(tr -d '\0' < /proc/device-tree/model 2>/dev/null || echo unknown), $(head -n1 /etc/nv_tegra_release)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  log "GPU: $(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | head -n1)"
else
  die "no NVIDIA GPU here (no nvidia-smi, not a Jetson): the GPU kit needs one"
fi
driver_cuda() {  # the CUDA version the driver supports, as 12040 (nvidia-smi's, else libcuda's)
  local v
  v="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)"
  if [ -n "$v" ]; then set -- $v; echo $(($1 * 1000 + $2 * 10)); return; fi
  "$SYS_PY" -c 'import ctypes
try:
    v = ctypes.c_int(0)
    ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
    print(v.value or "")
except (OSError, AttributeError):
    print("")'
}
DRIVER="$(driver_cuda)"
[ -n "$DRIVER" ] || die "no CUDA driver: libcuda.so.1 cannot be loaded (in a container, start it with the NVIDIA runtime: \`--runtime nvidia\` on a Jetson, \`--gpus all\` elsewhere)"
MAJOR=$((DRIVER / 1000))
CUDA="$MAJOR.$((DRIVER % 1000 / 10))"
case "$MAJOR:$JETSON" in
  12:0|13:0) EXTRA="tensorrt-cu$MAJOR" ;;
  12:1) EXTRA=jetpack6 ;;
  13:1) EXTRA=jetpack7 ;;
  *) die "the driver supports CUDA $CUDA, and TensorRT 10 and cuda-python here need CUDA 12 or 13: update the driver to 525 or newer" ;;
esac
echo "   CUDA $CUDA driver: pip extra $EXTRA$([ "$JETSON" = 1 ] && echo " with JetPack's TensorRT")"

# -- where the packages come from: checked before anything is installed ---------------------------
has_cpu_torch() { [ -x "$PY" ] && [ "$("$PY" -c 'import torch; print(torch.version.cuda or "cpu")' 2>/dev/null)" = cpu ]; }
needs_tensorrt() {  # a workstation whose .venv lacks TensorRT for this driver
  [ "$JETSON" = 0 ] || return 1
  local plan
  plan="$("$PY" -m personaplex_edge.runtime.backends.tensorrt.kit plan 2>/dev/null)" || return 0  # no venv yet
  grep -q '^install tensorrt' <<< "$plan"
}
if [ "$INSTALL" = 1 ]; then
  if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    die "PPX_KIT_WHEELS=$WHEELS is not a folder: fill one with scripts/gpu_kit.sh --fetch-wheels DIR --extra $EXTRA on a connected machine"
  fi
  if [ -z "$WHEELS" ] && ! has_cpu_torch && ! why="$(reachable "$CPU_TORCH_INDEX/torch/")"; then
    die "PyTorch's CPU wheel index $CPU_TORCH_INDEX is not reachable ($why): on a machine without an index set PPX_KIT_WHEELS=DIR (scripts/gpu_kit.sh --fetch-wheels DIR --extra $EXTRA on a connected machine)"
  fi
  if needs_tensorrt; then
    if [ -n "$TRT_WHEELS" ]; then
      compgen -G "$TRT_WHEELS/tensorrt_cu${MAJOR}_libs-*.whl" >/dev/null || \
        die "$TRT_WHEELS holds no tensorrt_cu${MAJOR}_libs wheel for this CUDA $CUDA driver: fill it with scripts/gpu_kit.sh --fetch-wheels DIR --extra $EXTRA on a connected machine"
      TRT_SOURCE="TensorRT wheels from $TRT_WHEELS"
    elif why="$(reachable "$NV_INDEX/tensorrt-cu${MAJOR}-libs/")"; then
      TRT_SOURCE="TensorRT from $NV_INDEX"
    else
      die "NVIDIA's package index $NV_INDEX is not reachable ($why), and PyPI's tensorrt-cu${MAJOR} only fetches its wheels from there: set PPX_KIT_TENSORRT=DIR to a wheel folder (scripts/gpu_kit.sh --fetch-wheels DIR --extra $EXTRA on a connected machine), or on a Jetson use JetPack's TensorRT"
    fi
    echo "   $TRT_SOURCE"
  fi
fi
if [ "$CHECK" = 1 ]; then
  echo "gpu_kit: ready (CUDA $CUDA driver, extra $EXTRA): nothing installed or built (--check)"
  exit 0
fi

# -- stages, each timed -----------------------------------------------------------------------
STAGE=""
STAGE_T0=$SECONDS
TIMES=""
stage() {  # stage NAME: end the running stage (print its time) and start NAME
  if [ -n "$STAGE" ]; then
    local took=$((SECONDS - STAGE_T0))
    TIMES+="$(printf '%6d s  %s' "$took" "$STAGE")"$'\n'
    printf '   (%d s)\n' "$took"
  fi
  STAGE="$1"
  STAGE_T0=$SECONDS
  if [ -n "$1" ]; then log "$1"; fi
}
times_report() {
  stage ""
  if [ -n "$TIMES" ]; then printf '\n== time per stage\n%s' "$TIMES"; fi
}
trap times_report EXIT
mkdir -p "$OUT"
PIP_LOG="$OUT/pip.log"
pipq() { "$PY" -m pip --disable-pip-version-check "$@" >>"$PIP_LOG" 2>&1; }
installed() { "$PY" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' | sort; }

if [ "$INSTALL" = 1 ]; then
  stage "install: .venv with a CPU torch and the project (pip log: $PIP_LOG)"
  SRC=()
  [ -n "$WHEELS" ] && SRC=(--no-index --find-links "$WHEELS")
  if [ ! -x "$PY" ]; then
    if [ "$JETSON" = 1 ]; then  # JetPack's tensorrt lives in the system site-packages
      "$SYS_PY" -m venv --system-site-packages .venv || die "$SYS_PY -m venv failed: sudo apt-get install python3-venv"
    else
      "$SYS_PY" -m venv .venv || die "$SYS_PY -m venv failed: sudo apt-get install python3-venv"
    fi
  fi
  STAMP="$ROOT/.venv/.gpu-kit"  # written only once the base install is complete
  WANT="$(sha256sum pyproject.toml | cut -c1-16) ${TORCH:-torch}"
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    rm -f "$STAMP"
    if ! has_cpu_torch; then
      # A CUDA torch (from PyPI) would pull a CUDA toolkit and cuda-bindings of its own major.
      REPLACE=()
      "$PY" -c "import torch" 2>/dev/null && REPLACE=(--force-reinstall --no-deps)
      if [ -n "$WHEELS" ]; then
        pipq install "${SRC[@]}" "${REPLACE[@]}" "${TORCH:-torch}" || die "pip found no CPU torch in $WHEELS (log: $PIP_LOG)"
      else
        pipq install --index-url "$CPU_TORCH_INDEX" "${REPLACE[@]}" "${TORCH:-torch}" || \
          die "pip could not install a CPU torch from $CPU_TORCH_INDEX (log: $PIP_LOG)"
      fi
    fi
    pipq install "${SRC[@]}" -e ".[export,onnx,dev]" || \
      die "pip could not install .[export,onnx,dev] (log: $PIP_LOG)$([ -z "$WHEELS" ] && echo '; without an index set PPX_KIT_WHEELS=DIR')"
    echo "$WANT" > "$STAMP"
  fi

  stage "install: TensorRT and cuda-python for the CUDA $CUDA driver"
  PLAN="$("$PY" -m personaplex_edge.runtime.backends.tensorrt.kit plan)" || exit 1  # it said why
  REMOVE=()
  REQS=()
  while read -r verb rest; do
    case "$verb" in
      remove) read -r -a REMOVE <<< "$rest" ;;
      install) REQS+=("$rest") ;;
    esac
  done <<< "$PLAN"
  if [ "${#REQS[@]}" -gt 0 ]; then
    echo "   ${REQS[*]}"
    TSRC=()
    if [ -n "$TRT_WHEELS" ]; then TSRC=(--no-index --find-links "$TRT_WHEELS")
    elif [ "$JETSON" = 0 ]; then TSRC=(--extra-index-url "$NV_INDEX"); fi
    # Never half-installed: every wheel is fetched (and PyPI's stubs built) first, then
    # installed from that folder alone; a failed install takes back what it added.
    STAGED="$(mktemp -d)"
    if ! pipq wheel -w "$STAGED" "${TSRC[@]}" "${REQS[@]}"; then
      if [ -n "$TRT_WHEELS" ]; then
        die "$TRT_WHEELS lacks wheels for ${REQS[*]} (log: $PIP_LOG): nothing was installed; fill it with scripts/gpu_kit.sh --fetch-wheels DIR --extra $EXTRA"
      fi
      die "could not fetch ${REQS[*]} (log: $PIP_LOG): nothing was installed; offline, set PPX_KIT_TENSORRT=DIR"
    fi
    BEFORE="$(installed)"
    if [ "${#REMOVE[@]}" -gt 0 ]; then pipq uninstall -y "${REMOVE[@]}" || true; fi
    if ! pipq install --no-index --find-links "$STAGED" "${REQS[@]}"; then
      ADDED="$(comm -13 <(echo "$BEFORE") <(installed))"
      [ -z "$ADDED" ] || pipq uninstall -y $ADDED || true
      die "pip could not install ${REQS[*]} (log: $PIP_LOG); what it had added is removed again"
    fi
    rm -rf "$STAGED"
  fi
fi
"$PY" -m personaplex_edge.runtime.backends.tensorrt.kit verify || exit 1  # one line either way

export_cli() { "$PY" -m personaplex_edge.export.cli "$@"; }
engines() {  # engines BUILD TARGET OUT [BUILD TARGET OUT ...]: ppx-export engines, one process
  "$PY" - "$@" <<'PYEOF'
import sys
import time
from pathlib import Path

from personaplex_edge.export.engines import build_engines
from personaplex_edge.runtime.errors import PpxError

args = sys.argv[1:]
try:
    for build, target, out in zip(args[0::3], args[1::3], args[2::3]):
        t0 = time.monotonic()
        build_engines(Path(build), Path(target), Path(out), force=True,
                      timing_cache=Path(out).parent / "timing.cache")
        print(f"   {Path(out).name}: {time.monotonic() - t0:.0f} s")
except PpxError as exc:
    sys.exit(f"ppx-export engines: error: {exc}")
PYEOF
}

# -- tiny ----------------------------------------------------------------------------------------
stage "tiny synthetic checkpoint -> fp32 and fp16 ONNX builds"
export_cli synth --size tiny --seed 0 --out "$OUT/tiny-ckpt" --force --quiet
export_cli onnx --checkpoint "$OUT/tiny-ckpt" --out "$OUT/tiny-build" --prefill-steps 64 --force --quiet
export_cli onnx --checkpoint "$OUT/tiny-ckpt" --out "$OUT/tiny-build-fp16" --dtype fp16 --prefill-steps 64 \
  --force --quiet

stage "tiny engines: fp32 (the parity reference) and strongly typed fp16, one timing cache"
for p in fp32 fp16; do
  "$PY" bench/bench_engines.py --write-target "$OUT/tiny-$p.yaml" --precision "$p" --target-name "kit-tiny-$p" \
    --prefill-max-steps 64 --optimization-level 2 >/dev/null
done
engines "$OUT/tiny-build" "$OUT/tiny-fp32.yaml" "$OUT/tiny-engines-fp32" \
  "$OUT/tiny-build-fp16" "$OUT/tiny-fp16.yaml" "$OUT/tiny-engines-fp16"

stage "GPU tests (tests/gpu) on those engines"
PPX_GPU_KIT_OUT="$OUT" "$PY" -m pytest -q -rs tests/gpu

stage "tiny fp16 engines: parity against ONNX Runtime and benchmark"
"$PY" bench/bench_engines.py --engines "$OUT/tiny-engines-fp16" --parity "$OUT/tiny-build-fp16" --frames "$FRAMES" \
  --json "$OUT/tiny-bench.json"

# -- full size (optional) --------------------------------------------------------------------------
if [ "$FULL" = 1 ]; then
  need=50
  [ "$KEEP" = 1 ] && need=64
  have="$(free_gb "$OUT")"
  [ "$have" -ge "$need" ] || die "the full-size run needs ${need} GB free under $OUT, there are ${have} GB (--keep needs more)"
  stage "full-size synthetic checkpoint (~16.7 GB) -> FP16 ONNX build"
  export_cli synth --size full --seed 0 --out "$OUT/full-ckpt" --force --quiet
  export_cli onnx --checkpoint "$OUT/full-ckpt" --out "$OUT/full-build" --dtype fp16 --force --quiet
  [ "$KEEP" = 1 ] || rm -rf "$OUT/full-ckpt"
  BUILD="$OUT/full-build"
  if [ "$PRECISION" != fp16 ]; then
    stage "quantizing the fp16 build's LM to $PRECISION (strongly typed Q/DQ)"
    export_cli quantize --build "$BUILD" --precision "$PRECISION" --out "$OUT/full-$PRECISION" --force
    [ "$KEEP" = 1 ] || rm -rf "$OUT/full-build"
    BUILD="$OUT/full-$PRECISION"
  fi
  stage "full-size engines ($PRECISION LM, FP16 Mimi)"
  "$PY" bench/bench_engines.py --write-target "$OUT/full.yaml" --precision "$PRECISION" --mimi-precision fp16 \
    --target-name "kit-full-$PRECISION" >/dev/null
  engines "$BUILD" "$OUT/full.yaml" "$OUT/full-engines"
  PARITY=()
  [ -d "$BUILD" ] && PARITY=(--parity "$BUILD" --parity-steps 3 --parity-frames 4)
  stage "full-size parity against ONNX Runtime (CPU, a few steps) and benchmark"
  "$PY" bench/bench_engines.py --engines "$OUT/full-engines" "${PARITY[@]}" --frames "$FRAMES" \
    --json "$OUT/full-bench.json"
  [ "$KEEP" = 1 ] || rm -rf "$BUILD"
fi
stage ""
log "done: results in $OUT (*-bench.json)"
