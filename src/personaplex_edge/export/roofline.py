"""Bandwidth roofline of one LM frame: weight (and KV cache) bytes read / memory bandwidth.

At batch 1 every frame is a matrix-vector product per weight matrix, so the
frame time is bounded below by the bytes it must read: the temporal
transformer's matrices once, the depformer's per-step matrices once per depth
step, and - since the step graph attends over the whole ring - every slot of
the KV cache. Embedding tables are only gathered (a few rows per frame) and
count as resident memory, not as reads.

Used by `bench/bench_engines.py` (achieved GB/s against the peak, and
`--project` without a GPU) and by `ppx-export engines` (memory budget check).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LMConfig
from .targets import PRECISIONS, Target

FRAME_MS = 80.0  # one Mimi frame at 12.5 Hz
ROOFLINE_EFFICIENCY = 0.85  # the issue's target fraction of the roofline


@dataclass(frozen=True)
class LMParams:
    """Parameter counts of the LM, split into what a frame reads and what stays resident."""

    temporal_read: int  # matrices read once per frame (layers + text head)
    temporal_gathered: int  # embedding tables (resident, a few rows read)
    depformer_step_read: int  # matrices read per depth step
    depformer_gathered: int  # per-step embedding tables, all steps
    depformer_steps: int
    kv_elements: int  # K and V elements of the temporal ring cache, all layers and slots

    @property
    def depformer_read(self) -> int:
        return self.depformer_step_read * self.depformer_steps


def lm_params(lm: LMConfig, depformer_steps: int | None = None) -> LMParams:
    d, h = lm.dim, lm.ffn_hidden
    layer = 4 * d * d + 3 * d * h  # in_proj (q, k, v) + out_proj + gated FFN (in: 2h, out: h)
    temporal = lm.num_layers * layer + d * lm.text_card
    gathered = (lm.text_card + 1 + lm.n_q * (lm.card + 1)) * d
    dd, dh = lm.depformer_dim, lm.depformer_ffn_hidden
    steps = lm.dep_q if depformer_steps is None else depformer_steps
    dep_step = d * dd + lm.depformer_num_layers * (4 * dd * dd + 3 * dd * dh) + dd * lm.card
    dep_gathered = ((lm.text_card + 1) + (steps - 1) * (lm.card + 1)) * dd
    kv = lm.num_layers * 2 * d * lm.context
    return LMParams(temporal, gathered, dep_step, dep_gathered, steps, kv)


def default_depformer_steps(lm: LMConfig) -> int:
    """The export default ('agent'): the depth steps that predict the agent's codebooks."""
    return min(lm.dep_q, lm.n_q // 2)


@dataclass(frozen=True)
class FrameBytes:
    temporal: float
    depformer: float
    kv: float

    @property
    def weights(self) -> float:
        return self.temporal + self.depformer

    @property
    def total(self) -> float:
        return self.weights + self.kv


def kv_bytes_per_element(temporal_precision: str) -> int:
    """The graphs keep the cache in the compute dtype: fp32 builds fp32, everything else 16-bit."""
    return 4 if temporal_precision == "fp32" else 2


def frame_bytes(params: LMParams, temporal: str, depformer: str) -> FrameBytes:
    return FrameBytes(params.temporal_read * PRECISIONS[temporal].bytes_per_weight,
                      params.depformer_read * PRECISIONS[depformer].bytes_per_weight,
                      params.kv_elements * kv_bytes_per_element(temporal))


def resident_bytes(params: LMParams, temporal: str, depformer: str, prefill_engine: bool = True) -> float:
    """Device memory of the LM engines and cache. Embedding tables stay 16-bit; with
    `prefill_engine`, the temporal weights are counted twice (persona compile peak)."""
    high = 4 if temporal == "fp32" else 2
    t = params.temporal_read * PRECISIONS[temporal].bytes_per_weight + params.temporal_gathered * high
    dep = (params.depformer_read * PRECISIONS[depformer].bytes_per_weight
           + params.depformer_gathered * (4 if depformer == "fp32" else 2))
    return t * (2 if prefill_engine else 1) + dep + params.kv_elements * kv_bytes_per_element(temporal)


def roofline_ms(nbytes: float, bandwidth_gbps: float) -> float:
    return nbytes / (bandwidth_gbps * 1e9) * 1e3


def projection_rows(lm: LMConfig, targets: list[Target], depformer_steps: int | None = None) -> list[dict]:
    params = lm_params(lm, default_depformer_steps(lm) if depformer_steps is None else depformer_steps)
    rows = []
    for t in targets:
        fb = frame_bytes(params, t.precision["temporal"], t.precision["depformer"])
        w_ms = roofline_ms(fb.weights, t.bandwidth_gbps)
        all_ms = roofline_ms(fb.total, t.bandwidth_gbps)
        at_eff = all_ms / ROOFLINE_EFFICIENCY
        rows.append({
            "target": t.name, "bandwidth_gbps": t.bandwidth_gbps,
            "temporal": t.precision["temporal"], "depformer": t.precision["depformer"],
            "weights_gb": fb.weights / 1e9, "kv_gb": fb.kv / 1e9,
            "weights_ms": w_ms, "total_ms": all_ms, "at_efficiency_ms": at_eff,
            "rtf": at_eff / FRAME_MS,
            "resident_gb": resident_bytes(params, t.precision["temporal"], t.precision["depformer"]) / 1e9,
            "budget_gb": t.memory_budget_gb, "target_ms": t.frame_target_ms,
        })
    return rows


def format_projection(rows: list[dict], steps: int) -> str:
    head = (f"{'target':<15}{'GB/s':>7}  {'temporal':<9}{'depformer':<10}{'W GB':>6}{'KV GB':>7}"
            f"{'W ms':>7}{'W+KV ms':>9}{'@85% ms':>9}{'RTF':>6}{'mem GB':>8}{'budget':>8}{'LM target':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['target']:<15}{r['bandwidth_gbps']:>7.1f}  {r['temporal']:<9}{r['depformer']:<10}"
                     f"{r['weights_gb']:>6.2f}{r['kv_gb']:>7.2f}{r['weights_ms']:>7.1f}{r['total_ms']:>9.1f}"
                     f"{r['at_efficiency_ms']:>9.1f}{r['rtf']:>6.2f}{r['resident_gb']:>8.1f}"
                     f"{r['budget_gb']:>8.1f}{r['target_ms']:>10.0f}")
    lines.append(f"W: LM weights read per frame (temporal + {steps} depth steps); KV: the full ring cache "
                 f"the step attends over; @85%: W+KV at {ROOFLINE_EFFICIENCY:.0%} of the roofline; "
                 f"RTF: that / {FRAME_MS:.0f} ms; mem: engines + cache at persona compile (step and "
                 "prefill engines both loaded); LM target: the LM frame time in ms each profile aims for "
                 "(its frame_target_ms), to compare with @85%.")
    return "\n".join(lines)
