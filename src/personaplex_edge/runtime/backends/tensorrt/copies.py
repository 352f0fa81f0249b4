"""Device copy planning for ring KV caches and partial snapshots: pure, tested on CPU.

Each plan is a list of cudaMemcpy2D-shaped copies; `apply_copy_2d` is their
numpy reference, so the GPU path and the CPU tests share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Copy2D:
    """One cudaMemcpy2D: `height` rows of `width` bytes, at byte offsets with pitches."""

    dst_offset: int
    dpitch: int
    src_offset: int
    spitch: int
    width: int
    height: int


def _split(shape: tuple[int, ...], axis: int, itemsize: int) -> tuple[int, int]:
    """(rows before the axis, bytes per slot) of a C-contiguous tensor."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) * itemsize
    return outer, inner


def ring_copies(cache_shape: tuple[int, ...], axis: int, offset: int, steps: int, itemsize: int) -> list[Copy2D]:
    """Copies writing a packed update (cache_shape with `steps` along `axis`) into the ring
    slots (offset + t) % capacity: one copy, or two when the slots wrap."""
    capacity = cache_shape[axis]
    if not 0 < steps <= capacity:
        raise ValueError(f"{steps} steps do not fit a ring of {capacity}")
    outer, inner = _split(cache_shape, axis, itemsize)
    start = offset % capacity
    first = min(steps, capacity - start)
    copies = [Copy2D(start * inner, capacity * inner, 0, steps * inner, first * inner, outer)]
    if first < steps:
        copies.append(Copy2D(0, capacity * inner, first * inner, steps * inner, (steps - first) * inner, outer))
    return copies


def slots_copy(cache_shape: tuple[int, ...], axis: int, slots: int, itemsize: int) -> Copy2D:
    """The first `slots` ring slots of a cache (dst) <-> a packed array with `slots` along
    `axis` (src): used for partial snapshots; swap the roles for restores."""
    outer, inner = _split(cache_shape, axis, itemsize)
    return Copy2D(0, cache_shape[axis] * inner, 0, slots * inner, slots * inner, outer)


def apply_copy_2d(dst: np.ndarray, src: np.ndarray, c: Copy2D) -> None:
    """What cudaMemcpy2D does, on byte arrays (the CPU reference of the copy plans)."""
    d = dst.reshape(-1).view(np.uint8)
    s = src.reshape(-1).view(np.uint8)
    for row in range(c.height):
        d[c.dst_offset + row * c.dpitch: c.dst_offset + row * c.dpitch + c.width] = \
            s[c.src_offset + row * c.spitch: c.src_offset + row * c.spitch + c.width]

