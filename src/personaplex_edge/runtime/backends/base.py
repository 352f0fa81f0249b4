"""Helpers the backends share: initial state values, ring-cache slots, a network's graphs.

The interface they implement (`Network`, `Backend`) is the core's: `core.network`.
"""

from __future__ import annotations

import numpy as np

from personaplex_edge.runtime.core.manifest import GraphInfo, Manifest
from personaplex_edge.runtime.core.network import NETWORKS


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
