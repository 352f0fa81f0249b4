"""The interface every backend implements: a build's networks with their streaming state inside.

A *network* is one streaming model (Mimi encoder, Mimi decoder, temporal
transformer, depformer). It may have several graphs that share one state -
the temporal transformer's one-step and batched-prefill graphs share the KV
cache. Callers pass per-call inputs (audio, tokens, sampling settings, noise)
and get per-call outputs back; conv tails, KV caches and positions never leave
the backend except through `snapshot()` / `restore()`.

The core owns this contract; `backends.ort` (ONNX Runtime) and `backends.tensorrt` (TensorRT
engines) implement it, and `backends.registry` picks one by name. Everything above it is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from personaplex_edge.runtime.core.manifest import Manifest

# Networks of a build: network -> the graphs (manifest keys) that share its state.
NETWORKS: dict[str, tuple[str, ...]] = {
    "mimi_encoder": ("mimi_encoder",),
    "mimi_decoder": ("mimi_decoder",),
    "temporal": ("temporal_step", "temporal_prefill"),
    "depformer": ("depformer",),
}


def network_precisions(manifest: Manifest) -> dict[str, str]:
    """Each network's precision as the build records it: an engines build's `engines.precision`
    (what TensorRT was asked for), a quantized build's `quantization.networks`, else (and for
    "none") the build's dtype: an int4-awq build's Mimi stays fp16."""
    base = str(manifest.data.get("dtype", "fp32"))
    engines = (manifest.data.get("engines") or {}).get("precision") or {}
    quantized = (manifest.data.get("quantization") or {}).get("networks") or {}
    out = {}
    for net in NETWORKS:
        value = engines.get(net) or quantized.get(net) or "none"
        out[net] = base if value == "none" else str(value)
    return out


class Network(Protocol):
    """One streaming network with its state resident in the backend."""

    name: str
    run_ms: float  # time spent in the inference engine during the last run()

    @property
    def offset(self) -> int:
        """Position of the next call's first step (0 after reset)."""
        ...

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one call of `graph`; state and caches advance; returns the per-call outputs."""
        ...

    def reset(self) -> None:
        """State back to its initial value, offset 0."""
        ...

    def snapshot(self, slots: int | None = None) -> dict[str, np.ndarray]:
        """A host copy of the state (KV caches, conv tails) plus `__offset__`; with `slots`,
        ring caches keep only their first `slots` slots."""
        ...

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a state produced by `snapshot()` of the same build (caches may be partial)."""
        ...


class Backend(Protocol):
    name: str

    def open(self, manifest: Manifest, network: str) -> Network:
        ...
