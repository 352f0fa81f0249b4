"""Building one TensorRT engine from one ONNX graph (TensorRT 10 builder API) and describing its I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personaplex_edge.runtime.backends.tensorrt.backend import create, last_error
from personaplex_edge.runtime.backends.tensorrt.cuda_versions import tensorrt_missing
from personaplex_edge.runtime.errors import PpxError

from .engine_plan import EnginePlan
from .progress import note
from .targets import Target

_STATE_ROLES_IN = ("cache", "state_in")
_STATE_ROLES_OUT = ("cache_update", "state_out")
_NP_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8e4m3", "INT4": "int4"}


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise PpxError(tensorrt_missing()) from None
    return trt


def make_builder(trt: Any, logger: Any) -> Any:
    """trt.Builder needs a CUDA GPU (see the backend's `create`)."""
    return create(trt, logger, "builder", trt.Builder,
                  "no CUDA GPU: engines must be built on the target device ({detail})")


def build_one(trt: Any, builder: Any, logger: Any, plan: EnginePlan, target: Target, out: Path,
               cache: Any, cache_bytes: bytes, monitor: Any = None) -> tuple[list[dict[str, Any]], Any]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise PpxError(f"{plan.onnx}: TensorRT cannot parse the graph: {errors or last_error(logger, '?')}")
    config = builder.create_builder_config()
    config.builder_optimization_level = target.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_mb << 20)
    if plan.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # bit-for-bit-ish parity builds: no TF32 GEMMs
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.half_state:
        _half_state_io(trt, network, plan)
    if plan.dynamic_steps is not None:
        config.add_optimization_profile(_steps_profile(builder, network, plan.dynamic_steps))
    elif any(d < 0 for i in range(network.num_inputs) for d in network.get_input(i).shape):
        raise PpxError(f"{plan.onnx}: {plan.key} has dynamic input shapes; only the prefill graph may")
    if cache is None:
        try:
            cache = config.create_timing_cache(cache_bytes)
        except Exception:  # noqa: BLE001 - a corrupt cache file: TensorRT raises its own types
            cache = None
        if cache is None or (not config.set_timing_cache(cache, False) and cache_bytes):
            # A cache from another GPU or TensorRT version: start a fresh one.
            note("engines: the timing cache is from another device or TensorRT; starting afresh")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    else:
        config.set_timing_cache(cache, False)
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        plan_bytes = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    if monitor is not None and monitor.interrupted:
        raise KeyboardInterrupt
    if plan_bytes is None:
        raise PpxError(f"{plan.onnx}: TensorRT could not build {plan.key} "
                       f"({last_error(logger, 'no error logged')})")
    with open(out, "wb") as f:
        f.write(memoryview(plan_bytes))
    io = _network_io(trt, network, plan)
    del plan_bytes, parser, network, config
    return io, cache


def _half_state_io(trt: Any, network: Any, plan: EnginePlan) -> None:
    """FP16 caches and state across calls: half the KV memory and bandwidth. Cache inputs and
    their updates change together, so the runtime's device-side ring copies stay same-typed."""
    roles = plan.roles
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if roles.get(t.name) in _STATE_ROLES_IN and t.dtype == trt.DataType.FLOAT:
            t.dtype = trt.DataType.HALF
    for i in range(network.num_outputs):
        t = network.get_output(i)
        if roles.get(t.name) in _STATE_ROLES_OUT and t.dtype == trt.DataType.FLOAT:
            t.dtype = trt.DataType.HALF


def _steps_profile(builder: Any, network: Any, max_steps: int) -> Any:
    """Every dynamic dimension (the prefill's T) in 1..max_steps, tuned for full chunks."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if any(d < 0 for d in shape):
            lo = tuple(1 if d < 0 else d for d in shape)
            hi = tuple(max_steps if d < 0 else d for d in shape)
            profile.set_shape(t.name, lo, hi, hi)
    return profile


def _network_io(trt: Any, network: Any, plan: EnginePlan) -> list[dict[str, Any]]:
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            entry = {"name": t.name, "mode": mode, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            if plan.dynamic_steps is not None and any(d < 0 for d in entry["shape"]):
                entry["max_steps"] = plan.dynamic_steps
            io.append(entry)
    return io


def dtype_name(dtype: Any) -> str:
    name = str(getattr(dtype, "name", dtype)).split(".")[-1]
    return _NP_NAMES.get(name, name.lower())
