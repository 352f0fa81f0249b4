"""Neural-network building blocks written as ONNX ops.

Every function takes the `GraphBuilder` first and returns value names. Weights
arrive as numpy arrays in upstream (PyTorch) layout and are stored the way the
ops consume them (linear weights transposed to [in, out] for MatMul, the form
TensorRT and Model Optimizer's ONNX quantizer expect).

Numerics follow upstream Moshi: RMSNorm and RoPE in float32, softmax in float32.
Only ops TensorRT 10.3 (JetPack 6) parses are used; tests/test_graph_hygiene.py
holds the graphs to that list.
"""

from __future__ import annotations

import math

import numpy as np

from .builder import GraphBuilder

NEG_INF = -1.0e9  # additive mask value (softmax runs in float32)


def cast(g: GraphBuilder, x: str, dtype: np.dtype | type) -> str:
    from .builder import onnx_dtype

    return g.op("Cast", [x], to=onnx_dtype(dtype))


def to_compute(g: GraphBuilder, x: str) -> str:
    """Cast a float32 value to the graph's compute dtype (no-op for float32 graphs)."""
    return x if g.weight_dtype == np.float32 else cast(g, x, g.weight_dtype)


def to_f32(g: GraphBuilder, x: str) -> str:
    return x if g.weight_dtype == np.float32 else cast(g, x, np.float32)


def linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
    """y = x @ W^T (+ b) for an upstream `nn.Linear` weight of shape [out, in]."""
    w = g.weight(name + ".weight", np.asarray(weight).T)
    y = g.op("MatMul", [x, w], name=name.replace(".", "_"))
    if bias is not None:
        y = g.op("Add", [y, g.weight(name + ".bias", bias)])
    return y


def rms_norm(g: GraphBuilder, x: str, name: str, alpha: np.ndarray, eps: float) -> str:
    """Upstream RMSNorm: x * alpha / sqrt(eps + mean(x^2)), computed in float32."""
    xf = to_f32(g, x)
    inv = _rms_inverse(g, xf, eps)
    a = g.weight(name + ".alpha", np.asarray(alpha, dtype=np.float32).reshape(-1), dtype=np.float32)
    y = g.op("Mul", [g.op("Mul", [xf, inv]), a])
    return to_compute(g, y)


def rms_norm_stored(g: GraphBuilder, x: str, alpha: str, eps: float) -> str:
    """RMSNorm with an already-stored float32 alpha (the depformer shares norms across steps)."""
    xf = to_f32(g, x)
    inv = _rms_inverse(g, xf, eps)
    return to_compute(g, g.op("Mul", [g.op("Mul", [xf, inv]), alpha]))


def _rms_inverse(g: GraphBuilder, xf: str, eps: float) -> str:
    """1 / sqrt(eps + mean(x^2)) over the last axis of float32 xf."""
    var = g.op("ReduceMean", [g.op("Mul", [xf, xf])], axes=[-1], keepdims=1)
    return g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(eps))])])])


def layer_norm(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray,
               eps: float = 1e-5) -> str:
    w = g.weight(name + ".weight", weight)
    b = g.weight(name + ".bias", bias)
    return g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=eps)


def gelu(g: GraphBuilder, x: str) -> str:
    """Exact (erf) GELU, PyTorch's default: 0.5 x (1 + erf(x / sqrt 2)), in the form ONNX Runtime
    fuses into one op."""
    erf = g.op("Erf", [g.op("Div", [x, g.const(np.float32(np.sqrt(2.0)), g.weight_dtype)])])
    one = g.const(np.float32(1.0), g.weight_dtype)
    half = g.const(np.float32(0.5), g.weight_dtype)
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one])]), half])


def silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def rope_tables(g: GraphBuilder, positions: str, head_dim: int, max_period: float) -> tuple[str, str]:
    """RoPE tables for float32 positions [T]: full-width float32 [T, D], cos repeated per pair
    and sin signed (-sin, +sin) per pair, so rope(x) = x * cos + pair_swap(x) * sin."""
    freqs = np.exp(np.arange(head_dim // 2, dtype=np.float32) * np.float32(-np.log(max_period) * 2 / head_dim))
    angles = g.op("Mul", [g.op("Unsqueeze", [positions, g.const(np.array([1], np.int64))]),
                          g.const(np.repeat(freqs.astype(np.float32), 2))])  # [T, D]
    sign = g.const(np.tile(np.array([-1.0, 1.0], np.float32), head_dim // 2))
    return g.op("Cos", [angles]), g.op("Mul", [g.op("Sin", [angles]), sign])


def apply_rope(g: GraphBuilder, x: str, rope: tuple[str, str], head_dim: int) -> str:
    """Interleaved RoPE on x [1, H, T, D], in float32 as upstream: pairs (r, i) = (x[2j], x[2j+1])
    -> (r cos - i sin, r sin + i cos), the swap (r, i) -> (i, r) being a Gather."""
    cos, sin = rope
    xf = to_f32(g, x)
    swap = np.arange(head_dim).reshape(-1, 2)[:, ::-1].reshape(-1)
    swapped = g.op("Gather", [xf, g.const(swap.astype(np.int64))], axis=3)
    out = g.op("Add", [g.op("Mul", [xf, cos]), g.op("Mul", [swapped, sin])])
    return to_compute(g, out)


def gated_ffn(g: GraphBuilder, x: str, name: str, w_in: np.ndarray, w_out: np.ndarray) -> str:
    """Upstream ActivationGating (silu): linear_in -> [a | b] -> silu(a) * b -> linear_out."""
    h = linear(g, x, name + ".linear_in", w_in)
    half = w_in.shape[0] // 2
    a, b = g.op("Split", [h, g.const(np.array([half, half], np.int64))], n_out=2, axis=-1)
    return linear(g, g.op("Mul", [silu(g, a), b]), name + ".linear_out", w_out)


def split_qkv(g: GraphBuilder, projected: str, dim: int) -> tuple[str, str, str]:
    """[1, T, 3*dim] laid out as (p h d) -> q, k, v [1, T, dim]."""
    return g.op("Split", [projected, g.const(np.array([dim, dim, dim], np.int64))], n_out=3, axis=-1)


def split_heads(g: GraphBuilder, x: str, num_heads: int, head_dim: int) -> str:
    """[1, T, H*D] -> [1, H, T, D]."""
    y = g.op("Reshape", [x, g.const(np.array([0, 0, num_heads, head_dim], np.int64))])
    return g.op("Transpose", [y], perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, num_heads: int, head_dim: int) -> str:
    """[1, H, T, D] -> [1, T, H*D]."""
    y = g.op("Transpose", [x], perm=[0, 2, 1, 3])
    return g.op("Reshape", [y, g.const(np.array([0, 0, num_heads * head_dim], np.int64))])


def ring_cache_mask(g: GraphBuilder, offset: str, steps: str, capacity: int, context: int) -> tuple[str, str]:
    """Boolean visibility masks for a block of `steps` queries starting at position `offset`.

    The cache is a ring of `capacity` slots: slot s holds the most recent
    position p < offset with p = s (mod capacity), written by earlier calls.
    Returns (cache_mask [T, capacity], block_mask [T, T]); query t (position
    offset + t) sees a key at position p when 0 <= p <= offset + t and
    offset + t - p < context (upstream's sliding window).
    offset: int64 [1]; steps: int64 scalar T.
    """
    slots = g.const(np.arange(capacity, dtype=np.int64))
    cap = g.const(np.array(capacity, np.int64))
    zero = g.const(np.array(0, np.int64))
    one = g.const(np.array(1, np.int64))
    # Distance back from `offset` to the position held in each slot, in 1..capacity.
    back = g.op("Mod", [g.op("Sub", [offset, slots]), cap], fmod=0)
    back = g.op("Where", [g.op("Equal", [back, zero]), cap, back])
    slot_pos = g.op("Sub", [offset, back])  # [C]
    t = g.op("Range", [zero, steps, one])  # [T]
    t_col = g.op("Unsqueeze", [t, g.const(np.array([1], np.int64))])  # [T, 1]
    ctx = g.const(np.array(context, np.int64))
    # cache: valid slot (p >= 0) and within the window of query t: back + t < context
    in_window = g.op("Less", [g.op("Add", [t_col, back]), ctx])  # [T, C]
    valid = g.op("GreaterOrEqual", [slot_pos, zero])  # [C]
    cache_mask = g.op("And", [in_window, valid])
    # block: causal and within the window
    t_row = g.op("Unsqueeze", [t, zero])  # [1, T]
    delta = g.op("Sub", [t_col, t_row])  # [T, T]
    block_mask = g.op("And", [g.op("GreaterOrEqual", [delta, zero]), g.op("Less", [delta, ctx])])
    return cache_mask, block_mask


def attention_with_cache(g: GraphBuilder, q: str, k_t: str, v: str, cache_k_t: str, cache_v: str,
                         cache_mask: str, block_mask: str, head_dim: int) -> str:
    """Softmax attention of q [1,H,T,D] over the ring cache and this block's keys/values.

    Keys are kept transposed, [1,H,D,C] for the cache and [1,H,D,T] for the block
    (`k_t`), so q @ K needs no transpose (a transpose of the cache would copy it).
    Values are [1,H,C,D] and [1,H,T,D]. The cache is only read: the block's keys
    are attended to separately and the two weighted sums added.
    """
    scale = g.const(np.float32(1.0 / math.sqrt(head_dim)))
    s_cache = g.op("MatMul", [q, cache_k_t])  # [1,H,T,C]
    s_block = g.op("MatMul", [q, k_t])  # [1,H,T,T]
    s_cache = g.op("Mul", [to_f32(g, s_cache), scale])
    s_block = g.op("Mul", [to_f32(g, s_block), scale])
    neg = g.const(np.float32(NEG_INF))
    s_cache = g.op("Where", [cache_mask, s_cache, neg])
    s_block = g.op("Where", [block_mask, s_block, neg])
    scores = g.op("Concat", [s_cache, s_block], axis=-1)
    probs = g.op("Softmax", [scores], axis=-1)
    capacity_split = g.op("Shape", [s_cache], start=3, end=4)
    block_split = g.op("Shape", [s_block], start=3, end=4)
    p_cache, p_block = g.op("Split", [probs, g.op("Concat", [capacity_split, block_split], axis=0)],
                            n_out=2, axis=-1)
    out = g.op("Add", [g.op("MatMul", [to_compute(g, p_cache), cache_v]),
                       g.op("MatMul", [to_compute(g, p_block), v])])
    return out
