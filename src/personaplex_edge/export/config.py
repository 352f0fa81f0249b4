"""Model hyper-parameters: PersonaPlex-7B defaults, overridable by a Kyutai-style config.json.

`LMConfig` mirrors the keyword arguments of upstream `LMModel` that PersonaPlex
uses; `MimiConfig` mirrors the `seanet` / `quantizer` / `transformer` sections
of a Mimi config JSON. Unknown keys are errors: a silently ignored key would
export a model that differs from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import ConfigError

# Keys of a Kyutai config.json that name files rather than LM hyper-parameters.
FILE_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name")
# Keys upstream accepts that do not change inference, or that we only allow at their default.
IGNORED_KEYS = ("model_type", "lm_gen_config", "model_id", "depformer_causal", "lora", "lora_rank",
                "lora_scaling", "lora_name", "tts_config", "stt_config", "conditioners", "fuser")


@dataclass(frozen=True)
class LMConfig:
    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 16
    dep_q: int = 16
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    layer_scale: float | None = None
    context: int = 3000
    max_period: float = 10000.0
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = int(4.125 * 1024)
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int = 8
    depformer_max_period: float = 10000.0
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    # Accepted at their defaults only (the graphs do not implement the alternatives).
    demux_second_stream: bool = False
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6

    @property
    def num_streams(self) -> int:
        return self.n_q + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the gated FFN (upstream ActivationGating's rule)."""
        return _gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_ffn_hidden(self) -> int:
        return _gating_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def user_streams(self) -> int:
        return self.n_q - self.dep_q

    def validate(self, where: str) -> None:
        _require(where, "num_streams", len(self.delays) == self.num_streams,
                 f"delays has {len(self.delays)} entries, n_q + 1 = {self.num_streams}")
        _require(where, "dim", self.dim % self.num_heads == 0, "dim must divide by num_heads")
        _require(where, "depformer_dim", self.depformer_dim % self.depformer_num_heads == 0,
                 "depformer_dim must divide by depformer_num_heads")
        _require(where, "norm", self.norm in ("rms_norm_f32", "rms_norm"), f"unsupported {self.norm!r}")
        _require(where, "gating", self.gating == "silu" and self.depformer_gating == "silu",
                 "only silu gating is supported")
        _require(where, "positional_embedding", self.positional_embedding == "rope",
                 "only rope is supported for the temporal transformer")
        _require(where, "depformer_pos_emb", self.depformer_pos_emb == "none",
                 "only 'none' is supported for the depformer")
        _require(where, "depformer_weights_per_step", self.depformer_weights_per_step
                 and self.depformer_multi_linear, "PersonaPlex layout needs weights_per_step and multi_linear")
        _require(where, "layer_scale", self.layer_scale is None and self.depformer_layer_scale is None,
                 "layer scale in the LM is not supported")
        _require(where, "demux_second_stream", not self.demux_second_stream, "not supported")
        _require(where, "extra_heads_num_heads", self.extra_heads_num_heads == 0, "not supported")
        _require(where, "dep_q", 0 < self.dep_q <= self.n_q, "need 0 < dep_q <= n_q")


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    causal: bool = True
    n_filters: int = 64
    n_residual_layers: int = 1
    activation: str = "ELU"
    compress: int = 2
    dilation_base: int = 2
    disable_norm_outer_blocks: int = 0
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    norm: str = "none"
    pad_mode: str = "constant"
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    true_skip: bool = True

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int = 250
    conv_layout: bool = True
    max_period: float = 10000.0
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    dim_feedforward: int = 2048
    input_dimension: int = 512
    output_dimensions: tuple[int, ...] = (512,)


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24000
    channels: int = 1
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    # Codebooks actually used per audio stream (PersonaPlex: n_q // 2 = 8).
    num_codebooks: int = 8

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def frame_samples(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    def validate(self, where: str) -> None:
        _require(where, "seanet.norm", self.seanet.norm == "none",
                 "weights must be pre-processed (weight norm folded), norm 'none'")
        _require(where, "seanet.causal", self.seanet.causal, "only causal Mimi streams")
        _require(where, "seanet.activation", self.seanet.activation == "ELU", "only ELU is supported")
        _require(where, "transformer.gating", self.transformer.gating == "none", "only 'none' is supported")
        _require(where, "transformer.norm", self.transformer.norm == "layer_norm",
                 "only layer_norm is supported")
        _require(where, "transformer.positional_embedding",
                 self.transformer.positional_embedding == "rope", "only rope is supported")
        ratio = self.encoder_frame_rate / self.frame_rate
        _require(where, "frame_rate", ratio == int(ratio) and ratio >= 1,
                 f"encoder frame rate {self.encoder_frame_rate} must be a multiple of {self.frame_rate}")
        _require(where, "num_codebooks", 0 < self.num_codebooks <= self.quantizer.n_q,
                 "must be within quantizer n_q")


@dataclass(frozen=True)
class ModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    mimi: MimiConfig = field(default_factory=MimiConfig)
    moshi_name: str = "model.safetensors"
    mimi_name: str = "tokenizer-e351c8d8-checkpoint125.safetensors"
    tokenizer_name: str = "tokenizer_spm_32k_3.model"
    mimi_config_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "config") -> ModelConfig:
        """Inverse of `to_dict` (as written into a build manifest)."""
        lm = _build(LMConfig, data.get("lm", {}), f"{where}: lm")
        mimi_data = dict(data.get("mimi", {}))
        mimi = _mimi_from_sections(mimi_data, where)
        rest = {k: data[k] for k in FILE_KEYS if k in data}
        return ModelConfig(lm=lm, mimi=mimi, **rest)


def _gating_hidden(dim: int, dim_feedforward: int) -> int:
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


def _require(where: str, key: str, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}: {why}")


def _coerce(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")
    try:
        return cls(**{k: _coerce(v) for k, v in data.items()})
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"{where}: {exc}") from None


def _mimi_from_sections(data: dict[str, Any], where: str) -> MimiConfig:
    sections = {
        "seanet": SeanetConfig,
        "quantizer": QuantizerConfig,
        "transformer": MimiTransformerConfig,
    }
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            kwargs[key] = _build(sections[key], value, f"{where}: {key}")
        else:
            kwargs[key] = value
    return _build(MimiConfig, kwargs, where) if kwargs else MimiConfig()


def load_model_config(checkpoint_dir: Path) -> ModelConfig:
    """Defaults for PersonaPlex-7B, overridden by `config.json` (and its Mimi config) if present."""
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        config = ModelConfig()
    else:
        raw = _read_json(config_path)
        lm_kwargs = dict(raw)
        files = {k: lm_kwargs.pop(k) for k in FILE_KEYS if k in lm_kwargs}
        for key in IGNORED_KEYS:
            value = lm_kwargs.pop(key, None)
            if key in ("conditioners", "fuser", "lora") and value:
                raise ConfigError(f"{config_path}: {key}: conditioned or LoRA models are not supported")
        lm = _build(LMConfig, lm_kwargs, str(config_path))
        mimi = MimiConfig()
        mimi_name = files.get("mimi_config_name")
        if mimi_name:
            mimi_path = checkpoint_dir / mimi_name
            if not mimi_path.exists():
                raise ConfigError(f"{config_path}: mimi_config_name: {mimi_path} does not exist")
            mimi = _mimi_from_sections(_read_json(mimi_path), str(mimi_path))
        # PersonaPlex splits the LM's audio streams evenly between agent and user and
        # always runs Mimi with that many codebooks (8); note upstream moshi's
        # max(dep_q, n_q - dep_q) would give 16 for dep_q = 16.
        mimi = dataclasses.replace(mimi, num_codebooks=lm.n_q // 2)
        config = ModelConfig(lm=lm, mimi=mimi, **files)
    config.lm.validate(str(config_path))
    config.mimi.validate(str(config_path))
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def tiny_config() -> ModelConfig:
    """A PersonaPlex-shaped model small enough for tests and the demo (same streams,
    delays, cards, weights-per-step depformer; narrow and shallow)."""
    lm = LMConfig(dim=64, text_card=256, num_heads=4, num_layers=2, depformer_dim=32,
                  depformer_dim_feedforward=int(4.125 * 32), depformer_num_heads=2,
                  depformer_num_layers=2)
    mimi = MimiConfig(
        seanet=SeanetConfig(dimension=32, n_filters=8),
        quantizer=QuantizerConfig(dimension=16, n_q=8, bins=2048, input_dimension=32,
                                  output_dimension=32),
        transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64,
                                          input_dimension=32, output_dimensions=(32,)),
    )
    return ModelConfig(lm=lm, mimi=mimi)
