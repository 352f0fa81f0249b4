"""Voice prompts: released torch `.pt` presets -> a torch-free `.npz` the runtime reads.

A released preset holds the per-step input embeddings of the voice-prompt
phase (`embeddings`, [N-1, 1, 1, dim]: upstream never runs the model on the
first voice frame) and the LM token ring after it (`cache`, int64 [1, 17, 4]).
The runtime replays the embeddings through the prefill graph and restores the
ring, which is exactly what upstream does with a preset.
A WAV voice is copied as is; the runtime Mimi-encodes it (after -24 LUFS
normalisation) when it compiles a persona.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.errors import PpxError


def convert_pt_voice(src: Path, dst: Path, dim: int, streams: int) -> None:
    """Write `dst` (.npz with `embeddings` float32 [N-1, dim] and `cache` int64 [streams, C])."""
    try:
        import torch  # the export stack only; the runtime reads the .npz
    except ModuleNotFoundError:
        raise PpxError(f"{src}: a .pt voice preset needs torch: pip install "
                       "'personaplex-edge[export]' (or make venv)") from None
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise PpxError(f"{src}: not a readable torch voice preset ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "embeddings" not in state or "cache" not in state:
        raise PpxError(f"{src}: expected a dict with 'embeddings' and 'cache'")
    emb = state["embeddings"].float().numpy()
    cache = state["cache"].long().numpy()
    if emb.ndim < 2 or emb.shape[-1] != dim:
        raise PpxError(f"{src}: embeddings: shape {list(emb.shape)}, expected [N, 1, 1, {dim}]")
    emb = emb.reshape(-1, dim)
    if cache.ndim == 3:
        cache = cache[0]
    if cache.ndim != 2 or cache.shape[0] != streams:
        raise PpxError(f"{src}: cache: shape {list(state['cache'].shape)}, expected [1, {streams}, C]")
    tmp = dst.with_name(dst.name + ".partial.npz")
    np.savez(tmp, embeddings=emb.astype(np.float32), cache=cache.astype(np.int64))
    os.replace(tmp, dst)


def bundle_voices(sources: dict[str, Path], out_dir: Path, dim: int, streams: int) -> dict[str, str]:
    """Copy/convert each voice into `out_dir`; returns name -> file relative to the build."""
    out_dir.mkdir(exist_ok=True)
    listed: dict[str, str] = {}
    for name, src in sources.items():
        if src.suffix == ".pt":
            convert_pt_voice(src, out_dir / f"{name}.npz", dim, streams)
            listed[name] = f"{out_dir.name}/{name}.npz"
        else:
            shutil.copyfile(src, out_dir / src.name)
            listed[name] = f"{out_dir.name}/{src.name}"
    return listed


def builtin_voice_gaps(voices: Iterable[str]) -> str | None:
    """Which built-in personas a build with these voice presets cannot start, and why (None: all
    can). Said at export time: otherwise the first `play` on the build is where it shows."""
    from personaplex_edge.runtime.core.persona import builtin_personas, load_persona

    have = set(voices)
    missing: dict[str, list[str]] = {}
    for name in builtin_personas():
        persona = load_persona(name)
        if not persona.voice_is_file and persona.voice not in have:
            missing.setdefault(persona.voice, []).append(name)
    if not missing:
        return None
    names = [name for group in missing.values() for name in group]
    return (f"no voice {', '.join(missing)} (build voices: {', '.join(sorted(have)) or 'none'}): the "
            f"built-in personas {', '.join(names)} will fail on this build; give personas a voice it "
            "has or a .wav voice")
