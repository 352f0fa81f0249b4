"""What the LM's two transformers (temporal and depformer) share: weight lookup, norm epsilon, token -> embedding row."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from personaplex_edge.runtime.constants import ZERO_TOKEN

from ..config import LMConfig
from .builder import GraphBuilder

Weights = Mapping[str, np.ndarray]


def param(weights: Weights, key: str) -> np.ndarray:
    """The upstream tensor `key` as float32; a missing key is a KeyError naming it."""
    if key not in weights:
        raise KeyError(f"missing LM weight {key!r}")
    return np.asarray(weights[key], dtype=np.float32)


def norm_eps(cfg: LMConfig) -> float:
    """Upstream `create_norm_fn`: rms_norm_f32 uses 1e-8, rms_norm 1e-5."""
    return 1e-8 if cfg.norm == "rms_norm_f32" else 1e-5


def token_rows(g: GraphBuilder, tokens: str, offsets: np.ndarray, zero_row: int) -> str:
    """Table rows for int64 tokens (any shape ending in len(offsets)); -1 -> zero_row."""
    clamped = g.op("Max", [tokens, g.const(np.array(0, np.int64))])
    rows = g.op("Add", [clamped, g.const(offsets.astype(np.int64))])
    is_zero = g.op("Equal", [tokens, g.const(np.array(ZERO_TOKEN, np.int64))])
    return g.op("Where", [is_zero, g.const(np.array(zero_row, np.int64)), rows])
