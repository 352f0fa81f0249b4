"""Reading a released PersonaPlex checkpoint directory (a local Hugging Face snapshot).

`Checkpoint.open(dir)` finds the files, reads the config (PersonaPlex-7B
defaults, overridden by `config.json`), and exposes the LM and Mimi weights as
lazy mappings in the canonical layout of `layout.py`. Stored variants are
mapped on the fly:

- fused attention projections (`in_proj_weight`, `out_proj.weight`, split per
  depth step for weights-per-step attention) -> `in_projs.{i}` / `out_projs.{i}`;
- old codebook buffer names (`embed_avg`, `cluster_size`, `inited`);
- a depformer stored for 8 depth steps, extended to `dep_q` = 16 the way the
  upstream PersonaPlex loader does (steps 8..15 reuse the weights of 0..7).

Every expected tensor is checked for presence and shape, and every stored
tensor must be used, before any graph is built: a bad checkpoint gets one line
naming the file and the tensor.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.core.manifest import sha256_file
from personaplex_edge.runtime.errors import PpxError

from .config import ModelConfig, load_model_config
from .layout import lm_shapes, mimi_shapes
from .safetensors_io import SafetensorsFile

Loader = Callable[[], np.ndarray]

_CODEBOOK_ALIASES = {"embed_avg": "embedding_sum", "embed_sum": "embedding_sum",
                     "cluster_size": "cluster_usage", "inited": "_initialized"}
_FUSED_ATTN = re.compile(r"^(.*\.self_attn)\.(in_proj_weight|in_proj\.weight|out_proj\.weight)$")
_CODEBOOK = re.compile(r"^(.*\._codebook)\.(embed_avg|embed_sum|cluster_size|inited)$")


class CanonicalWeights(Mapping[str, np.ndarray]):
    """Canonical name -> float32 array, resolved lazily from one safetensors file."""

    def __init__(self, source: SafetensorsFile, loaders: dict[str, tuple[Loader, tuple[int, ...]]]):
        self.source = source
        self._loaders = loaders

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._loaders:
            raise KeyError(name)
        return self._loaders[name][0]()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._loaders[name][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def _direct(src: SafetensorsFile, name: str) -> tuple[Loader, tuple[int, ...]]:
    return (lambda: src[name]), src.shape(name)


def _split(src: SafetensorsFile, name: str, index: int, parts: int) -> tuple[Loader, tuple[int, ...]]:
    rows, *rest = src.shape(name)
    if rows % parts:
        raise PpxError(f"{src.path}: {name}: {rows} rows do not split into {parts} depth steps")
    step = rows // parts
    return (lambda: src[name][index * step:(index + 1) * step]), (step, *rest)


def _canonicalize(src: SafetensorsFile, steps_for: Callable[[str], int]) -> dict[str, tuple[Loader, tuple[int, ...]]]:
    """Map every stored tensor to canonical names (fused attention split, old names renamed)."""
    loaders: dict[str, tuple[Loader, tuple[int, ...]]] = {}
    for name in src:
        fused = _FUSED_ATTN.match(name)
        book = _CODEBOOK.match(name)
        if fused:
            prefix, kind = fused.groups()
            target = "out_projs" if kind.startswith("out") else "in_projs"
            parts = steps_for(prefix)
            for i in range(parts):
                loaders[f"{prefix}.{target}.{i}.weight"] = _split(src, name, i, parts)
        elif book:
            prefix, old = book.groups()
            loaders[f"{prefix}.{_CODEBOOK_ALIASES[old]}"] = _direct(src, name)
        else:
            loaders[name] = _direct(src, name)
    return loaders


def _stored_depformer_steps(src: SafetensorsFile, dep_q: int) -> int:
    """How many depth steps the stored depformer has weights for (8 in older layouts)."""
    steps = 0
    while f"linears.{steps}.weight" in src:
        steps += 1
    return steps or dep_q


def _extend_depformer(loaders: dict[str, tuple[Loader, tuple[int, ...]]], stored: int, dep_q: int,
                      expected: set[str]) -> None:
    """Fill depth steps `stored`..`dep_q`-1 from step k - `stored`, as the PersonaPlex loader does.

    Covers attention slices, gating, linears, depformer_in and depformer_emb; like
    upstream, only tensors the model has and the file lacks are filled, so
    depformer_emb.{stored-1} has no source and validation then names it.
    """
    per_step = re.compile(
        r"^(depformer\.layers\.\d+\.self_attn\.(?:in|out)_projs|depformer\.layers\.\d+\.gating|linears"
        r"|depformer_in|depformer_emb)\.(\d+)\.(.*)$")
    for name in list(loaders):
        m = per_step.match(name)
        if not m:
            continue
        prefix, k, rest = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.{k + stored}.{rest}"
        if k + stored < dep_q and target in expected:
            loaders.setdefault(target, loaders[name])


def _validate(path: Path, loaders: Mapping[str, tuple[Loader, tuple[int, ...]]],
              expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in loaders:
            raise PpxError(f"{path}: missing tensor {name}")
        got = tuple(loaders[name][1])
        if got != tuple(shape):
            raise PpxError(f"{path}: {name}: shape {list(got)}, the config expects {list(shape)}")
    for name in loaders:
        if name not in expected:
            raise PpxError(f"{path}: unexpected tensor {name} (not part of this model's config)")


@dataclass
class Checkpoint:
    root: Path
    config: ModelConfig
    lm_path: Path
    mimi_path: Path
    tokenizer_path: Path
    lm: CanonicalWeights
    mimi: CanonicalWeights

    @staticmethod
    def open(root: Path) -> Checkpoint:
        root = Path(root)
        if not root.is_dir():
            raise PpxError(f"{root}: checkpoint directory not found")
        config = load_model_config(root)
        lm_path = _require_file(root / config.moshi_name, "LM weights")
        mimi_path = _require_file(root / config.mimi_name, "Mimi weights")
        tokenizer_path = _require_file(root / config.tokenizer_name, "text tokenizer")

        lm_src = SafetensorsFile(lm_path)
        stored_steps = _stored_depformer_steps(lm_src, config.lm.dep_q)

        def lm_steps(prefix: str) -> int:
            return stored_steps if prefix.startswith("depformer.") else 1

        lm_loaders = _canonicalize(lm_src, lm_steps)
        expected = lm_shapes(config.lm)
        if stored_steps < config.lm.dep_q:
            _extend_depformer(lm_loaders, stored_steps, config.lm.dep_q, set(expected))
        _validate(lm_path, lm_loaders, expected)

        mimi_src = SafetensorsFile(mimi_path)
        mimi_loaders = _canonicalize(mimi_src, lambda prefix: 1)
        _validate(mimi_path, mimi_loaders, mimi_shapes(config.mimi))
        return Checkpoint(root, config, lm_path, mimi_path, tokenizer_path,
                          CanonicalWeights(lm_src, lm_loaders), CanonicalWeights(mimi_src, mimi_loaders))

    def voice_sources(self) -> dict[str, Path]:
        """Voice prompts shipped with the checkpoint: name -> .pt / .wav file (voices/ or voices.tgz)."""
        voices: dict[str, Path] = {}
        folder = self.root / "voices"
        if not folder.is_dir() and (self.root / "voices.tgz").exists():
            folder = _extract_voices(self.root / "voices.tgz")
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in (".pt", ".wav") and path.stem not in voices:
                    voices[path.stem] = path
        return voices

    def file_hashes(self) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in (self.lm_path, self.mimi_path, self.tokenizer_path)}


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PpxError(f"{path}: {what} not found")
    return path


def _extract_voices(archive: Path) -> Path:
    """Unpack voices.tgz once, next to it (members are checked to stay inside)."""
    target = archive.parent / ".voices-extracted"
    if target.is_dir():
        return target / "voices" if (target / "voices").is_dir() else target
    tmp = archive.parent / ".voices-extracting"
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # the safe filter: no absolute paths or links out
    except (tarfile.TarError, OSError) as exc:
        raise PpxError(f"{archive}: cannot unpack: {exc}") from None
    tmp.rename(target)
    return target / "voices" if (target / "voices").is_dir() else target
