"""The temporal (main) transformer of the LM as two ONNX graphs.

* `build_step`: one 80 ms step. Embeds the 17 input tokens, runs the layers
  against the runtime's ring KV caches, applies `out_norm`, and samples the text
  token in graph. Outputs the hidden state the depformer consumes.
* `build_prefill`: T steps at once (prompts, voice presets), same weights and
  caches, no text head.

Weights are upstream `LMModel.state_dict()` arrays (moshi 0.2.13 names). Both
graphs read the caches and emit only this call's keys/values (`new_k.{i}`,
`new_v.{i}`); the runtime writes them at slots (offset + t) % context. Keys are
kept transposed ([1, H, D, C]) so attention needs no transpose of the cache.

Embeddings: the 17 per-stream lookups are one Gather on a single table, rows
``[text_emb (text_card + 1) | emb.0 (card + 1) | ... | emb.{n_q-1} (card + 1) | zero]``.
Token -1 (upstream's zero token) selects the trailing all-zero row; other
negative tokens are clamped to 0 as upstream does. The table layout is recorded
in ``g.meta["embedding_table"]``.
"""

from __future__ import annotations

import numpy as np

from ..config import LMConfig
from . import layers as L
from .builder import GraphBuilder
from .lm_common import Weights, norm_eps, param, token_rows
from .sampling import sample_top_k

# -- embeddings ---------------------------------------------------------------

def embedding_layout(cfg: LMConfig) -> dict:
    """Row offsets of each stream in the concatenated input-embedding table."""
    offsets = [0] + [cfg.text_card + 1 + k * (cfg.card + 1) for k in range(cfg.n_q)]
    zero_row = cfg.text_card + 1 + cfg.n_q * (cfg.card + 1)
    return {"streams": ["text"] + [f"audio.{k}" for k in range(cfg.n_q)],
            "offsets": offsets, "rows": zero_row + 1, "zero_row": zero_row}


def embed_tokens(g: GraphBuilder, weights: Weights, cfg: LMConfig, tokens: str) -> str:
    """tokens int64 [1, T, n_q + 1] -> summed embeddings [1, T, dim] (compute dtype)."""
    layout = embedding_layout(cfg)
    parts = [param(weights, "text_emb.weight")]
    parts += [param(weights, f"emb.{k}.weight") for k in range(cfg.n_q)]
    parts.append(np.zeros((1, cfg.dim), np.float32))
    table = g.weight("lm.input_embeddings", np.concatenate(parts, axis=0))
    g.meta["embedding_table"] = layout
    rows = token_rows(g, tokens, np.array(layout["offsets"]), layout["zero_row"])
    gathered = g.op("Gather", [table, rows], axis=0)  # [1, T, 17, dim]
    return g.op("ReduceSum", [gathered, g.const(np.array([2], np.int64))], keepdims=0)


# -- transformer ----------------------------------------------------------------

def _layer(g: GraphBuilder, weights: Weights, cfg: LMConfig, i: int, x: str, rope: tuple[str, str],
           masks: tuple[str, str], cache: tuple[str, str]) -> tuple[str, str, str]:
    """One temporal layer; returns (x, new keys [1,H,D,T], new values [1,H,T,D])."""
    p = f"transformer.layers.{i}"
    eps, heads, hd = norm_eps(cfg), cfg.num_heads, cfg.head_dim
    h = L.rms_norm(g, x, p + ".norm1", param(weights, p + ".norm1.alpha"), eps)
    proj = L.linear(g, h, p + ".self_attn.in_projs.0", param(weights, p + ".self_attn.in_projs.0.weight"))
    q, k, v = (L.split_heads(g, t, heads, hd) for t in L.split_qkv(g, proj, cfg.dim))
    q = L.apply_rope(g, q, rope, hd)
    k_t = g.op("Transpose", [L.apply_rope(g, k, rope, hd)], perm=[0, 1, 3, 2])
    attn = L.attention_with_cache(g, q, k_t, v, cache[0], cache[1], masks[0], masks[1], hd)
    attn = L.linear(g, L.merge_heads(g, attn, heads, hd), p + ".self_attn.out_projs.0",
                    param(weights, p + ".self_attn.out_projs.0.weight"))
    x = g.op("Add", [x, attn])
    h = L.rms_norm(g, x, p + ".norm2", param(weights, p + ".norm2.alpha"), eps)
    ff = L.gated_ffn(g, h, p + ".gating", param(weights, p + ".gating.linear_in.weight"),
                   param(weights, p + ".gating.linear_out.weight"))
    return g.op("Add", [x, ff]), k_t, v


def _cache_inputs(g: GraphBuilder, cfg: LMConfig, i: int) -> tuple[str, str]:
    heads, hd, ctx = cfg.num_heads, cfg.head_dim, cfg.context
    k = g.input(f"k.{i}", g.weight_dtype, (1, heads, hd, ctx), role="cache", pair=f"new_k.{i}",
                slot_axis=3, doc="layer keys, transposed, ring of `context` slots")
    v = g.input(f"v.{i}", g.weight_dtype, (1, heads, ctx, hd), role="cache", pair=f"new_v.{i}",
                slot_axis=2, doc="layer values, ring of `context` slots")
    return k, v


def _transformer(g: GraphBuilder, weights: Weights, cfg: LMConfig, x: str, offset: str,
                 steps: str) -> tuple[str, list[tuple[str, str]]]:
    """Layers + out_norm over x [1, T, dim] starting at absolute position `offset`.

    Returns the hidden state and each layer's (new keys, new values)."""
    positions = g.op("Cast", [g.op("Add", [offset, g.op("Range", [g.const(np.array(0, np.int64)), steps,
                                                                    g.const(np.array(1, np.int64))])])],
                     to=1)  # float32 [T]
    rope = L.rope_tables(g, positions, cfg.head_dim, cfg.max_period)
    masks = L.ring_cache_mask(g, offset, steps, cfg.context, cfg.context)
    updates = []
    for i in range(cfg.num_layers):
        x, k_t, v = _layer(g, weights, cfg, i, x, rope, masks, _cache_inputs(g, cfg, i))
        updates.append((k_t, v))
    return L.rms_norm(g, x, "out_norm", param(weights, "out_norm.alpha"), norm_eps(cfg)), updates


def _cache_outputs(g: GraphBuilder, cfg: LMConfig, updates: list[tuple[str, str]],
                   t_dim: int | str) -> None:
    """Only this call's entries leave the graph, never the whole cache."""
    heads, hd = cfg.num_heads, cfg.head_dim
    for i, (k_t, v) in enumerate(updates):
        g.output(k_t, f"new_k.{i}", g.weight_dtype, (1, heads, hd, t_dim), role="cache_update",
                 pair=f"k.{i}", slot_axis=3)
        g.output(v, f"new_v.{i}", g.weight_dtype, (1, heads, t_dim, hd), role="cache_update",
                 pair=f"v.{i}", slot_axis=2)


def _record_meta(g: GraphBuilder, cfg: LMConfig, kind: str) -> None:
    g.meta.update({"kind": kind, "cache_capacity": cfg.context, "context": cfg.context,
                   "num_layers": cfg.num_layers, "num_streams": cfg.num_streams})


# -- graphs -----------------------------------------------------------------------

def build_step(g: GraphBuilder, weights: Weights, cfg: LMConfig, k_max: int = 250) -> None:
    """One temporal step with in-graph text sampling (see sampling.py for the rule)."""
    k = cfg.num_streams
    tokens = g.input("tokens", np.int64, (1, k), doc="delayed input row; -1 = zero embedding")
    offset = g.input("offset", np.int64, (1,), role="offset", doc="number of steps already cached")
    temperature = g.input("text_temperature", np.float32, (1,))
    top_k = g.input("text_top_k", np.int64, (1,), doc="1 = greedy")
    noise = g.input("text_noise", np.float32, (1, cfg.text_card), doc="Exp(1) draws")
    x = embed_tokens(g, weights, cfg, g.op("Unsqueeze", [tokens, g.const(np.array([1], np.int64))]))
    hidden, updates = _transformer(g, weights, cfg, x, offset, g.const(np.array(1, np.int64)))
    logits = L.linear(g, hidden, "text_linear", param(weights, "text_linear.weight"))
    logits = g.op("Reshape", [L.to_f32(g, logits), g.const(np.array([1, cfg.text_card], np.int64))])
    token = sample_top_k(g, logits, temperature, top_k, noise, k_max, cfg.text_card)
    g.output(hidden, "hidden", g.weight_dtype, (1, 1, cfg.dim), doc="after out_norm, for the depformer")
    g.output(logits, "text_logits", np.float32, (1, cfg.text_card))
    g.output(token, "text_token", np.int64, (1,))
    _cache_outputs(g, cfg, updates, 1)
    _record_meta(g, cfg, "lm_step")
    g.meta["text_top_k_max"] = min(k_max, cfg.text_card)


def build_prefill(g: GraphBuilder, weights: Weights, cfg: LMConfig, max_steps: int) -> None:
    """T <= max_steps causal steps at once; `embeddings` are added to the token embeddings.

    A released voice preset is a sequence of per-step input embeddings: feed
    tokens of -1 (zero embedding) with the preset rows as `embeddings`.
    """
    if not 0 < max_steps <= cfg.context:
        raise ValueError(f"max_steps must be in 1..context ({cfg.context}), got {max_steps}")
    k = cfg.num_streams
    tokens = g.input("tokens", np.int64, (1, "T", k), doc="delayed input rows; -1 = zero embedding")
    extra = g.input("embeddings", np.float32, (1, "T", cfg.dim), doc="added to the token embeddings")
    offset = g.input("offset", np.int64, (1,), role="offset", doc="number of steps already cached")
    x = g.op("Add", [embed_tokens(g, weights, cfg, tokens), L.to_compute(g, extra)])
    steps = g.op("Squeeze", [g.op("Shape", [tokens], start=1, end=2), g.const(np.array([0], np.int64))])
    hidden, updates = _transformer(g, weights, cfg, x, offset, steps)
    g.output(hidden, "hidden", g.weight_dtype, (1, "T", cfg.dim), doc="after out_norm")
    _cache_outputs(g, cfg, updates, "T")
    _record_meta(g, cfg, "lm_prefill")
    g.meta["max_steps"] = max_steps
