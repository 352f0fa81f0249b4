"""The backend interface: run a build's graphs with their streaming state kept inside.

A *network* is one streaming model (Mimi encoder, Mimi decoder, temporal
transformer, depformer). It may have several graphs that share one state -
the temporal transformer's one-step and batched-prefill graphs share the KV
cache. Callers pass per-call inputs (audio, tokens, sampling settings, noise)
and get per-call outputs back; conv tails, KV caches and positions never leave
the backend except through `snapshot()` / `restore()`.

Two backends implement it: ONNX Runtime (`backends.ort`: CPU here, CUDA or
TensorRT execution providers on a device) and TensorRT (`backends.tensorrt`:
engines from `ppx-export engines`). `backends.registry` picks one by name;
everything above this interface is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from personaplex_edge.runtime.core.manifest import GraphInfo, Manifest

# Networks of a build: network -> the graphs (manifest keys) that share its state.
NETWORKS: dict[str, tuple[str, ...]] = {
    "mimi_encoder": ("mimi_encoder",),
    "mimi_decoder": ("mimi_decoder",),
    "temporal": ("temporal_step", "temporal_prefill"),
    "depformer": ("depformer",),
}


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


def initial_value(spec_shape: tuple[int | str, ...], dtype: str, init: float | bool | None) -> np.ndarray:
    """The value a state/cache input holds before the first call (manifest `init`, else zeros)."""
    shape = tuple(int(d) for d in spec_shape)
    if init is None:
        return np.zeros(shape, dtype=dtype)
    return np.full(shape, init, dtype=dtype)


def ring_slots(offset: int, steps: int, capacity: int) -> slice | np.ndarray:
    """Slots a call's `steps` new entries go to: a slice when they do not wrap."""
    start = offset % capacity
    if start + steps <= capacity:
        return slice(start, start + steps)
    return (np.arange(steps) + start) % capacity


def graphs_of(manifest: Manifest, network: str) -> list[GraphInfo]:
    return [manifest.graph(key) for key in NETWORKS[network] if key in manifest.graphs]
