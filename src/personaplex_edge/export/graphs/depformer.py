"""The depformer (depth transformer) as one ONNX graph with in-graph sampling.

One call produces the audio tokens of one 80 ms frame: the `dep_q` depth steps
are unrolled, each with its own weights (`depformer_in[k]`, `in_projs[k]`,
`out_projs[k]`, `gating[k]`, `linears[k]`; norms are shared per layer). There is
no positional embedding; step k attends to the keys of steps 0..k (upstream's
depformer cache holds all dep_q steps, so everything is visible).

Step k's token input is the text token for k = 0 (`depformer_text_emb`) and the
previous step's token for k > 0 (`depformer_emb[k-1]`). Where `force_mask[k]` is
set, `forced_tokens[k]` replaces the sampled token, both in `audio_tokens` and
as the next step's input (PersonaPlex teacher-forces prompts and the user
stream this way). `audio_logits` are always the model's own logits.

`steps` < dep_q unrolls only the first steps: PersonaPlex's last 8 depth steps
predict the user stream, which the runtime always forces, and which no earlier
step can see, so they may be skipped.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import LMConfig
from . import layers as L
from .builder import GraphBuilder
from .lm_common import Weights, norm_eps, param, token_rows
from .sampling import sample_top_k


class _Depformer:
    """Builds the unrolled depth steps; holds the per-layer key/value history."""

    def __init__(self, g: GraphBuilder, weights: Weights, cfg: LMConfig):
        self.g, self.w, self.cfg = g, weights, cfg
        self.eps = norm_eps(cfg)
        self.heads = cfg.depformer_num_heads
        self.hd = cfg.depformer_dim // self.heads
        self.norms = [self._norm_weights(i) for i in range(cfg.depformer_num_layers)]
        self.keys: list[str | None] = [None] * cfg.depformer_num_layers  # [1,H,D,k] transposed
        self.values: list[str | None] = [None] * cfg.depformer_num_layers  # [1,H,k,D]

    def _norm_weights(self, i: int) -> tuple[str, str]:
        p = f"depformer.layers.{i}"
        return tuple(self.g.weight(f"{p}.{n}.alpha", param(self.w, f"{p}.{n}.alpha").reshape(-1),
                                   dtype=np.float32) for n in ("norm1", "norm2"))

    def embed(self, k: int, token: str) -> str:
        """Token embedding [1, 1, ddim] of step k's input token (int64 [1])."""
        key = "depformer_text_emb.weight" if k == 0 else f"depformer_emb.{k - 1}.weight"
        table = param(self.w, key)
        zero_row = table.shape[0]
        stored = self.g.weight(f"depformer.token_emb.{k}",
                               np.concatenate([table, np.zeros((1, table.shape[1]), np.float32)]))
        rows = token_rows(self.g, token, np.zeros(1, np.int64), zero_row)
        emb = self.g.op("Gather", [stored, rows], axis=0)  # [1, ddim]
        return self.g.op("Unsqueeze", [emb, self.g.const(np.array([0], np.int64))])

    def attention(self, i: int, k: int, h: str) -> str:
        g, p = self.g, f"depformer.layers.{i}.self_attn"
        proj = L.linear(g, h, f"{p}.in_projs.{k}", param(self.w, f"{p}.in_projs.{k}.weight"))
        q, key, v = (L.split_heads(g, t, self.heads, self.hd) for t in L.split_qkv(g, proj, self.cfg.depformer_dim))
        key_t = g.op("Transpose", [key], perm=[0, 1, 3, 2])
        if self.keys[i] is not None:
            key_t = g.op("Concat", [self.keys[i], key_t], axis=3)
            v = g.op("Concat", [self.values[i], v], axis=2)
        self.keys[i], self.values[i] = key_t, v
        scores = g.op("Mul", [L.to_f32(g, g.op("MatMul", [q, key_t])),
                              g.const(np.float32(1.0 / math.sqrt(self.hd)))])
        probs = L.to_compute(g, g.op("Softmax", [scores], axis=-1))
        out = L.merge_heads(g, g.op("MatMul", [probs, v]), self.heads, self.hd)
        return L.linear(g, out, f"{p}.out_projs.{k}", param(self.w, f"{p}.out_projs.{k}.weight"))

    def step(self, k: int, hidden: str, token: str) -> str:
        """Depth step k: float32 logits [1, card]."""
        g, w = self.g, self.w
        x = L.linear(g, hidden, f"depformer_in.{k}", param(w, f"depformer_in.{k}.weight"))
        x = g.op("Add", [x, self.embed(k, token)])
        for i in range(self.cfg.depformer_num_layers):
            norm1, norm2 = self.norms[i]
            x = g.op("Add", [x, self.attention(i, k, L.rms_norm_stored(g, x, norm1, self.eps))])
            p = f"depformer.layers.{i}.gating.{k}"
            ff = L.gated_ffn(g, L.rms_norm_stored(g, x, norm2, self.eps), p,
                           param(w, p + ".linear_in.weight"), param(w, p + ".linear_out.weight"))
            x = g.op("Add", [x, ff])
        logits = L.linear(g, x, f"linears.{k}", param(w, f"linears.{k}.weight"))
        return g.op("Reshape", [L.to_f32(g, logits), g.const(np.array([1, self.cfg.card], np.int64))])


def build_depformer(g: GraphBuilder, weights: Weights, cfg: LMConfig, k_max: int = 250,
                    steps: int | None = None) -> None:
    """All depth steps of one frame, sampling each token in graph (see sampling.py)."""
    n = cfg.dep_q if steps is None else steps
    if not 0 < n <= cfg.dep_q:
        raise ValueError(f"steps must be in 1..dep_q ({cfg.dep_q}), got {steps}")
    hidden = g.input("hidden", g.weight_dtype, (1, 1, cfg.dim), doc="temporal output after out_norm")
    token = g.input("text_token", np.int64, (1,), doc="text token of this frame (sampled or forced)")
    temperature = g.input("temperature", np.float32, (1,))
    top_k = g.input("top_k", np.int64, (1,), doc="1 = greedy")
    noise = g.input("noise", np.float32, (n, cfg.card), doc="Exp(1) draws, one row per step")
    forced = g.input("forced_tokens", np.int64, (n,))
    force_mask = g.input("force_mask", np.bool_, (n,))
    dep = _Depformer(g, weights, cfg)
    tokens, all_logits = [], []
    for k in range(n):
        logits = dep.step(k, hidden, token)
        row = g.const(np.array([k], np.int64))
        sampled = sample_top_k(g, logits, temperature, top_k, g.op("Gather", [noise, row], axis=0),
                               k_max, cfg.card)
        token = g.op("Where", [g.op("Gather", [force_mask, row], axis=0),
                               g.op("Gather", [forced, row], axis=0), sampled])
        tokens.append(token)
        all_logits.append(logits)
    g.output(g.op("Concat", tokens, axis=0), "audio_tokens", np.int64, (n,))
    g.output(g.op("Concat", all_logits, axis=0), "audio_logits", np.float32, (n, cfg.card))
    g.meta.update({"kind": "depformer", "steps": n, "top_k_max": min(k_max, cfg.card)})
