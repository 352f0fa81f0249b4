"""Mimi codec as two streaming ONNX graphs: one 80 ms frame per call.

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
    (see "streaming convolutions" below);
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

KV cache capacity: upstream's `RingKVCache` has `context` slots and writes a step's
keys *before* attending, so with T steps per call the first query of a call has lost
the key `context - 1` steps back (the `delta < context` mask would allow it). The
graph reproduces that exactly with a ring of `context - T` slots holding the keys of
earlier calls, plus this call's keys attended to directly. `g.meta["caches"]` records it.

Weights are upstream `MimiModel.state_dict()` entries (numpy, float32); a missing key
raises KeyError naming it. Codebooks are derived as upstream does at load time
(`embedding_sum / clamp(cluster_usage, epsilon)`); codebook search and lookup run in
float32 even in float16 graphs, since nearest-neighbour choices are precision-sensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import MimiConfig, MimiTransformerConfig
from . import layers as L
from .builder import GraphBuilder, TensorSpec

CODEBOOK_EPSILON = 1e-5  # upstream EuclideanCodebook's default epsilon
ELU_ALPHA = 1.0
LAYER_NORM_EPS = 1e-5  # upstream create_norm_fn("layer_norm")
# State inputs whose initial value is not all zeros (name -> fill value).
NONZERO_INITIAL = {"enc.down.first": True}


def initial_state(spec: TensorSpec) -> np.ndarray:
    """The value a state or cache input holds before the first call (see module doc)."""
    shape = tuple(int(d) for d in spec.shape)
    if spec.name in NONZERO_INITIAL:
        return np.full(shape, NONZERO_INITIAL[spec.name], dtype=spec.dtype)
    return np.zeros(shape, dtype=spec.dtype)


def cache_capacity(cfg: MimiConfig) -> int:
    """Ring slots per KV cache: `context - steps_per_call` (see module doc)."""
    steps = steps_per_call(cfg)
    if cfg.transformer.context <= steps:
        raise ValueError(f"transformer context {cfg.transformer.context} must exceed {steps}")
    return cfg.transformer.context - steps


def steps_per_call(cfg: MimiConfig) -> int:
    """Transformer positions per 80 ms frame (encoder frame rate / frame rate = 2)."""
    return int(round(cfg.encoder_frame_rate / cfg.frame_rate))


# -- plumbing ------------------------------------------------------------------


@dataclass
class _Net:
    """What every block needs: the builder, the weights, and this graph's name prefix."""

    g: GraphBuilder
    weights: Mapping[str, np.ndarray]
    prefix: str  # "enc" or "dec"

    def w(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise KeyError(f"Mimi weights: missing {key!r}")
        return np.asarray(self.weights[key], dtype=np.float32)

    @property
    def dtype(self) -> np.dtype:
        return self.g.weight_dtype

    def state(self, name: str, shape: tuple[int, ...], doc: str = "") -> str:
        """Declare state input `<prefix>.<name>` (compute dtype), paired with `<...>_next`."""
        full = f"{self.prefix}.{name}"
        return self.g.input(full, self.dtype, shape, role="state_in", pair=full + "_next", doc=doc)

    def state_out(self, value: str, name: str, shape: tuple[int, ...]) -> None:
        full = f"{self.prefix}.{name}"
        self.g.output(value, full + "_next", self.dtype, shape, role="state_out", pair=full)


def _i64(values: list[int] | int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# -- streaming convolutions -----------------------------------------------------
#
# Two formulations, chosen per layer. Where the sequence is long (high sample rates,
# few channels) a layer is an ONNX Conv / ConvTranspose on [1, C, T] ("channel-major").
# Where it is short (<= MATMUL_MAX_STEPS steps) the layer is weight-bound -- 2 to 16
# steps against up to 8M parameters -- so it is a MatMul on [1, T, C] ("time-major")
# over explicitly gathered frames: one GEMM with pre-packed weights, no im2col, and
# the transformer in between needs no transposes. State tails follow the layout:
# channel-major [1, C, tail], time-major [1, tail, C].

MATMUL_MAX_STEPS = 16


@dataclass(frozen=True)
class _Conv:
    """One upstream StreamingConv1d / StreamingConvTranspose1d, as used here."""

    key: str  # upstream weight prefix, e.g. "encoder.model.3.conv.conv"
    name: str  # state name inside the graph, e.g. "conv3"
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class _Seq:
    """A sequence value with its static length and layout."""

    value: str
    length: int
    time_major: bool


def _layout(g: GraphBuilder, x: _Seq, time_major: bool) -> _Seq:
    if x.time_major == time_major:
        return x
    return _Seq(g.op("Transpose", [x.value], perm=[0, 2, 1]), x.length, time_major)


def _slice(g: GraphBuilder, x: str, axis: int, start: int, end: int) -> str:
    return g.op("Slice", [x, g.const(_i64([start])), g.const(_i64([end])), g.const(_i64([axis]))])


def _elu(g: GraphBuilder, x: _Seq) -> _Seq:
    # A relu/exp/min decomposition runs a lone Elu 2x faster on ONNX Runtime, but
    # measured no faster over whole frames; the plain op is clearer and TensorRT-native.
    return _Seq(g.op("Elu", [x.value], alpha=ELU_ALPHA), x.length, x.time_major)


def stream_conv(net: _Net, x: _Seq, conv: _Conv, first: str | None = None) -> _Seq:
    """Causal streaming Conv1d (upstream StreamingConv1d) over one call's input.

    The conv sees its previous input tail (state) followed by this call's input; the
    new tail is the last `k_eff - stride` samples of that concatenation. With `first`
    (a bool [1] value) the tail is first replaced by copies of x's first sample
    (upstream pad_mode="replicate").
    """
    g = net.g
    weight = net.w(conv.key + ".weight")  # [C_out, C_in / groups, K]
    kernel = (weight.shape[2] - 1) * conv.dilation + 1
    tail = kernel - conv.stride
    if x.length % conv.stride:
        raise ValueError(f"{conv.key}: {x.length} steps do not divide by stride {conv.stride}")
    out_len = x.length // conv.stride
    bias = net.w(conv.key + ".bias") if conv.bias else None
    time_major = out_len <= MATMUL_MAX_STEPS and conv.groups == 1
    x = _layout(g, x, time_major)
    axis = 1 if time_major else 2
    full = x.value
    if tail > 0:
        c_in = weight.shape[1] * conv.groups
        shape = (1, tail, c_in) if time_major else (1, c_in, tail)
        doc = f"input tail of {conv.key}: {tail} steps, {'time' if time_major else 'channel'}-major"
        prev = net.state(f"{conv.name}.state", shape, doc=doc)
        if first is not None:
            prev = g.op("Where", [first, _slice(g, x.value, axis, 0, 1), prev])
        full = g.op("Concat", [prev, x.value], axis=axis)
        net.state_out(_slice(g, full, axis, x.length, x.length + tail), f"{conv.name}.state", shape)
    if time_major:
        y = _conv_matmul(net, full, x.length + tail, out_len, weight, conv)
        if bias is not None:
            y = g.op("Add", [y, g.weight(f"{net.prefix}.{conv.name}.bias", bias)])
        return _Seq(y, out_len, True)
    inputs = [full, g.weight(f"{net.prefix}.{conv.name}.weight", weight)]
    if bias is not None:
        inputs.append(g.weight(f"{net.prefix}.{conv.name}.bias", bias))
    y = g.op("Conv", inputs, kernel_shape=[weight.shape[2]], strides=[conv.stride],
             dilations=[conv.dilation], group=conv.groups, pads=[0, 0])
    return _Seq(y, out_len, False)


def _conv_matmul(net: _Net, full: str, full_len: int, out_len: int, weight: np.ndarray,
                 conv: _Conv) -> str:
    """Conv1d as one MatMul on time-major `full` [1, full_len, C_in] (tail included).

    Output step j reads input rows j*stride + tap*dilation. With stride s, rows are
    grouped into blocks of s (a free reshape), so frame j is blocks j .. j + K/s - 1
    side by side: a frame's layout is (tap, channel), matching the weight rows.
    """
    g = net.g
    c_out, c_in, k = weight.shape
    stride, dilation = conv.stride, conv.dilation
    if stride > 1 and (k % stride or dilation != 1):
        raise NotImplementedError(f"{conv.key}: strided time-major conv needs kernel % stride == 0")
    blocks = full
    if stride > 1:
        blocks = g.op("Reshape", [full, g.const(_i64([1, full_len // stride, stride * c_in]))])
    taps = k // stride
    if taps == 1 and full_len == out_len * stride:
        frames = blocks
    else:
        parts = [_slice(g, blocks, 1, b * dilation, b * dilation + out_len) for b in range(taps)]
        frames = g.op("Concat", parts, axis=2) if taps > 1 else parts[0]
    matrix = weight.transpose(2, 1, 0).reshape(k * c_in, c_out)  # rows (tap, channel)
    return g.op("MatMul", [frames, g.weight(f"{net.prefix}.{conv.name}.weight", matrix)],
                name=f"{net.prefix}_{conv.name}")


def stream_conv_transpose(net: _Net, x: _Seq, conv: _Conv) -> _Seq:
    """Streaming ConvTranspose1d (upstream StreamingConvTranspose1d) over one call's input.

    As upstream: the full transposed conv output (bias included) gets the previous
    call's unfinished tail added to its head; the last K - S samples are held back
    (minus bias, which the next call's output already carries) as the new tail.
    """
    g = net.g
    weight = net.w(conv.key + ".weight")  # [C_in, C_out / groups, K], ONNX's layout too
    kernel, stride = weight.shape[2], conv.stride
    c_out = weight.shape[1] * conv.groups
    bias = net.w(conv.key + ".bias") if conv.bias else None
    if kernel == 2 * stride and x.length <= MATMUL_MAX_STEPS:
        return _convtr_matmul(net, _layout(g, x, True), conv, weight, bias)
    x = _layout(g, x, False)
    tail = kernel - stride
    out_len = x.length * stride
    inputs = [x.value, g.weight(f"{net.prefix}.{conv.name}.weight", weight)]
    if bias is not None:
        inputs.append(g.weight(f"{net.prefix}.{conv.name}.bias", bias))
    y = g.op("ConvTranspose", inputs, kernel_shape=[kernel], strides=[stride], group=conv.groups)
    if tail <= 0:
        return _Seq(y, out_len, False)
    doc = f"overlap-add tail of {conv.key} ({tail} steps, channel-major, bias excluded)"
    partial = net.state(f"{conv.name}.partial", (1, c_out, tail), doc=doc)
    if out_len >= tail:  # head and tail do not overlap: add into the head only
        head = g.op("Add", [_slice(g, y, 2, 0, tail), partial])
        out = g.op("Concat", [head, _slice(g, y, 2, tail, out_len)], axis=2) if out_len > tail else head
        rest = _slice(g, y, 2, out_len, out_len + tail)
    else:  # short input: add over a zero-padded tail, then split
        y = g.op("Add", [y, g.op("Pad", [partial, g.const(_i64([0, 0, 0, 0, 0, out_len]))])])
        out = _slice(g, y, 2, 0, out_len)
        rest = _slice(g, y, 2, out_len, out_len + tail)
    if bias is not None:
        col = g.weight(f"{net.prefix}.{conv.name}.bias_col", bias.reshape(-1, 1))
        rest = g.op("Sub", [rest, col])
    net.state_out(rest, f"{conv.name}.partial", (1, c_out, tail))
    return _Seq(out, out_len, False)


def _convtr_matmul(net: _Net, x: _Seq, conv: _Conv, weight: np.ndarray, bias: np.ndarray | None) -> _Seq:
    """Transposed conv with K = 2S on time-major x [1, T, C_in]: out [1, T*S, C_out].

    Input step t contributes taps 0..S-1 to output block t and taps S..2S-1 to block
    t + 1, so block t = first half of t + second half of t - 1 (the previous call's
    last second half, the state, for t = 0); the last second half is the new state.
    """
    g = net.g
    c_in, per_group, kernel = weight.shape
    stride, c_out = conv.stride, per_group * conv.groups
    half = stride * c_out
    if conv.groups == 1:
        matrix = weight.transpose(0, 2, 1).reshape(c_in, kernel * c_out)  # cols (tap, channel)
        z = g.op("MatMul", [x.value, g.weight(f"{net.prefix}.{conv.name}.weight", matrix)],
                 name=f"{net.prefix}_{conv.name}")
    elif conv.groups == c_in == c_out:  # depthwise: one product per (tap, channel)
        taps = weight[:, 0, :].T.copy()  # [K, C]
        z = g.op("Mul", [g.op("Unsqueeze", [x.value, g.const(_i64([2]))]),
                         g.weight(f"{net.prefix}.{conv.name}.weight", taps)])
        z = g.op("Reshape", [z, g.const(_i64([1, x.length, kernel * c_out]))])
    else:
        raise NotImplementedError(f"{conv.key}: grouped transposed conv")
    first, second = g.op("Split", [z, g.const(_i64([half, half]))], n_out=2, axis=2)
    doc = f"overlap-add tail of {conv.key} ({stride} steps, time-major, bias excluded)"
    partial = net.state(f"{conv.name}.partial", (1, stride, c_out), doc=doc)
    carried = g.op("Reshape", [partial, g.const(_i64([1, 1, half]))])
    if x.length > 1:
        carried = g.op("Concat", [carried, _slice(g, second, 1, 0, x.length - 1)], axis=1)
    out = g.op("Add", [first, carried])
    rest = _slice(g, second, 1, x.length - 1, x.length)
    if bias is not None:
        tiled = g.weight(f"{net.prefix}.{conv.name}.bias", np.tile(bias, stride))
        out = g.op("Add", [out, tiled])
        # Upstream keeps (tail + bias) - bias, which is not always the tail bit for bit.
        rest = g.op("Sub", [g.op("Add", [rest, tiled]), tiled])
    net.state_out(g.op("Reshape", [rest, g.const(_i64([1, stride, c_out]))]), f"{conv.name}.partial",
                  (1, stride, c_out))
    out = g.op("Reshape", [out, g.const(_i64([1, x.length * stride, c_out]))])
    return _Seq(out, x.length * stride, True)


def _resblock(net: _Net, x: _Seq, key: str, name: str, dilation: int) -> _Seq:
    """SEANet residual block (true skip): x + conv1x1(elu(conv_k(elu(x))))."""
    x = _layout(net.g, x, x.length <= MATMUL_MAX_STEPS)
    h = stream_conv(net, _elu(net.g, x), _Conv(f"{key}.block.1.conv.conv", f"{name}.conv1", dilation=dilation))
    h = stream_conv(net, _elu(net.g, h), _Conv(f"{key}.block.3.conv.conv", f"{name}.conv3"))
    h = _layout(net.g, h, x.time_major)
    return _Seq(net.g.op("Add", [x.value, h.value]), x.length, x.time_major)


# -- SEANet ----------------------------------------------------------------------


def _check_seanet(cfg: MimiConfig) -> None:
    s = cfg.seanet
    if not s.true_skip or s.norm != "none" or s.activation != "ELU" or not s.causal:
        raise ValueError("Mimi graphs need a causal SEANet with ELU, true_skip and norm 'none'")


def seanet_encoder(net: _Net, pcm: str, cfg: MimiConfig) -> _Seq:
    """pcm [1, channels, frame_samples] -> latent (frames at 25 Hz, `dimension` channels)."""
    s = cfg.seanet
    x = stream_conv(net, _Seq(pcm, cfg.frame_samples, False), _Conv("encoder.model.0.conv.conv", "conv0"))
    idx = 1
    for ratio in reversed(s.ratios):
        for j in range(s.n_residual_layers):
            x = _resblock(net, x, f"encoder.model.{idx}", f"res{idx}", s.dilation_base ** j)
            idx += 1
        x = stream_conv(net, _elu(net.g, x), _Conv(f"encoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}",
                                                   stride=ratio))
        idx += 2
    return stream_conv(net, _elu(net.g, x), _Conv(f"encoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}"))


def seanet_decoder(net: _Net, x: _Seq, cfg: MimiConfig) -> _Seq:
    """latent (frames at 25 Hz) -> pcm, channel-major [1, channels, frame_samples]."""
    s = cfg.seanet
    x = stream_conv(net, x, _Conv("decoder.model.0.conv.conv", "conv0"))
    idx = 1
    for ratio in s.ratios:
        x = stream_conv_transpose(net, _elu(net.g, x), _Conv(f"decoder.model.{idx + 1}.convtr.convtr",
                                                             f"convtr{idx + 1}", stride=ratio))
        idx += 2
        for j in range(s.n_residual_layers):
            x = _resblock(net, x, f"decoder.model.{idx}", f"res{idx}", s.dilation_base ** j)
            idx += 1
    x = stream_conv(net, _elu(net.g, x), _Conv(f"decoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}"))
    return _layout(net.g, x, False)


# -- transformer -----------------------------------------------------------------


def _check_transformer(t: MimiTransformerConfig) -> None:
    if not t.causal or t.gating != "none" or t.norm != "layer_norm" or t.positional_embedding != "rope":
        raise ValueError("Mimi graphs need a causal rope transformer with layer_norm and no gating")
    if len(t.output_dimensions) != 1:
        raise ValueError("Mimi uses exactly one transformer output")


def _rope_tables(g: GraphBuilder, offset: str, steps: int, head_dim: int, max_period: float
                 ) -> tuple[str, str]:
    """Full-width float32 tables [T, D] for interleaved RoPE: cos repeated per pair, and
    sin signed (-sin, +sin) per pair, so rope(x) = x * cos + pair_swap(x) * sin."""
    freqs = np.exp(np.arange(head_dim // 2, dtype=np.float32) * np.float32(-np.log(max_period) * 2 / head_dim))
    positions = L.cast(g, g.op("Add", [offset, g.const(np.arange(steps, dtype=np.int64))]), np.float32)
    angles = g.op("Mul", [g.op("Unsqueeze", [positions, g.const(_i64([1]))]),
                          g.const(np.repeat(freqs.astype(np.float32), 2))])  # [T, D]
    sign = g.const(np.tile(np.array([-1.0, 1.0], np.float32), head_dim // 2))
    return g.op("Cos", [angles]), g.op("Mul", [g.op("Sin", [angles]), sign])


def _apply_rope(g: GraphBuilder, x: str, rope: tuple[str, str], head_dim: int) -> str:
    """Interleaved RoPE on x [1, H, T, D], in float32 as upstream:
    (r, i) -> (r cos - i sin, r sin + i cos), the swap (r, i) -> (i, r) being a Gather."""
    cos, sin = rope
    xf = L.to_f32(g, x)
    swap = np.arange(head_dim).reshape(-1, 2)[:, ::-1].reshape(-1)
    swapped = g.op("Gather", [xf, g.const(swap.astype(np.int64))], axis=3)
    out = g.op("Add", [g.op("Mul", [xf, cos]), g.op("Mul", [swapped, sin])])
    return L.to_compute(g, out)


def _transformer_layer(net: _Net, x: str, key: str, i: int, t: MimiTransformerConfig,
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
    qk, v = g.op("Split", [qkv, g.const(_i64([2 * heads, heads]))], n_out=2, axis=1)
    q, k = g.op("Split", [_apply_rope(g, qk, rope, head_dim), g.const(_i64([heads, heads]))],
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
    ff = L.linear(g, _gelu(g, L.linear(g, h, f"{name}.linear1", net.w(f"{key}.linear1.weight"))),
                  f"{name}.linear2", net.w(f"{key}.linear2.weight"))
    return g.op("Add", [x, g.op("Mul", [ff, g.weight(f"{name}.ls2", net.w(f"{key}.layer_scale_2.scale"))])])


def _gelu(g: GraphBuilder, x: str) -> str:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in the form ONNX Runtime fuses into one op."""
    erf = g.op("Erf", [g.op("Div", [x, g.const(np.float32(np.sqrt(2.0)), g.weight_dtype)])])
    one = g.const(np.float32(1.0), g.weight_dtype)
    half = g.const(np.float32(0.5), g.weight_dtype)
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one])]), half])


def projected_transformer(net: _Net, x: _Seq, key: str, cfg: MimiConfig) -> _Seq:
    """Upstream ProjectedTransformer over one call's steps, time-major [1, T, C] -> [1, T, C']."""
    t = cfg.transformer
    _check_transformer(t)
    g = net.g
    steps, capacity = steps_per_call(cfg), cache_capacity(cfg)
    assert x.length == steps, (x.length, steps)
    h = _layout(g, x, True).value
    if t.d_model != t.input_dimension:
        h = L.linear(g, h, f"{net.prefix}.input_proj", net.w(f"{key}.input_proj.weight"))
    offset = g.input(f"{net.prefix}.offset", np.int64, (1,), role="offset",
                     doc=f"position of this call's first step: {steps} * frame index")
    masks = L.ring_cache_mask(g, offset, g.const(np.array(steps, np.int64)), capacity, t.context)
    head_dim = t.d_model // t.num_heads
    rope = _rope_tables(g, offset, steps, head_dim, t.max_period)
    for i in range(t.num_layers):
        h = _transformer_layer(net, h, f"{key}.transformer.layers.{i}", i, t, rope, masks, steps, capacity)
    if t.d_model != t.output_dimensions[0]:
        h = L.linear(g, h, f"{net.prefix}.output_proj", net.w(f"{key}.output_projs.0.weight"))
    return _Seq(h, steps, True)


# -- quantizer ---------------------------------------------------------------------


def codebook(net: _Net, key: str) -> np.ndarray:
    """Centroids [bins, dim] as upstream derives them: embedding_sum / clamp(usage, eps)."""
    usage = np.maximum(net.w(f"{key}._codebook.cluster_usage"), np.float32(CODEBOOK_EPSILON))
    return (net.w(f"{key}._codebook.embedding_sum") / usage[:, None]).astype(np.float32)


def _rvq_parts(cfg: MimiConfig) -> list[tuple[str, int]]:
    """(upstream quantizer name, codebooks used) in code order: 1 semantic, then acoustic."""
    rest = cfg.num_codebooks - 1
    return [("rvq_first", 1)] + ([("rvq_rest", rest)] if rest > 0 else [])


def rvq_encode(net: _Net, latent: _Seq, cfg: MimiConfig) -> str:
    """latent (one step, compute dtype) -> codes int64 [1, num_codebooks]."""
    g = net.g
    row = L.to_f32(g, g.op("Reshape", [latent.value, g.const(_i64([1, -1]))]))  # [1, D]
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


def _nearest(net: _Net, residual: str, centroids: np.ndarray, name: str) -> tuple[str, str]:
    """Nearest centroid to residual [1, dim] by euclidean distance; returns (residual - it, code [1,1]).

    argmin |r - c|^2 = argmin (|c|^2 - 2 r.c): |r|^2 is the same for every c.
    """
    g = net.g
    norms = np.sum(centroids.astype(np.float64) ** 2, axis=1).astype(np.float32)
    table = g.weight(name + ".table", centroids, np.float32)  # one copy: scored and gathered
    scores = g.op("Gemm", [residual, table, g.weight(name + ".norm2", norms.reshape(1, -1), np.float32)],
                  alpha=-2.0, transB=1)  # |c|^2 - 2 r.c, [1, bins]
    code = g.op("ArgMin", [scores], axis=1, keepdims=1)  # [1, 1]; ties -> lowest index, as torch
    chosen = g.op("Reshape", [g.op("Gather", [table, code], axis=0), g.const(_i64([1, -1]))])
    return g.op("Sub", [residual, chosen]), code


def rvq_decode(net: _Net, codes: str, cfg: MimiConfig) -> _Seq:
    """codes int64 [1, num_codebooks] -> latent, time-major [1, 1, D] (compute dtype)."""
    g = net.g
    start, total = 0, None
    for part, count in _rvq_parts(cfg):
        key = f"quantizer.{part}"
        tables = [codebook(net, f"{key}.vq.layers.{j}") for j in range(count)]
        bins = tables[0].shape[0]
        # One gather over the stacked codebooks: code j indexes rows j * bins + code.
        table = g.weight(f"{net.prefix}.{part}.tables", np.concatenate(tables, axis=0), np.float32)
        idx = g.op("Add", [g.op("Slice", [codes, g.const(_i64([start])), g.const(_i64([start + count])),
                                          g.const(_i64([1]))]),
                           g.const(_i64(np.arange(count) * bins).reshape(1, count))])
        summed = g.op("ReduceSum", [g.op("Gather", [table, idx], axis=0), g.const(_i64([1]))], keepdims=0)
        proj = net.w(f"{key}.output_proj.weight")[:, :, 0]  # [D, dim]
        out = g.op("MatMul", [summed, g.weight(f"{net.prefix}.{part}.output_proj", proj.T, np.float32)])
        total = out if total is None else g.op("Add", [total, out])
        start += count
    assert total is not None
    return _Seq(L.to_compute(g, g.op("Unsqueeze", [total, g.const(_i64([1]))])), 1, True)


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
    _check_seanet(cfg)
    if cfg.frame_samples % cfg.seanet.hop_length or steps_per_call(cfg) * cfg.seanet.hop_length != cfg.frame_samples:
        raise ValueError("frame_samples must be hop_length * (encoder frame rate / frame rate)")


def build_encoder(g: GraphBuilder, weights: Mapping[str, np.ndarray], cfg: MimiConfig) -> None:
    """One frame of pcm float32 [1, channels, frame_samples] -> codes int64 [1, num_codebooks]."""
    _frame_check(cfg)
    net = _Net(g, weights, "enc")
    pcm = g.input("pcm", np.float32, (1, cfg.channels, cfg.frame_samples),
                  doc=f"{cfg.frame_samples} samples at {cfg.sample_rate} Hz, in [-1, 1]")
    x = seanet_encoder(net, L.to_compute(g, pcm), cfg)
    x = projected_transformer(net, x, "encoder_transformer", cfg)
    # Downsample 25 -> 12.5 Hz: a learnt causal conv (kernel 2r, stride r) padded by
    # replicating the very first sample (upstream pad_mode="replicate").
    first = g.input("enc.down.first", np.bool_, (1,), role="state_in", pair="enc.down.first_next",
                    doc="True before the first call (initial value True, not zero): the "
                        "downsample conv then fills its tail with copies of its first input sample")
    x = stream_conv(net, x, _Conv("downsample.conv.conv.conv", "down", stride=steps_per_call(cfg),
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
    net = _Net(g, weights, "dec")
    codes = g.input("codes", np.int64, (1, cfg.num_codebooks),
                    doc=f"codebook indices in [0, {cfg.quantizer.bins}): semantic first, then acoustic")
    x = rvq_decode(net, codes, cfg)
    # Upsample 12.5 -> 25 Hz: upstream's learnt transposed conv is depthwise
    # (its `upsample_channel_wise_bug`), kernel 2r, stride r, no bias.
    x = stream_conv_transpose(net, x, _Conv("upsample.convtr.convtr.convtr", "up", stride=steps_per_call(cfg),
                                            groups=cfg.seanet.dimension, bias=False))
    x = projected_transformer(net, x, "decoder_transformer", cfg)
    pcm = seanet_decoder(net, x, cfg)
    assert pcm.length == cfg.frame_samples and not pcm.time_major, pcm
    g.output(L.to_f32(g, pcm.value), "pcm", np.float32, (1, cfg.channels, cfg.frame_samples),
             doc=f"{cfg.frame_samples} samples at {cfg.sample_rate} Hz")
    g.meta.update(_meta(cfg, net.prefix))
