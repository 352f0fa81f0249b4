"""SEANet, Mimi's convolutional encoder and decoder, as streaming ONNX ops (one 80 ms frame per call).

Every causal conv keeps the tail of its previous input and every transposed conv its
unfinished overlap-add tail as explicit state (see mimi.py for the names); the learnt
resamplers around the transformer (`down`, `up`) use the same two streaming convs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import MimiConfig
from .builder import GraphBuilder
from .mimi_net import MimiNet, Seq, i64, layout, slice_axis

ELU_ALPHA = 1.0

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
class Conv:
    """One upstream StreamingConv1d / StreamingConvTranspose1d, as used here."""

    key: str  # upstream weight prefix, e.g. "encoder.model.3.conv.conv"
    name: str  # state name inside the graph, e.g. "conv3"
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True


def elu(g: GraphBuilder, x: Seq) -> Seq:
    # A relu/exp/min decomposition runs a lone Elu 2x faster on ONNX Runtime, but
    # measured no faster over whole frames; the plain op is clearer and TensorRT-native.
    return Seq(g.op("Elu", [x.value], alpha=ELU_ALPHA), x.length, x.time_major)


def stream_conv(net: MimiNet, x: Seq, conv: Conv, first: str | None = None) -> Seq:
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
    x = layout(g, x, time_major)
    axis = 1 if time_major else 2
    full = x.value
    if tail > 0:
        c_in = weight.shape[1] * conv.groups
        shape = (1, tail, c_in) if time_major else (1, c_in, tail)
        doc = f"input tail of {conv.key}: {tail} steps, {'time' if time_major else 'channel'}-major"
        prev = net.state(f"{conv.name}.state", shape, doc=doc)
        if first is not None:
            prev = g.op("Where", [first, slice_axis(g, x.value, axis, 0, 1), prev])
        full = g.op("Concat", [prev, x.value], axis=axis)
        net.state_out(slice_axis(g, full, axis, x.length, x.length + tail), f"{conv.name}.state", shape)
    if time_major:
        y = _conv_matmul(net, full, x.length + tail, out_len, weight, conv)
        if bias is not None:
            y = g.op("Add", [y, g.weight(f"{net.prefix}.{conv.name}.bias", bias)])
        return Seq(y, out_len, True)
    inputs = [full, g.weight(f"{net.prefix}.{conv.name}.weight", weight)]
    if bias is not None:
        inputs.append(g.weight(f"{net.prefix}.{conv.name}.bias", bias))
    y = g.op("Conv", inputs, kernel_shape=[weight.shape[2]], strides=[conv.stride],
             dilations=[conv.dilation], group=conv.groups, pads=[0, 0])
    return Seq(y, out_len, False)


def _conv_matmul(net: MimiNet, full: str, full_len: int, out_len: int, weight: np.ndarray,
                 conv: Conv) -> str:
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
        blocks = g.op("Reshape", [full, g.const(i64([1, full_len // stride, stride * c_in]))])
    taps = k // stride
    if taps == 1 and full_len == out_len * stride:
        frames = blocks
    else:
        parts = [slice_axis(g, blocks, 1, b * dilation, b * dilation + out_len) for b in range(taps)]
        frames = g.op("Concat", parts, axis=2) if taps > 1 else parts[0]
    matrix = weight.transpose(2, 1, 0).reshape(k * c_in, c_out)  # rows (tap, channel)
    return g.op("MatMul", [frames, g.weight(f"{net.prefix}.{conv.name}.weight", matrix)],
                name=f"{net.prefix}_{conv.name}")


def stream_conv_transpose(net: MimiNet, x: Seq, conv: Conv) -> Seq:
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
        return _convtr_matmul(net, layout(g, x, True), conv, weight, bias)
    x = layout(g, x, False)
    tail = kernel - stride
    out_len = x.length * stride
    inputs = [x.value, g.weight(f"{net.prefix}.{conv.name}.weight", weight)]
    if bias is not None:
        inputs.append(g.weight(f"{net.prefix}.{conv.name}.bias", bias))
    y = g.op("ConvTranspose", inputs, kernel_shape=[kernel], strides=[stride], group=conv.groups)
    if tail <= 0:
        return Seq(y, out_len, False)
    doc = f"overlap-add tail of {conv.key} ({tail} steps, channel-major, bias excluded)"
    partial = net.state(f"{conv.name}.partial", (1, c_out, tail), doc=doc)
    if out_len >= tail:  # head and tail do not overlap: add into the head only
        head = g.op("Add", [slice_axis(g, y, 2, 0, tail), partial])
        out = g.op("Concat", [head, slice_axis(g, y, 2, tail, out_len)], axis=2) if out_len > tail else head
        rest = slice_axis(g, y, 2, out_len, out_len + tail)
    else:  # short input: add over a zero-padded tail, then split
        y = g.op("Add", [y, g.op("Pad", [partial, g.const(i64([0, 0, 0, 0, 0, out_len]))])])
        out = slice_axis(g, y, 2, 0, out_len)
        rest = slice_axis(g, y, 2, out_len, out_len + tail)
    if bias is not None:
        col = g.weight(f"{net.prefix}.{conv.name}.bias_col", bias.reshape(-1, 1))
        rest = g.op("Sub", [rest, col])
    net.state_out(rest, f"{conv.name}.partial", (1, c_out, tail))
    return Seq(out, out_len, False)


def _convtr_matmul(net: MimiNet, x: Seq, conv: Conv, weight: np.ndarray, bias: np.ndarray | None) -> Seq:
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
        z = g.op("Mul", [g.op("Unsqueeze", [x.value, g.const(i64([2]))]),
                         g.weight(f"{net.prefix}.{conv.name}.weight", taps)])
        z = g.op("Reshape", [z, g.const(i64([1, x.length, kernel * c_out]))])
    else:
        raise NotImplementedError(f"{conv.key}: grouped transposed conv")
    first, second = g.op("Split", [z, g.const(i64([half, half]))], n_out=2, axis=2)
    doc = f"overlap-add tail of {conv.key} ({stride} steps, time-major, bias excluded)"
    partial = net.state(f"{conv.name}.partial", (1, stride, c_out), doc=doc)
    carried = g.op("Reshape", [partial, g.const(i64([1, 1, half]))])
    if x.length > 1:
        carried = g.op("Concat", [carried, slice_axis(g, second, 1, 0, x.length - 1)], axis=1)
    out = g.op("Add", [first, carried])
    rest = slice_axis(g, second, 1, x.length - 1, x.length)
    if bias is not None:
        tiled = g.weight(f"{net.prefix}.{conv.name}.bias", np.tile(bias, stride))
        out = g.op("Add", [out, tiled])
        # Upstream keeps (tail + bias) - bias, which is not always the tail bit for bit.
        rest = g.op("Sub", [g.op("Add", [rest, tiled]), tiled])
    net.state_out(g.op("Reshape", [rest, g.const(i64([1, stride, c_out]))]), f"{conv.name}.partial",
                  (1, stride, c_out))
    out = g.op("Reshape", [out, g.const(i64([1, x.length * stride, c_out]))])
    return Seq(out, x.length * stride, True)


def _resblock(net: MimiNet, x: Seq, key: str, name: str, dilation: int) -> Seq:
    """SEANet residual block (true skip): x + conv1x1(elu(conv_k(elu(x))))."""
    x = layout(net.g, x, x.length <= MATMUL_MAX_STEPS)
    h = stream_conv(net, elu(net.g, x), Conv(f"{key}.block.1.conv.conv", f"{name}.conv1", dilation=dilation))
    h = stream_conv(net, elu(net.g, h), Conv(f"{key}.block.3.conv.conv", f"{name}.conv3"))
    h = layout(net.g, h, x.time_major)
    return Seq(net.g.op("Add", [x.value, h.value]), x.length, x.time_major)


# -- SEANet ----------------------------------------------------------------------


def check_seanet(cfg: MimiConfig) -> None:
    s = cfg.seanet
    if not s.true_skip or s.norm != "none" or s.activation != "ELU" or not s.causal:
        raise ValueError("Mimi graphs need a causal SEANet with ELU, true_skip and norm 'none'")


def seanet_encoder(net: MimiNet, pcm: str, cfg: MimiConfig) -> Seq:
    """pcm [1, channels, frame_samples] -> latent (frames at 25 Hz, `dimension` channels)."""
    s = cfg.seanet
    x = stream_conv(net, Seq(pcm, cfg.frame_samples, False), Conv("encoder.model.0.conv.conv", "conv0"))
    idx = 1
    for ratio in reversed(s.ratios):
        for j in range(s.n_residual_layers):
            x = _resblock(net, x, f"encoder.model.{idx}", f"res{idx}", s.dilation_base ** j)
            idx += 1
        x = stream_conv(net, elu(net.g, x), Conv(f"encoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}",
                                                   stride=ratio))
        idx += 2
    return stream_conv(net, elu(net.g, x), Conv(f"encoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}"))


def seanet_decoder(net: MimiNet, x: Seq, cfg: MimiConfig) -> Seq:
    """latent (frames at 25 Hz) -> pcm, channel-major [1, channels, frame_samples]."""
    s = cfg.seanet
    x = stream_conv(net, x, Conv("decoder.model.0.conv.conv", "conv0"))
    idx = 1
    for ratio in s.ratios:
        x = stream_conv_transpose(net, elu(net.g, x), Conv(f"decoder.model.{idx + 1}.convtr.convtr",
                                                             f"convtr{idx + 1}", stride=ratio))
        idx += 2
        for j in range(s.n_residual_layers):
            x = _resblock(net, x, f"decoder.model.{idx}", f"res{idx}", s.dilation_base ** j)
            idx += 1
    x = stream_conv(net, elu(net.g, x), Conv(f"decoder.model.{idx + 1}.conv.conv", f"conv{idx + 1}"))
    return layout(net.g, x, False)

