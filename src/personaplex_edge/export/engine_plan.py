"""Planning the engines of a build for a target: per graph its precision and typing mode, refused before any work when it cannot fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personaplex_edge.runtime.core.manifest import GRAPH_KEYS, MANIFEST_NAME, Manifest
from personaplex_edge.runtime.errors import PpxError

from .config import ModelConfig
from .onnx_precision import GraphPrecision, graph_precision
from .roofline import lm_params, resident_bytes
from .targets import NETWORK_GRAPHS, PRECISIONS, Target


@dataclass(frozen=True)
class EnginePlan:
    """How one graph becomes an engine."""

    key: str
    onnx: Path
    precision: str  # what the target asks for
    graph: GraphPrecision  # what the graph carries
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag names for a weakly typed network
    half_state: bool  # weakly typed FP16: caches and state tensors as FP16 engine I/O
    dynamic_steps: int | None  # prefill: T in 1..this
    roles: dict[str, str]  # tensor name -> manifest role


def plan_engines(manifest: Manifest, target: Target, weak_typing: bool = True) -> list[EnginePlan]:
    """One plan per graph, or a one-line refusal when the build does not fit the target."""
    missing = [k for k in GRAPH_KEYS if k not in manifest.graphs]
    if missing:
        raise PpxError(f"{manifest.root}: build lacks graphs {', '.join(missing)}: re-export it")
    context = int(manifest.model["lm"]["context"])
    if context != target.context:
        raise PpxError(f"target {target.name}: context {target.context}, but {manifest.root}'s graphs hold a "
                       f"{context}-step cache: re-export with that context or edit {target.source}")
    recorded = manifest.data.get("quantization", {}).get("networks", {})  # from `ppx-export quantize`
    plans = []
    for key in GRAPH_KEYS:
        info = manifest.graph(key)
        onnx_path = manifest.path(info.file)
        want = target.precision_of_graph(key)
        has = graph_precision(onnx_path)
        if manifest.data.get("dtype") in ("fp32", "fp16", "bf16"):
            # The export's compute dtype (kept by `ppx-export quantize`) is authoritative: an fp16
            # export keeps some small tensors (codebooks, norms) in fp32 on purpose.
            has = GraphPrecision(manifest.data["dtype"], has.quant)
        network = next(n for n, keys in NETWORK_GRAPHS.items() if key in keys)
        if recorded.get(network, "none") != "none" and has.quant:
            has = GraphPrecision(has.float_dtype, recorded[network])  # names int8 vs int8-sq exactly
        strongly, flags, half = typing_mode(key, want, has, weak_typing, manifest.root, target)
        steps = target.prefill_max_steps if key == "temporal_prefill" else None
        roles = {t.name: t.role for t in (*info.inputs, *info.outputs)}
        plans.append(EnginePlan(key, onnx_path, want, has, strongly, flags, half, steps, roles))
    return plans


def check_out_dir(out: Path, force: bool) -> None:
    """The atomic writer's refusal, early: before hashing the build and building engines."""
    if out.exists() and not out.is_dir():
        raise PpxError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PpxError(f"{out}: directory exists and is not empty (use --force to replace it)")


def typing_mode(key: str, want: str, has: GraphPrecision, weak_typing: bool, root: Path,
                 target: Target) -> tuple[bool, tuple[str, ...], bool]:
    """(strongly typed, builder flags, FP16 state I/O) for building `has` at `want`."""
    needs = PRECISIONS[want]
    where = f"target {target.name}: {key} ({root / (key + '.onnx')})"
    if needs.quantized:
        if has.quant != want:
            now = f"quantized {has.quant}" if has.quant else f"unquantized {has.float_dtype}"
            raise PpxError(f"{where} is {now}, the target wants {want}: run `ppx-export quantize "
                           f"--precision {want}` on the build first, or change precision in {target.source}")
        if has.float_dtype == "fp32":
            # Weak typing would only add FP16 around the Q/DQ (kFP8/kINT4 merely enable plugins):
            # quantized graphs are built strongly typed, from an fp16 export.
            raise PpxError(f"{where} is quantized {want} with fp32 compute: quantize an fp16 export "
                           f"instead (`ppx-export onnx --dtype fp16`, then `ppx-export quantize --precision "
                           f"{want}`)")
        return True, (), False  # the graph's types are final
    if has.quant:
        raise PpxError(f"{where} is quantized {has.quant}, the target wants {want}: use the unquantized "
                       f"build or change precision in {target.source}")
    if has.float_dtype == want:
        return True, (), False
    if has.float_dtype == "fp32" and want in ("fp16", "bf16"):
        if not weak_typing:
            raise PpxError(f"{where} is fp32 and this TensorRT builds strongly typed networks only: export "
                           f"with `ppx-export onnx --dtype fp16` for a {want} target")
        return False, (want.upper(),), want == "fp16"
    raise PpxError(f"{where} is {has.float_dtype}, the target wants {want}: re-export with --dtype {want} "
                   f"or change precision in {target.source}")



def check_memory_budget(manifest: Manifest, target: Target) -> None:
    """Refuse engines that cannot fit the target's memory budget at persona-compile peak."""
    lm = ModelConfig.from_dict(manifest.model, where=str(manifest.root / MANIFEST_NAME)).lm
    steps = int(manifest.graph("depformer").meta.get("steps", lm.dep_q))
    params = lm_params(lm, steps)
    lm_bytes = resident_bytes(params, target.precision["temporal"], target.precision["depformer"])
    mimi = 0.0
    for key in ("mimi_encoder", "mimi_decoder"):
        stored = float(manifest.graph(key).meta.get("weight_bytes", 0))
        source_width = 4.0 if manifest.data.get("dtype", "fp32") == "fp32" else 2.0
        mimi += stored * PRECISIONS[target.precision[key]].bytes_per_weight / source_width
    workspace = target.workspace_mb * 2**20
    total = lm_bytes + mimi + workspace
    if total > target.memory_budget_gb * 1e9:
        raise PpxError(f"target {target.name}: the engines need ~{total / 1e9:.1f} GB at persona compile (LM "
                       f"{lm_bytes / 1e9:.1f} GB with step and prefill engines and the KV cache, Mimi "
                       f"{mimi / 1e9:.2f} GB, workspace {workspace / 1e9:.1f} GB), more than memory_budget_gb "
                       f"{target.memory_budget_gb:g}: quantize further or raise the budget in {target.source}")
