"""The verify comparisons: per-precision pass thresholds (ORDER, THRESHOLDS) and the metrics they bound."""

from __future__ import annotations

import math

import numpy as np

SNR_CAP_DB = 200.0  # identical outputs: a finite number JSON can hold
ORDER = ("fp32", "fp16", "bf16", "int8", "int8-sq", "fp8", "int4-awq")  # increasing error

# Pass thresholds, by precision (of the network checked; end to end: the build's lowest).
#
# Derived by bench/verify_thresholds.py (issue 11: fixed bounds from one seed failed good
# builds of other seeds): tiny synthetic model, seeds 0-7, each quantized from its fp16
# build (and seeds 0-1 also from fp32) with the CLI's defaults, verified on the shipped
# calibration speech and on held-out speech (tests/data), ORT CPU: 20 runs per precision
# (fp16: its build vs the fp32 one, 4 runs). Observed min / median:
#              temporal text              depformer audio            prefill   teacher-forced e2e
#              agree  cos mean  cos min   agree  cos mean  cos min   cos min   text       audio
#   fp16       1.00   1.0000    1.0000    0.9975 1.0000    1.0000    1.0000    0.996/1.0  0.99/1.0
#   int8       0.94   0.9998    0.9994    0.949  0.9998    0.9979    0.9995    0.95/0.98  0.93/0.95
#   int8-sq    0.94   0.9995    0.976     0.93   0.9992    0.939     0.9994    0.95/0.97  0.92/0.93
#   fp8        0.82   0.9960    0.9875    0.79   0.9954    0.953     0.9931    0.83/0.89  0.73/0.78
#   int4-awq   0.65   0.9819    0.947     0.74   0.9893    0.897     0.947     0.78/0.89  0.65/0.70
#   (medians, agree: int8 0.98/0.96, int8-sq 0.96/0.95, fp8 0.89/0.83, int4-awq 0.76/0.76)
#   scrambled weights (controls, 4 runs): the scrambled network's agreement <= 0.05 (end to
#   end too), its logit cosine <= 0.01.
# Rule: bound = min - max(2 * (median - min), (1 - min) / 2) - the observed lower
# half-spread twice more below the worst run (~4 sigma below the median), at least half the
# worst error again - rounded down, lowest over the metrics sharing a key, never above a
# more precise precision's bound. A threshold is then min(bound, the reasoned bound below):
# the sweep only loosens (a trained 7B cannot be measured here, and its deeper stack keeps
# the reasoned cosine bounds honest); it moved int8 token agreement 0.90 -> 0.87, int8-sq
# cos min 0.95 -> 0.87 (seed 7 measured 0.939), fp8 token agreement 0.75 -> 0.66 and cos min
# 0.93 -> 0.87, int4-awq token agreement 0.65 -> 0.43 (seed 4: 0.651), cos mean 0.97 -> 0.967,
# cos min 0.85 -> 0.84 and prefill 0.95 -> 0.904 (seed 5: 0.947). End to end (teacher-forced,
# new) is the rule's bound, capped at the precision's token-agreement bound (the composition
# of the two networks agrees no better than each); fp32 and bf16 are not measured: fp32
# takes fp16's bounds, bf16 allows 8x fp16's worst end-to-end error (0.032 / 0.076), 0.90.
#
# Random weights make the worst case for token agreement: the logits are nearly flat, so
# top-1 margins are tiny and the smallest perturbation flips an argmax (int8 keeps a 0.9998
# cosine yet flips 5% of the 2048-way audio argmaxes). A trained 7B has peaked distributions
# (most frames one clear token, text mostly PAD while listening): agreement there is higher
# at the same cosine, so the cosine bounds are the quality gate; the agreement bounds only
# keep good tiny builds passing while a broken network (agreement ~0) still fails.
# The reasoned bounds:
# - fp32 (same build on another backend, e.g. TensorRT FP32 vs ORT CPU): only summation order
#   differs; cosine >= 0.9999, agreement >= 0.99 allows a flipped near-tie.
# - fp16: ~1e-3 relative error per layer -> cosine >= 0.999; Mimi round trip >= 30 dB (the
#   tiny fp16 Mimi measures 78 dB; a deep fp16 conv stack keeps ~40 dB).
# - bf16 (TensorRT engines only; not measured here): 8 mantissa bits, ~8x fp16's rounding
#   -> cosine 0.998 / 0.98, Mimi >= 25 dB.
# - int8 (weight-only, per output channel): quantization noise ~0.3% of each channel's range
#   -> cosine >= 0.999 mean, >= 0.99 worst frame. Published W8A16 results on 7B LLMs are
#   within noise of FP16, so a trained model sits far above these bounds.
# - int8-sq (W8A8 after smoothing): activations add per-tensor rounding -> 0.995 mean
#   (SmoothQuant W8A8 on 7B LLMs keeps perplexity within ~1% of FP16).
# - fp8 (E4M3, 3 mantissa bits: up to 6% relative rounding on weights and activations)
#   -> 0.99 mean; FP8 W8A8 on trained LLMs is near lossless, higher there.
# - int4-awq (16 levels per 128-weight block): 0.97 mean; random weights have no salient
#   channels for AWQ to protect, so the tiny model is a pessimistic case.
# - Mimi is kept at the build's precision by `quantize`; if quantized (--network), its code
#   agreement and round-trip SNR bounds follow the same scale (codes flip at Voronoi borders).
# - Free-running agreement (informational) has no bound: over the same quantized runs it
#   spans 0.12-0.76 (text) and 0.09-0.36 (audio), every precision alike (seed 3's int8:
#   0.14, the failure), so it cannot tell a good build from a bad one.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"code_agreement": 0.99, "snr_db": 60.0, "token_agreement": 0.99, "cos_mean": 0.9999,
             "cos_min": 0.999, "prefill_cos_min": 0.9999, "e2e_text": 0.98, "e2e_audio": 0.97},
    "fp16": {"code_agreement": 0.97, "snr_db": 30.0, "token_agreement": 0.97, "cos_mean": 0.999,
             "cos_min": 0.99, "prefill_cos_min": 0.999, "e2e_text": 0.97, "e2e_audio": 0.97},
    "bf16": {"code_agreement": 0.95, "snr_db": 25.0, "token_agreement": 0.95, "cos_mean": 0.998,
             "cos_min": 0.98, "prefill_cos_min": 0.998, "e2e_text": 0.9, "e2e_audio": 0.9},
    "int8": {"code_agreement": 0.9, "snr_db": 20.0, "token_agreement": 0.87, "cos_mean": 0.999,
             "cos_min": 0.99, "prefill_cos_min": 0.995, "e2e_text": 0.87, "e2e_audio": 0.87},
    "int8-sq": {"code_agreement": 0.85, "snr_db": 15.0, "token_agreement": 0.85, "cos_mean": 0.995,
                "cos_min": 0.87, "prefill_cos_min": 0.99, "e2e_text": 0.85, "e2e_audio": 0.85},
    "fp8": {"code_agreement": 0.85, "snr_db": 15.0, "token_agreement": 0.66, "cos_mean": 0.99,
            "cos_min": 0.87, "prefill_cos_min": 0.989, "e2e_text": 0.66, "e2e_audio": 0.59},
    "int4-awq": {"code_agreement": 0.7, "snr_db": 10.0, "token_agreement": 0.43, "cos_mean": 0.967,
                 "cos_min": 0.84, "prefill_cos_min": 0.904, "e2e_text": 0.43, "e2e_audio": 0.43},
}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where((a == b).all(-1), 1.0, 0.0))


def snr_db(reference: np.ndarray, tested: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(reference, np.float64) - tested) ** 2))
    signal = float(np.sum(np.asarray(reference, np.float64) ** 2))
    if noise == 0.0:
        return SNR_CAP_DB
    return min(10.0 * math.log10(max(signal, 1e-30) / noise), SNR_CAP_DB)

