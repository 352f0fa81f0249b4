"""The plumbing every part of the Mimi graphs shares: weights and state under a graph prefix, sequences with their layout.

A `MimiNet` is what each block (SEANet, codec transformer, RVQ) gets: the builder,
the upstream `MimiModel.state_dict()` weights and the graph's prefix (`enc` / `dec`)
that names its state inputs. A `Seq` is a value with its static length and its
layout: channel-major [1, C, T] or time-major [1, T, C] (see seanet.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import MimiConfig
from .builder import GraphBuilder


@dataclass
class MimiNet:
    """What every block needs: the builder, the weights, and this graph's name prefix."""

    g: GraphBuilder
    weights: Mapping[str, np.ndarray]
    prefix: str  # "enc" or "dec"

    def w(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise KeyError(f"Mimi weights: missing {key!r}")
        return np.asarray(self.weights[key], dtype=np.float32)

    @property
    def dtype(self) -> np.dtype:
        return self.g.weight_dtype

    def state(self, name: str, shape: tuple[int, ...], doc: str = "") -> str:
        """Declare state input `<prefix>.<name>` (compute dtype), paired with `<...>_next`."""
        full = f"{self.prefix}.{name}"
        return self.g.input(full, self.dtype, shape, role="state_in", pair=full + "_next", doc=doc)

    def state_out(self, value: str, name: str, shape: tuple[int, ...]) -> None:
        full = f"{self.prefix}.{name}"
        self.g.output(value, full + "_next", self.dtype, shape, role="state_out", pair=full)


def i64(values: list[int] | int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass(frozen=True)
class Seq:
    """A sequence value with its static length and layout."""

    value: str
    length: int
    time_major: bool


def layout(g: GraphBuilder, x: Seq, time_major: bool) -> Seq:
    if x.time_major == time_major:
        return x
    return Seq(g.op("Transpose", [x.value], perm=[0, 2, 1]), x.length, time_major)


def slice_axis(g: GraphBuilder, x: str, axis: int, start: int, end: int) -> str:
    return g.op("Slice", [x, g.const(i64([start])), g.const(i64([end])), g.const(i64([axis]))])


def steps_per_call(cfg: MimiConfig) -> int:
    """Transformer positions per 80 ms frame (encoder frame rate / frame rate = 2)."""
    return int(round(cfg.encoder_frame_rate / cfg.frame_rate))

