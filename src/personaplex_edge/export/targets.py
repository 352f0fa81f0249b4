"""Target profiles: which GPU an engine build is for, and at what precision per network.

A profile is a YAML file in `engines/targets/` (or any path). It names the GPU
(architecture, compute capability, memory, bandwidth), the TensorRT versions it
is built with, the precision of each network, the context and batch the graphs
were exported for, and the builder's settings. `load_target` validates it with
file:line errors and refuses, before any work starts, a profile that asks the
GPU for what it lacks (FP8 on SM 8.7, NVFP4 before Blackwell).

Pure Python: no TensorRT, no GPU. `ppx-export engines` checks the live device
against the profile separately (`check_device`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.yaml_schema import Fields, YamlDoc, load_yaml_with_lines

# engines/targets/ at the repository root (PPX_TARGETS_DIR overrides it).
TARGETS_DIR = Path(os.environ.get("PPX_TARGETS_DIR") or Path(__file__).resolve().parents[3] / "engines" / "targets")

# The networks a profile sets a precision for, and the build graphs each covers.
NETWORK_GRAPHS: dict[str, tuple[str, ...]] = {
    "temporal": ("temporal_step", "temporal_prefill"),
    "depformer": ("depformer",),
    "mimi_encoder": ("mimi_encoder",),
    "mimi_decoder": ("mimi_decoder",),
}


@dataclass(frozen=True)
class PrecisionNeeds:
    """What a precision needs from the GPU and TensorRT, and what it costs per weight."""

    min_sm: tuple[int, int]
    min_tensorrt: tuple[int, int]
    bytes_per_weight: float  # stored weight bytes per parameter, block scales included
    quantized: bool  # needs explicit Q/DQ nodes in the graph (`ppx-export quantize`)
    why: str  # the hardware feature, for the refusal message


# Requirements follow the TensorRT Model Optimizer support matrix (INT8 SmoothQuant and
# W4A16 AWQ: Ampere and later; FP8: Ada and later; FP4: Blackwell) and the TensorRT release
# notes (INT4 weight-only block quantization and FP8 from 10.0, NVFP4 from 10.8).
PRECISIONS: dict[str, PrecisionNeeds] = {
    "fp32": PrecisionNeeds((5, 3), (10, 0), 4.0, False, "FP32"),
    "fp16": PrecisionNeeds((5, 3), (10, 0), 2.0, False, "FP16"),
    "bf16": PrecisionNeeds((8, 0), (10, 0), 2.0, False, "BF16 (Ampere or newer)"),
    "int8": PrecisionNeeds((8, 0), (10, 0), 1.0, True, "INT8 weight-only (Ampere or newer)"),
    "int8-sq": PrecisionNeeds((8, 0), (10, 0), 1.0, True, "INT8 SmoothQuant W8A8 (Ampere or newer)"),
    "fp8": PrecisionNeeds((8, 9), (10, 0), 1.0, True, "FP8 tensor cores (Ada, Hopper, Blackwell)"),
    # INT4 weights + one fp16 scale per 128-weight block.
    "int4-awq": PrecisionNeeds((8, 0), (10, 0), 0.5 + 2 / 128, True, "INT4 weight-only (Ampere or newer)"),
    # FP4 E2M1 weights + one FP8 scale per 16-weight block.
    "nvfp4": PrecisionNeeds((10, 0), (10, 8), 0.5 + 1 / 16, True, "NVFP4 tensor cores (Blackwell)"),
}

# What to suggest instead when the GPU lacks a precision.
_FALLBACK = {"fp8": "int8 or int4-awq", "nvfp4": "fp8 (or int4-awq before Ada)", "bf16": "fp16",
             "int8": "fp16", "int8-sq": "fp16", "int4-awq": "fp16"}

_TOP_FIELDS = {"name", "description", "gpu", "tensorrt", "precision", "context", "batch",
               "prefill_max_steps", "builder", "memory_budget_gb", "frame_target_ms"}
FRAME_MS = 80.0  # one Mimi frame: the most any target can allow the LM and stay real time
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CC = re.compile(r"^(\d{1,2})\.(\d)$")


@dataclass(frozen=True)
class VersionRange:
    """A TensorRT version range such as '>=10.3, <11' (clauses joined by commas)."""

    text: str
    clauses: tuple[tuple[str, tuple[int, ...]], ...]

    def contains(self, version: str) -> bool:
        v = parse_version(version)
        for op, bound in self.clauses:
            a, b = _pad(v, bound)
            ok = {">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b, "==": a[:len(bound)] == bound}[op]
            if not ok:
                return False
        return True

    @property
    def lowest(self) -> tuple[int, ...]:
        """The smallest version the range allows (0 when unbounded below)."""
        lows = [bound for op, bound in self.clauses if op in (">=", "==")]
        lows += [bound[:-1] + (bound[-1] + 1,) for op, bound in self.clauses if op == ">"]
        return max(lows) if lows else (0,)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    source: Path
    arch: str
    compute_capabilities: tuple[str, ...]  # "8.7"; Thor lists "11.0" and "10.1"
    memory_gb: float
    bandwidth_gbps: float
    tensorrt: VersionRange
    precision: dict[str, str]  # network -> precision
    context: int
    batch: int
    prefill_max_steps: int
    optimization_level: int
    workspace_mb: int
    memory_budget_gb: float
    # The LM frame time this device should reach (the projection's "target" column); less than
    # a frame where the rest of the frame (Mimi, host work) needs room on a slower device.
    frame_target_ms: float = FRAME_MS

    def precision_of_graph(self, graph_key: str) -> str:
        for network, graphs in NETWORK_GRAPHS.items():
            if graph_key in graphs:
                return self.precision[network]
        raise KeyError(graph_key)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "arch": self.arch,
                "compute_capability": list(self.compute_capabilities), "memory_gb": self.memory_gb,
                "bandwidth_gbps": self.bandwidth_gbps, "tensorrt": self.tensorrt.text,
                "precision": dict(self.precision), "context": self.context, "batch": self.batch,
                "prefill_max_steps": self.prefill_max_steps,
                "builder": {"optimization_level": self.optimization_level, "workspace_mb": self.workspace_mb},
                "memory_budget_gb": self.memory_budget_gb, "frame_target_ms": self.frame_target_ms}


def list_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(ref: str | Path) -> Target:
    """A target name from engines/targets/ (`agx-orin-64gb`) or a path to a profile YAML."""
    path = Path(ref)
    if path.suffix not in (".yaml", ".yml"):
        path = TARGETS_DIR / f"{ref}.yaml"
        if not path.is_file():
            known = ", ".join(list_targets()) or "none"
            raise ConfigError(f"--target: no target named {str(ref)!r} (targets in {TARGETS_DIR}: {known})")
    return parse_target(path)


def parse_target(path: Path, text: str | None = None) -> Target:
    doc = load_yaml_with_lines(path, text)
    top = Fields(doc, "", doc.data, _TOP_FIELDS)
    name = top.str("name")
    if not _NAME.match(name):
        raise doc.fail("name", "use lowercase letters, digits, '.', '-' or '_' (at most 64)")
    gpu = Fields(doc, "gpu", top.mapping("gpu"), {"arch", "compute_capability", "memory_gb", "bandwidth_gbps"})
    arch = gpu.str("arch")
    ccs = _compute_capabilities(doc, gpu.data.get("compute_capability", ...))
    memory_gb = gpu.number("memory_gb", ..., 1, 4096)
    bandwidth = gpu.number("bandwidth_gbps", ..., 1, 100_000)
    trt_range = _version_range(doc, "tensorrt", top.str("tensorrt"))
    if trt_range.lowest < (10,):
        raise doc.fail("tensorrt", f"{trt_range.text!r} allows TensorRT before 10: the engine builder "
                                   "needs the TensorRT 10 API (write e.g. '>=10.3, <11')")
    prec = Fields(doc, "precision", top.mapping("precision"), set(NETWORK_GRAPHS))
    precision = {net: prec.choice(net, ..., tuple(PRECISIONS)) for net in NETWORK_GRAPHS}
    context = top.integer("context", ..., 1, 1 << 20)
    batch = top.integer("batch", 1, 1, 1 << 10)
    if batch != 1:
        raise doc.fail("batch", f"{batch}: the streaming graphs run one conversation (batch 1)")
    prefill = top.integer("prefill_max_steps", 512, 1, 1 << 20)
    if prefill > context:
        raise doc.fail("prefill_max_steps", f"{prefill} is more than the context ({context})")
    builder = Fields(doc, "builder", top.mapping("builder"), {"optimization_level", "workspace_mb"})
    level = builder.integer("optimization_level", 3, 0, 5)
    workspace = builder.integer("workspace_mb", 2048, 16, 1 << 20)
    budget = top.number("memory_budget_gb", ..., 0.1, 4096)
    if budget > memory_gb:
        raise doc.fail("memory_budget_gb", f"{budget:g} GB is more than the GPU's memory ({memory_gb:g} GB)")
    frame_target = top.number("frame_target_ms", FRAME_MS, 1.0, FRAME_MS)
    target = Target(name, top.str("description", "", allow_empty=True), Path(path), arch, ccs, memory_gb,
                    bandwidth, trt_range, precision, context, batch, prefill, level, workspace, budget,
                    frame_target)
    _check_capabilities(doc, target)
    return target


def _compute_capabilities(doc: YamlDoc, value: Any) -> tuple[str, ...]:
    field = "gpu.compute_capability"
    if value is ...:
        raise doc.fail(field, "required field is missing")
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        text = f"{v:.1f}" if isinstance(v, float) else str(v)
        if not _CC.match(text):
            raise doc.fail(field, f"{v!r} is not a compute capability such as '8.7'")
        out.append(text)
    if not out:
        raise doc.fail(field, "list at least one compute capability")
    return tuple(out)


def _version_range(doc: YamlDoc, field: str, text: str) -> VersionRange:
    clauses = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|>|<)\s*(\d+(?:\.\d+){0,3})\s*", part)
        if not m:
            raise doc.fail(field, f"{text!r} is not a version range such as '>=10.3, <11'")
        clauses.append((m.group(1), parse_version(m.group(2))))
    return VersionRange(text, tuple(clauses))


def _check_capabilities(doc: YamlDoc, target: Target) -> None:
    """Refuse precisions the GPU or the allowed TensorRT versions lack (before any work)."""
    for network, precision in target.precision.items():
        needs = PRECISIONS[precision]
        for cc in target.compute_capabilities:
            if sm_tuple(cc) < needs.min_sm:
                instead = _FALLBACK.get(precision, "fp16")
                raise doc.fail(f"precision.{network}",
                               f"{precision} needs {needs.why}, SM {needs.min_sm[0]}.{needs.min_sm[1]} or "
                               f"newer; target {target.name} is SM {cc} ({target.arch}): use {instead}")
        if target.tensorrt.lowest < needs.min_tensorrt:
            need = ".".join(map(str, needs.min_tensorrt))
            raise doc.fail(f"precision.{network}",
                           f"{precision} needs TensorRT >= {need}, but tensorrt {target.tensorrt.text!r} "
                           f"allows older versions: raise it to '>={need}'")


def check_device(target: Target, compute_capability: str, gpu_name: str, tensorrt_version: str) -> None:
    """Refuse to build for `target` on a GPU or TensorRT it does not describe."""
    if compute_capability not in target.compute_capabilities:
        raise PpxError(f"target {target.name} is for SM {'/'.join(target.compute_capabilities)} "
                       f"({target.arch}), this GPU is {gpu_name} (SM {compute_capability}): pick the target "
                       f"for this device (targets: {', '.join(list_targets())})")
    if not target.tensorrt.contains(tensorrt_version):
        raise PpxError(f"target {target.name} needs TensorRT {target.tensorrt.text}, this is TensorRT "
                       f"{tensorrt_version}: install a matching TensorRT or edit {target.source}")
    for network, precision in target.precision.items():
        needs = PRECISIONS[precision]
        if parse_version(tensorrt_version)[:2] < needs.min_tensorrt:
            raise PpxError(f"target {target.name}: precision.{network}: {precision} needs TensorRT >= "
                           f"{'.'.join(map(str, needs.min_tensorrt))}, this is {tensorrt_version}")


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric tails ('10.7.0.post1') are dropped."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def sm_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _pad(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
