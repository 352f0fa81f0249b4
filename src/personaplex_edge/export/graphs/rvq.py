"""Mimi's split residual vector quantizer (semantic `rvq_first` + acoustic `rvq_rest`) as ONNX ops.

Codebooks are derived as upstream does at load time
(`embedding_sum / clamp(cluster_usage, epsilon)`); codebook search and lookup run in
float32 even in float16 graphs, since nearest-neighbour choices are precision-sensitive.
"""

from __future__ import annotations

import numpy as np

from ..config import MimiConfig
from . import layers as L
from .mimi_net import MimiNet, Seq, i64

CODEBOOK_EPSILON = 1e-5  # upstream EuclideanCodebook's default epsilon


def codebook(net: MimiNet, key: str) -> np.ndarray:
    """Centroids [bins, dim] as upstream derives them: embedding_sum / clamp(usage, eps)."""
    usage = np.maximum(net.w(f"{key}._codebook.cluster_usage"), np.float32(CODEBOOK_EPSILON))
    return (net.w(f"{key}._codebook.embedding_sum") / usage[:, None]).astype(np.float32)


def _rvq_parts(cfg: MimiConfig) -> list[tuple[str, int]]:
    """(upstream quantizer name, codebooks used) in code order: 1 semantic, then acoustic."""
    rest = cfg.num_codebooks - 1
    return [("rvq_first", 1)] + ([("rvq_rest", rest)] if rest > 0 else [])


def rvq_encode(net: MimiNet, latent: Seq, cfg: MimiConfig) -> str:
    """latent (one step, compute dtype) -> codes int64 [1, num_codebooks]."""
    g = net.g
    row = L.to_f32(g, g.op("Reshape", [latent.value, g.const(i64([1, -1]))]))  # [1, D]
    codes = []
    for part, count in _rvq_parts(cfg):
        key = f"quantizer.{part}"
        proj = net.w(f"{key}.input_proj.weight")[:, :, 0]  # [dim, D]
        residual = g.op("MatMul", [row, g.weight(f"{net.prefix}.{part}.input_proj", proj.T, np.float32)])
        for j in range(count):
            residual, code = _nearest(net, residual, codebook(net, f"{key}.vq.layers.{j}"),
                                      f"{net.prefix}.{part}.cb{j}")
            codes.append(code)
    return g.op("Concat", codes, axis=1) if len(codes) > 1 else codes[0]


def _nearest(net: MimiNet, residual: str, centroids: np.ndarray, name: str) -> tuple[str, str]:
    """Nearest centroid to residual [1, dim] by euclidean distance; returns (residual - it, code [1,1]).

    argmin |r - c|^2 = argmin (|c|^2 - 2 r.c): |r|^2 is the same for every c.
    """
    g = net.g
    norms = np.sum(centroids.astype(np.float64) ** 2, axis=1).astype(np.float32)
    table = g.weight(name + ".table", centroids, np.float32)  # one copy: scored and gathered
    scores = g.op("Gemm", [residual, table, g.weight(name + ".norm2", norms.reshape(1, -1), np.float32)],
                  alpha=-2.0, transB=1)  # |c|^2 - 2 r.c, [1, bins]
    code = g.op("ArgMin", [scores], axis=1, keepdims=1)  # [1, 1]; ties -> lowest index, as torch
    chosen = g.op("Reshape", [g.op("Gather", [table, code], axis=0), g.const(i64([1, -1]))])
    return g.op("Sub", [residual, chosen]), code


def rvq_decode(net: MimiNet, codes: str, cfg: MimiConfig) -> Seq:
    """codes int64 [1, num_codebooks] -> latent, time-major [1, 1, D] (compute dtype)."""
    g = net.g
    start, total = 0, None
    for part, count in _rvq_parts(cfg):
        key = f"quantizer.{part}"
        tables = [codebook(net, f"{key}.vq.layers.{j}") for j in range(count)]
        bins = tables[0].shape[0]
        # One gather over the stacked codebooks: code j indexes rows j * bins + code.
        table = g.weight(f"{net.prefix}.{part}.tables", np.concatenate(tables, axis=0), np.float32)
        idx = g.op("Add", [g.op("Slice", [codes, g.const(i64([start])), g.const(i64([start + count])),
                                          g.const(i64([1]))]),
                           g.const(i64(np.arange(count) * bins).reshape(1, count))])
        summed = g.op("ReduceSum", [g.op("Gather", [table, idx], axis=0), g.const(i64([1]))], keepdims=0)
        proj = net.w(f"{key}.output_proj.weight")[:, :, 0]  # [D, dim]
        out = g.op("MatMul", [summed, g.weight(f"{net.prefix}.{part}.output_proj", proj.T, np.float32)])
        total = out if total is None else g.op("Add", [total, out])
        start += count
    assert total is not None
    return Seq(L.to_compute(g, g.op("Unsqueeze", [total, g.const(i64([1]))])), 1, True)

