"""The Mimi codec as two streaming ONNX graphs, one 80 ms frame per call, assembled from its parts.

Encoder graph, one call = one frame:
    pcm float32 [1, 1, frame_samples]  ->  codes int64 [1, num_codebooks]
    SEANet encoder (25 Hz) -> encoder transformer (2 positions) -> conv downsample
    (12.5 Hz) -> split RVQ (semantic `rvq_first` + acoustic `rvq_rest`).
Decoder graph, one call = one frame:
    codes int64 [1, num_codebooks]  ->  pcm float32 [1, 1, frame_samples]
    RVQ decode -> transposed-conv upsample (25 Hz) -> decoder transformer -> SEANet decoder.

Streaming state, all explicit (the graphs are pure functions of their inputs):
  * every causal conv with a receptive field wider than its stride keeps the tail of
    its previous (left-extended) input: `<g>.<conv>.state` (role state_in) ->
    `<g>.<conv>.state_next` (role state_out), [1, C_in, k_eff - stride] where the
    layer runs channel-major, [1, k_eff - stride, C_in] where it runs time-major
    (see seanet.py);
  * every transposed conv keeps the overlap-add tail it has not emitted yet, without
    bias: `<g>.<conv>.partial` [1, C_out, K - S] (time-major [1, K - S, C_out]) ->
    `<g>.<conv>.partial_next`;
  <g> is `enc` or `dec`; <conv> names the upstream layer: `conv{i}` / `convtr{i}` for
  `{encoder,decoder}.model.{i}`, `res{i}.conv{j}` for `model.{i}.block.{j}`, `down` /
  `up` for the resamplers;
  * the downsample conv pads by *replicating* the first sample it ever sees, so it
    carries a flag `enc.down.first` bool [1] (initially True) -> `enc.down.first_next`;
  * each transformer layer has a ring KV cache (`enc.k.{i}` / `enc.v.{i}`, likewise
    `dec.*`) and the graph an offset input (`enc.offset` / `dec.offset`, = 2 * frame index).
`initial_state(spec)` gives the value every state/cache input must hold before the
first call: zeros, except the `first` flag.

KV cache capacity is `context - steps per call` slots (mimi_transformer.py says why);
`g.meta["caches"]` records it.

The parts: seanet.py (the streaming convolutions and SEANet), mimi_transformer.py
(the codec transformer), rvq.py (the split RVQ), mimi_net.py (what they share).
Weights are upstream `MimiModel.state_dict()` entries (numpy, float32); a missing key
raises KeyError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import MimiConfig
from . import layers as L
from .builder import GraphBuilder, TensorSpec
from .mimi_net import MimiNet, steps_per_call
from .mimi_transformer import cache_capacity, projected_transformer
from .rvq import rvq_decode, rvq_encode
from .seanet import (
    Conv,
    check_seanet,
    seanet_decoder,
    seanet_encoder,
    stream_conv,
    stream_conv_transpose,
)

__all__ = ["NONZERO_INITIAL", "build_decoder", "build_encoder", "cache_capacity", "initial_state",
           "steps_per_call"]

# State inputs whose initial value is not all zeros (name -> fill value).
NONZERO_INITIAL = {"enc.down.first": True}


def initial_state(spec: TensorSpec) -> np.ndarray:
    """The value a state or cache input holds before the first call (see module doc)."""
    shape = tuple(int(d) for d in spec.shape)
    if spec.name in NONZERO_INITIAL:
        return np.full(shape, NONZERO_INITIAL[spec.name], dtype=spec.dtype)
    return np.zeros(shape, dtype=spec.dtype)


# -- graphs --------------------------------------------------------------------------


def _meta(cfg: MimiConfig, prefix: str) -> dict:
    return {
        "frame_samples": cfg.frame_samples,
        "sample_rate": cfg.sample_rate,
        "num_codebooks": cfg.num_codebooks,
        "cardinality": cfg.quantizer.bins,
        # Ring KV caches: `capacity` slots; each call appends `steps_per_call` entries at
        # slots (offset + t) % capacity; offset advances by steps_per_call per call.
        "caches": {"capacity": cache_capacity(cfg), "steps_per_call": steps_per_call(cfg),
                   "context": cfg.transformer.context},
        # States whose initial value is not zeros (all others, caches included, start at 0).
        "nonzero_initial_states": {k: v for k, v in NONZERO_INITIAL.items() if k.startswith(prefix + ".")},
    }


def _frame_check(cfg: MimiConfig) -> None:
    check_seanet(cfg)
    if cfg.frame_samples % cfg.seanet.hop_length or steps_per_call(cfg) * cfg.seanet.hop_length != cfg.frame_samples:
        raise ValueError("frame_samples must be hop_length * (encoder frame rate / frame rate)")


def build_encoder(g: GraphBuilder, weights: Mapping[str, np.ndarray], cfg: MimiConfig) -> None:
    """One frame of pcm float32 [1, channels, frame_samples] -> codes int64 [1, num_codebooks]."""
    _frame_check(cfg)
    net = MimiNet(g, weights, "enc")
    pcm = g.input("pcm", np.float32, (1, cfg.channels, cfg.frame_samples),
                  doc=f"{cfg.frame_samples} samples at {cfg.sample_rate} Hz, in [-1, 1]")
    x = seanet_encoder(net, L.to_compute(g, pcm), cfg)
    x = projected_transformer(net, x, "encoder_transformer", cfg)
    # Downsample 25 -> 12.5 Hz: a learnt causal conv (kernel 2r, stride r) padded by
    # replicating the very first sample (upstream pad_mode="replicate").
    first = g.input("enc.down.first", np.bool_, (1,), role="state_in", pair="enc.down.first_next",
                    doc="True before the first call (initial value True, not zero): the "
                        "downsample conv then fills its tail with copies of its first input sample")
    x = stream_conv(net, x, Conv("downsample.conv.conv.conv", "down", stride=steps_per_call(cfg),
                                  bias=False), first=first)
    g.output(g.const(np.array([False])), "enc.down.first_next", np.bool_, (1,), role="state_out",
             pair="enc.down.first")
    codes = rvq_encode(net, x, cfg)
    g.output(codes, "codes", np.int64, (1, cfg.num_codebooks),
             doc="codebook indices of this frame: semantic first, then acoustic")
    g.meta.update(_meta(cfg, net.prefix))


def build_decoder(g: GraphBuilder, weights: Mapping[str, np.ndarray], cfg: MimiConfig) -> None:
    """codes int64 [1, num_codebooks] -> one frame of pcm float32 [1, channels, frame_samples]."""
    _frame_check(cfg)
    net = MimiNet(g, weights, "dec")
    codes = g.input("codes", np.int64, (1, cfg.num_codebooks),
                    doc=f"codebook indices in [0, {cfg.quantizer.bins}): semantic first, then acoustic")
    x = rvq_decode(net, codes, cfg)
    # Upsample 12.5 -> 25 Hz: upstream's learnt transposed conv is depthwise
    # (its `upsample_channel_wise_bug`), kernel 2r, stride r, no bias.
    x = stream_conv_transpose(net, x, Conv("upsample.convtr.convtr.convtr", "up", stride=steps_per_call(cfg),
                                            groups=cfg.seanet.dimension, bias=False))
    x = projected_transformer(net, x, "decoder_transformer", cfg)
    pcm = seanet_decoder(net, x, cfg)
    assert pcm.length == cfg.frame_samples and not pcm.time_major, pcm
    g.output(L.to_f32(g, pcm.value), "pcm", np.float32, (1, cfg.channels, cfg.frame_samples),
             doc=f"{cfg.frame_samples} samples at {cfg.sample_rate} Hz")
    g.meta.update(_meta(cfg, net.prefix))
