"""Mimi's codec transformer (upstream ProjectedTransformer) over one call's steps, with ring KV caches.

KV cache capacity: upstream's `RingKVCache` has `context` slots and writes a step's
keys *before* attending, so with T steps per call the first query of a call has lost
the key `context - 1` steps back (the `delta < context` mask would allow it). The
graph reproduces that exactly with a ring of `context - T` slots holding the keys of
earlier calls, plus this call's keys attended to directly.
"""

from __future__ import annotations

import numpy as np

from ..config import MimiConfig, MimiTransformerConfig
from . import layers as L
from .mimi_net import MimiNet, Seq, i64, layout, steps_per_call

LAYER_NORM_EPS = 1e-5  # upstream create_norm_fn("layer_norm")


def cache_capacity(cfg: MimiConfig) -> int:
    """Ring slots per KV cache: `context - steps_per_call` (see module doc)."""
    steps = steps_per_call(cfg)
    if cfg.transformer.context <= steps:
        raise ValueError(f"transformer context {cfg.transformer.context} must exceed {steps}")
    return cfg.transformer.context - steps


# -- transformer -----------------------------------------------------------------


def check_transformer(t: MimiTransformerConfig) -> None:
    if not t.causal or t.gating != "none" or t.norm != "layer_norm" or t.positional_embedding != "rope":
        raise ValueError("Mimi graphs need a causal rope transformer with layer_norm and no gating")
    if len(t.output_dimensions) != 1:
        raise ValueError("Mimi uses exactly one transformer output")


def _transformer_layer(net: MimiNet, x: str, key: str, i: int, t: MimiTransformerConfig,
                       rope: tuple[str, str], masks: tuple[str, str], steps: int,
                       capacity: int) -> str:
    """Pre-norm layer: x + ls1 * attn(norm1(x)); x + ls2 * ff(norm2(x)), with ring KV cache."""
    g, p = net.g, net.prefix
    heads, head_dim = t.num_heads, t.d_model // t.num_heads
    name = f"{p}.l{i}"
    h = L.layer_norm(g, x, f"{name}.norm1", net.w(f"{key}.norm1.weight"), net.w(f"{key}.norm1.bias"),
                     LAYER_NORM_EPS)
    qkv = L.linear(g, h, f"{name}.in_proj", net.w(f"{key}.self_attn.in_projs.0.weight"))
    # [1, T, (3 H D)] -> [1, 3H, T, D]: q heads, k heads, v heads; RoPE on q and k at once.
    qkv = L.split_heads(g, qkv, 3 * heads, head_dim)
    qk, v = g.op("Split", [qkv, g.const(i64([2 * heads, heads]))], n_out=2, axis=1)
    q, k = g.op("Split", [L.apply_rope(g, qk, rope, head_dim), g.const(i64([heads, heads]))],
                n_out=2, axis=1)
    k_t = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    doc = f"ring KV cache of layer {i} (post-RoPE), zeros initially; validity follows {p}.offset"
    cache_k = g.input(f"{p}.k.{i}", net.dtype, (1, heads, head_dim, capacity), role="cache",
                      pair=f"{p}.new_k.{i}", doc="keys, transposed; " + doc, slot_axis=3)
    cache_v = g.input(f"{p}.v.{i}", net.dtype, (1, heads, capacity, head_dim), role="cache",
                      pair=f"{p}.new_v.{i}", doc="values; " + doc, slot_axis=2)
    g.output(k_t, f"{p}.new_k.{i}", net.dtype, (1, heads, head_dim, steps), role="cache_update",
             pair=f"{p}.k.{i}", slot_axis=3)
    g.output(v, f"{p}.new_v.{i}", net.dtype, (1, heads, steps, head_dim), role="cache_update",
             pair=f"{p}.v.{i}", slot_axis=2)
    att = L.attention_with_cache(g, q, k_t, v, cache_k, cache_v, *masks, head_dim)
    att = L.linear(g, L.merge_heads(g, att, heads, head_dim), f"{name}.out_proj",
                   net.w(f"{key}.self_attn.out_projs.0.weight"))
    x = g.op("Add", [x, g.op("Mul", [att, g.weight(f"{name}.ls1", net.w(f"{key}.layer_scale_1.scale"))])])
    h = L.layer_norm(g, x, f"{name}.norm2", net.w(f"{key}.norm2.weight"), net.w(f"{key}.norm2.bias"),
                     LAYER_NORM_EPS)
    ff = L.linear(g, L.gelu(g, L.linear(g, h, f"{name}.linear1", net.w(f"{key}.linear1.weight"))),
                  f"{name}.linear2", net.w(f"{key}.linear2.weight"))
    return g.op("Add", [x, g.op("Mul", [ff, g.weight(f"{name}.ls2", net.w(f"{key}.layer_scale_2.scale"))])])


def projected_transformer(net: MimiNet, x: Seq, key: str, cfg: MimiConfig) -> Seq:
    """Upstream ProjectedTransformer over one call's steps, time-major [1, T, C] -> [1, T, C']."""
    t = cfg.transformer
    check_transformer(t)
    g = net.g
    steps, capacity = steps_per_call(cfg), cache_capacity(cfg)
    assert x.length == steps, (x.length, steps)
    h = layout(g, x, True).value
    if t.d_model != t.input_dimension:
        h = L.linear(g, h, f"{net.prefix}.input_proj", net.w(f"{key}.input_proj.weight"))
    offset = g.input(f"{net.prefix}.offset", np.int64, (1,), role="offset",
                     doc=f"position of this call's first step: {steps} * frame index")
    masks = L.ring_cache_mask(g, offset, g.const(np.array(steps, np.int64)), capacity, t.context)
    head_dim = t.d_model // t.num_heads
    positions = L.cast(g, g.op("Add", [offset, g.const(np.arange(steps, dtype=np.int64))]), np.float32)
    rope = L.rope_tables(g, positions, head_dim, t.max_period)
    for i in range(t.num_layers):
        h = _transformer_layer(net, h, f"{key}.transformer.layers.{i}", i, t, rope, masks, steps, capacity)
    if t.d_model != t.output_dimensions[0]:
        h = L.linear(g, h, f"{net.prefix}.output_proj", net.w(f"{key}.output_projs.0.weight"))
    return Seq(h, steps, True)

