"""Top-k sampling inside the graph, shared by the temporal step and the depformer.

Upstream Moshi samples with `softmax(logits / temperature)`, keeps the `top_k`
largest probabilities and draws one of them by an *exponential race*:
``argmax(p_i / q_i)`` with ``q_i ~ Exp(1)``. The graph does the same, with the
Exp(1) noise supplied by the caller (one value per vocabulary entry), so the
graph stays deterministic and the runtime owns the random generator.

TensorRT 10.3 wants a build-time K for TopK, so the graph always takes the
``K = min(k_max, vocab)`` largest probabilities and reads the k-th largest one
as a threshold; entries below it are dropped before the race. ``top_k`` is a
runtime input: values above K are clamped to K and ``top_k <= 0`` (upstream's
"no top-k") also means K.

Greedy mode: ``top_k == 1`` or ``temperature <= 0`` returns ``argmax(logits)``
exactly, whatever the noise (upstream's ``use_sampling=False`` / ``temp <= 0``).
"""

from __future__ import annotations

import numpy as np

from .builder import GraphBuilder

# Exp(1) noise can be exactly 0; the race divides by max(noise, NOISE_FLOOR).
NOISE_FLOOR = 1e-30


def sample_top_k(g: GraphBuilder, logits: str, temperature: str, top_k: str, noise: str,
                 k_max: int, vocab: int) -> str:
    """Sample one token per row of `logits` [N, vocab] (float32).

    temperature: float32 [1]; top_k: int64 [1]; noise: float32 [N, vocab] of Exp(1)
    draws. Returns int64 [N].
    """
    k_fixed = min(k_max, vocab)
    probs = g.op("Softmax", [g.op("Div", [logits, temperature])], axis=-1)
    values, _ = g.op("TopK", [probs, g.const(np.array([k_fixed], np.int64))], n_out=2, axis=-1,
                     largest=1, sorted=1)
    k = _clamped_top_k(g, top_k, k_fixed)
    threshold = g.op("Gather", [values, g.op("Sub", [k, g.const(np.array([1], np.int64))])],
                     axis=-1)  # [N, 1]: the k-th largest probability
    kept = g.op("Where", [g.op("GreaterOrEqual", [probs, threshold]), probs,
                          g.const(np.float32(0.0))])
    floor = g.op("Max", [noise, g.const(np.float32(NOISE_FLOOR))])
    sampled = g.op("ArgMax", [g.op("Div", [kept, floor])], axis=-1, keepdims=0)
    greedy = g.op("ArgMax", [logits], axis=-1, keepdims=0)
    is_greedy = g.op("Or", [g.op("Equal", [top_k, g.const(np.array([1], np.int64))]),
                            g.op("LessOrEqual", [temperature, g.const(np.array([0.0], np.float32))])])
    return g.op("Where", [is_greedy, greedy, sampled])


def _clamped_top_k(g: GraphBuilder, top_k: str, k_fixed: int) -> str:
    """top_k [1] -> [1] in [1, k_fixed]; top_k <= 0 means k_fixed."""
    big = g.const(np.array([k_fixed], np.int64))
    k = g.op("Where", [g.op("LessOrEqual", [top_k, g.const(np.array([0], np.int64))]), big, top_k])
    return g.op("Max", [g.op("Min", [k, big]), g.const(np.array([1], np.int64))])


def reference_sample_top_k(logits: np.ndarray, temperature: float, top_k: int, noise: np.ndarray,
                           k_max: int) -> np.ndarray:
    """Numpy twin of `sample_top_k` (for tests and for checking a runtime's sampler)."""
    logits = np.asarray(logits, np.float32)
    if top_k == 1 or temperature <= 0:
        return logits.argmax(-1)
    k_fixed = min(k_max, logits.shape[-1])
    k = k_fixed if top_k <= 0 else min(top_k, k_fixed)
    z = logits / np.float32(temperature)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    threshold = -np.sort(-probs, axis=-1)[..., k - 1:k]
    kept = np.where(probs >= threshold, probs, 0.0)
    return (kept / np.maximum(noise, NOISE_FLOOR)).argmax(-1)
