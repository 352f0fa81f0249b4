"""The tensor layout of a PersonaPlex checkpoint: every name and shape, from the config.

Names are upstream moshi 0.2.13 module names (`MimiModel.state_dict()`,
`LMModel.state_dict()`), the *canonical* form the graph builders read. The
checkpoint reader maps stored variants (fused `in_proj_weight`, old codebook
names, 8-step depformers) onto it, and validates a checkpoint against it; the
synthetic checkpoint generator writes it. Tests check it against upstream's
own `state_dict()`.
"""

from __future__ import annotations

from .config import LMConfig, MimiConfig

Shapes = dict[str, tuple[int, ...]]


def _conv(shapes: Shapes, prefix: str, cin: int, cout: int, k: int, bias: bool = True, groups: int = 1) -> None:
    shapes[f"{prefix}.conv.conv.weight"] = (cout, cin // groups, k)
    if bias:
        shapes[f"{prefix}.conv.conv.bias"] = (cout,)


def _convtr(shapes: Shapes, prefix: str, cin: int, cout: int, k: int, bias: bool = True, groups: int = 1) -> None:
    shapes[f"{prefix}.convtr.convtr.weight"] = (cin, cout // groups, k)
    if bias:
        shapes[f"{prefix}.convtr.convtr.bias"] = (cout,)


def _resblock(shapes: Shapes, prefix: str, dim: int, cfg: MimiConfig) -> None:
    s = cfg.seanet
    hidden = dim // s.compress
    # block = [act, conv(dim->hidden, k=residual_kernel), act, conv(hidden->dim, k=1)]
    _conv(shapes, f"{prefix}.block.1", dim, hidden, s.residual_kernel_size)
    _conv(shapes, f"{prefix}.block.3", hidden, dim, 1)
    if not s.true_skip:
        _conv(shapes, f"{prefix}.shortcut", dim, dim, 1)


def seanet_encoder_layers(cfg: MimiConfig) -> list[tuple[str, int, dict]]:
    """The encoder's `model` Sequential: (kind, index, params) in order.

    kinds: conv (in, out, kernel, stride, dilation), res (dim, dilation), elu.
    Upstream's encoder walks the ratios reversed (4, 5, 6, 8 for 8, 6, 5, 4).
    """
    s = cfg.seanet
    layers: list[tuple[str, int, dict]] = []
    idx = 0
    mult = 1
    layers.append(("conv", idx, dict(cin=s.channels, cout=mult * s.n_filters, k=s.kernel_size, stride=1)))
    idx += 1
    for ratio in reversed(s.ratios):
        for j in range(s.n_residual_layers):
            layers.append(("res", idx, dict(dim=mult * s.n_filters, dilation=s.dilation_base ** j)))
            idx += 1
        layers.append(("elu", idx, {}))
        idx += 1
        layers.append(("conv", idx, dict(cin=mult * s.n_filters, cout=mult * s.n_filters * 2, k=2 * ratio,
                                         stride=ratio)))
        idx += 1
        mult *= 2
    layers.append(("elu", idx, {}))
    idx += 1
    layers.append(("conv", idx, dict(cin=mult * s.n_filters, cout=s.dimension, k=s.last_kernel_size, stride=1)))
    return layers


def seanet_decoder_layers(cfg: MimiConfig) -> list[tuple[str, int, dict]]:
    """The decoder's `model` Sequential; kinds: conv, convtr, res, elu."""
    s = cfg.seanet
    layers: list[tuple[str, int, dict]] = []
    idx = 0
    mult = 2 ** len(s.ratios)
    layers.append(("conv", idx, dict(cin=s.dimension, cout=mult * s.n_filters, k=s.kernel_size, stride=1)))
    idx += 1
    for ratio in s.ratios:
        layers.append(("elu", idx, {}))
        idx += 1
        layers.append(("convtr", idx, dict(cin=mult * s.n_filters, cout=mult * s.n_filters // 2, k=2 * ratio,
                                           stride=ratio)))
        idx += 1
        for j in range(s.n_residual_layers):
            layers.append(("res", idx, dict(dim=mult * s.n_filters // 2, dilation=s.dilation_base ** j)))
            idx += 1
        mult //= 2
    layers.append(("elu", idx, {}))
    idx += 1
    layers.append(("conv", idx, dict(cin=s.n_filters, cout=s.channels, k=s.last_kernel_size, stride=1)))
    return layers


def _seanet_shapes(shapes: Shapes, prefix: str, layers: list[tuple[str, int, dict]], cfg: MimiConfig) -> None:
    for kind, idx, p in layers:
        name = f"{prefix}.model.{idx}"
        if kind == "conv":
            _conv(shapes, name, p["cin"], p["cout"], p["k"])
        elif kind == "convtr":
            _convtr(shapes, name, p["cin"], p["cout"], p["k"])
        elif kind == "res":
            _resblock(shapes, name, p["dim"], cfg)


def _mimi_transformer_shapes(shapes: Shapes, prefix: str, cfg: MimiConfig) -> None:
    t = cfg.transformer
    d = t.d_model
    if t.input_dimension != d:
        shapes[f"{prefix}.input_proj.weight"] = (d, t.input_dimension)
    for j, out_dim in enumerate(t.output_dimensions):
        if out_dim != d:
            shapes[f"{prefix}.output_projs.{j}.weight"] = (out_dim, d)
    for i in range(t.num_layers):
        layer = f"{prefix}.transformer.layers.{i}"
        shapes[f"{layer}.self_attn.in_projs.0.weight"] = (3 * d, d)
        shapes[f"{layer}.self_attn.out_projs.0.weight"] = (d, d)
        for norm in ("norm1", "norm2"):
            shapes[f"{layer}.{norm}.weight"] = (d,)
            shapes[f"{layer}.{norm}.bias"] = (d,)
        shapes[f"{layer}.linear1.weight"] = (t.dim_feedforward, d)
        shapes[f"{layer}.linear2.weight"] = (d, t.dim_feedforward)
        if t.layer_scale is not None:
            shapes[f"{layer}.layer_scale_1.scale"] = (d,)
            shapes[f"{layer}.layer_scale_2.scale"] = (d,)


def _rvq_shapes(shapes: Shapes, prefix: str, n_q: int, cfg: MimiConfig) -> None:
    q = cfg.quantizer
    # Split RVQ forces its projections (1x1 convs, no bias).
    shapes[f"{prefix}.input_proj.weight"] = (q.dimension, q.input_dimension, 1)
    shapes[f"{prefix}.output_proj.weight"] = (q.output_dimension, q.dimension, 1)
    for i in range(n_q):
        book = f"{prefix}.vq.layers.{i}._codebook"
        shapes[f"{book}._initialized"] = (1,)
        shapes[f"{book}.cluster_usage"] = (q.bins,)
        shapes[f"{book}.embedding_sum"] = (q.bins, q.dimension)


def mimi_shapes(cfg: MimiConfig) -> Shapes:
    shapes: Shapes = {}
    _seanet_shapes(shapes, "encoder", seanet_encoder_layers(cfg), cfg)
    _seanet_shapes(shapes, "decoder", seanet_decoder_layers(cfg), cfg)
    _mimi_transformer_shapes(shapes, "encoder_transformer", cfg)
    _mimi_transformer_shapes(shapes, "decoder_transformer", cfg)
    _rvq_shapes(shapes, "quantizer.rvq_first", 1, cfg)
    _rvq_shapes(shapes, "quantizer.rvq_rest", cfg.quantizer.n_q - 1, cfg)
    stride = int(cfg.encoder_frame_rate / cfg.frame_rate)
    if stride > 1:
        dim = cfg.seanet.dimension
        # Learnt resampling: a full conv down, a channel-wise (grouped) transposed conv up.
        _conv(shapes, "downsample.conv", dim, dim, 2 * stride, bias=False)
        _convtr(shapes, "upsample.convtr", dim, dim, 2 * stride, bias=False, groups=dim)
    return shapes


def lm_shapes(cfg: LMConfig) -> Shapes:
    """LMModel tensors, with depformer weights for all `dep_q` steps."""
    shapes: Shapes = {}
    d, dd = cfg.dim, cfg.depformer_dim
    shapes["text_emb.weight"] = (cfg.text_card + 1, d)
    for k in range(cfg.n_q):
        shapes[f"emb.{k}.weight"] = (cfg.card + 1, d)
    shapes["text_linear.weight"] = (cfg.text_card, d)
    shapes["out_norm.alpha"] = (1, 1, d)
    for i in range(cfg.num_layers):
        layer = f"transformer.layers.{i}"
        shapes[f"{layer}.self_attn.in_projs.0.weight"] = (3 * d, d)
        shapes[f"{layer}.self_attn.out_projs.0.weight"] = (d, d)
        shapes[f"{layer}.norm1.alpha"] = (1, 1, d)
        shapes[f"{layer}.norm2.alpha"] = (1, 1, d)
        shapes[f"{layer}.gating.linear_in.weight"] = (2 * cfg.ffn_hidden, d)
        shapes[f"{layer}.gating.linear_out.weight"] = (d, cfg.ffn_hidden)
    for k in range(cfg.dep_q):
        shapes[f"depformer_in.{k}.weight"] = (dd, d)
    for k in range(cfg.dep_q - 1):
        shapes[f"depformer_emb.{k}.weight"] = (cfg.card + 1, dd)
    shapes["depformer_text_emb.weight"] = (cfg.text_card + 1, dd)
    for i in range(cfg.depformer_num_layers):
        layer = f"depformer.layers.{i}"
        for k in range(cfg.dep_q):
            shapes[f"{layer}.self_attn.in_projs.{k}.weight"] = (3 * dd, dd)
            shapes[f"{layer}.self_attn.out_projs.{k}.weight"] = (dd, dd)
            shapes[f"{layer}.gating.{k}.linear_in.weight"] = (2 * cfg.depformer_ffn_hidden, dd)
            shapes[f"{layer}.gating.{k}.linear_out.weight"] = (dd, cfg.depformer_ffn_hidden)
        shapes[f"{layer}.norm1.alpha"] = (1, 1, dd)
        shapes[f"{layer}.norm2.alpha"] = (1, 1, dd)
    for k in range(cfg.dep_q):
        shapes[f"linears.{k}.weight"] = (cfg.card, dd)
    return shapes
