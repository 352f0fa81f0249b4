"""`ppx-export synth`: a seeded random-weight checkpoint in the released layout.

It writes what a local snapshot of nvidia/personaplex-7b-v1 holds: the LM and
Mimi safetensors (bfloat16, upstream key names), the SentencePiece tokenizer,
a `config.json` in Kyutai's convention (with a Mimi config JSON when Mimi is
not the default) and a voice prompt. `tiny` is for tests and the demo; `full`
has the real PersonaPlex-7B sizes (~16.7 GB) for GPU benchmarks.

Weights are drawn per tensor from a generator seeded by (seed, tensor name),
so the result does not depend on write order and a tensor is produced only
when it is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .atomic import atomic_output_dir
from .config import MimiConfig, ModelConfig, tiny_config
from .layout import lm_shapes, mimi_shapes
from .progress import bar
from .safetensors_io import write_safetensors

DATA_DIR = Path(__file__).parent / "data"
# The synthetic voice stands in for a released preset of the same name.
VOICE_NAME = "NATF2"


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _trunc_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return np.clip(x, -3.0, 3.0) * np.float32(std)


def lm_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Upstream's initialisation rule: truncated normal with std 1/sqrt(fan_in); norms at 1."""
    rng = _rng(seed, name)
    if name.endswith(".alpha"):
        return np.ones(shape, np.float32)
    fan_in = shape[-1]
    return _trunc_normal(rng, shape, 1.0 / np.sqrt(fan_in))


def mimi_tensor(name: str, shape: tuple[int, ...], seed: int, layer_scale: float | None) -> np.ndarray:
    """PyTorch-default-like initialisation, so the random codec keeps a sane signal level."""
    rng = _rng(seed, name)
    if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
        return np.full(shape, layer_scale if layer_scale is not None else 1.0, np.float32)
    if (".norm1." in name or ".norm2." in name):
        return np.ones(shape, np.float32) if name.endswith(".weight") else np.zeros(shape, np.float32)
    if name.endswith("._initialized"):
        return np.ones(shape, np.float32)
    if name.endswith(".cluster_usage"):
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name.endswith(".embedding_sum"):
        return rng.standard_normal(shape, dtype=np.float32)
    if "convtr" in name and name.endswith(".weight"):
        fan_in = shape[1] * shape[2]
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


_PER_STEP_ATTN = re.compile(r"^(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight$")


def released_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Stored name -> the canonical tensors it concatenates (along rows).

    Released checkpoints keep each attention's projections fused over depth
    steps (`in_proj_weight`, `out_proj.weight`); everything else is stored as is.
    """
    stored: dict[str, list[str]] = {}
    for name in shapes:
        m = _PER_STEP_ATTN.match(name)
        if m:
            prefix, kind, _ = m.groups()
            key = f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"
            stored.setdefault(key, []).append(name)
        else:
            stored[name] = [name]
    return stored


def _lazy(shapes: dict[str, tuple[int, ...]], make: Callable[[str, tuple[int, ...]], np.ndarray],
          progress: tqdm) -> dict:
    def producer(name: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            progress.set_postfix_str(name, refresh=False)
            array = make(name, shape)
            progress.update(int(np.prod(shape)) * 2)  # bf16 bytes
            return array
        return produce
    def fused(parts: list[str]) -> Callable[[], np.ndarray]:
        return lambda: np.concatenate([producer(p, shapes[p])() for p in parts], axis=0)

    out: dict = {}
    for stored, parts in released_layout(shapes).items():
        rows = sum(shapes[p][0] for p in parts)
        out[stored] = ((rows, *shapes[parts[0]][1:]), fused(parts) if len(parts) > 1 else producer(parts[0], shapes[parts[0]]))
    return out


def mimi_config_json(m: MimiConfig) -> dict:
    """A Mimi config in Kyutai's JSON layout (seanet / quantizer / transformer sections),
    as upstream `get_mimi` takes it."""
    return {
        "sample_rate": m.sample_rate,
        "channels": m.channels,
        "frame_rate": m.frame_rate,
        "seanet": _listify(dataclasses.asdict(m.seanet)),
        "quantizer": dataclasses.asdict(m.quantizer),
        "transformer": _listify(dataclasses.asdict(m.transformer)),
    }


def lm_config_json(config: ModelConfig, with_mimi_config: bool) -> dict:
    data = _listify(dataclasses.asdict(config.lm))
    data["moshi_name"] = config.moshi_name
    data["mimi_name"] = config.mimi_name
    data["tokenizer_name"] = config.tokenizer_name
    if with_mimi_config:
        data["mimi_config_name"] = "mimi_config.json"
    return data


def _listify(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def train_tokenizer(vocab_size: int) -> bytes:
    """A small SentencePiece model with the released tokenizer's special ids (unk 0, bos 1,
    eos 2, pad 3 = the text padding id)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(DATA_DIR / "synth_corpus.txt"), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2, num_threads=1)
    return buf.getvalue()


def synthesize(size: str, seed: int, out: Path, force: bool = False, quiet: bool = False) -> ModelConfig:
    config = tiny_config() if size == "tiny" else ModelConfig()
    lm = lm_shapes(config.lm)
    mimi = mimi_shapes(config.mimi)
    total_bytes = 2 * sum(int(np.prod(s)) for s in list(lm.values()) + list(mimi.values()))
    with bar(f"synth {size}", total_bytes, quiet=quiet, unit="B", unit_scale=True) as progress, \
            atomic_output_dir(out, force=force) as tmp:
        is_default_mimi = config.mimi == ModelConfig().mimi
        (tmp / "config.json").write_text(json.dumps(lm_config_json(config, not is_default_mimi), indent=2))
        if not is_default_mimi:
            (tmp / "mimi_config.json").write_text(json.dumps(mimi_config_json(config.mimi), indent=2))
        tok_vocab = min(config.lm.text_card, 256)
        (tmp / config.tokenizer_name).write_bytes(train_tokenizer(tok_vocab))
        metadata = {"generator": "ppx-export synth", "size": size, "seed": str(seed)}
        write_safetensors(tmp / config.mimi_name,
                          _lazy(mimi, lambda n, s: mimi_tensor(n, s, seed, config.mimi.transformer.layer_scale),
                                progress), metadata=metadata)
        write_safetensors(tmp / config.moshi_name, _lazy(lm, lambda n, s: lm_tensor(n, s, seed), progress),
                          metadata=metadata)
        voices = tmp / "voices"
        voices.mkdir()
        shutil.copyfile(DATA_DIR / "synth_voice.wav", voices / f"{VOICE_NAME}.wav")
    return config
