"""Calibration data for post-training quantization, recorded from the full-precision build.

The build runs one real conversation on ONNX Runtime (`Session`, the default
persona or `--persona`, so the system-prompt prefill is part of it): the persona is compiled
(voice prompt + text prompt through `temporal_prefill`), then the speech clips
of a directory are played in turn as the user's side, 0.5 s of silence
between them. Every call into each graph is offered to a per-graph reservoir
(seeded, so a run is reproducible) that keeps at most N samples; a sample is the
complete feed dict ONNX Runtime got, keyed by ONNX input name - per-call inputs,
conv states and KV caches alike - which is what modelopt's calibrator runs.

KV caches (why the 7B needs care): a temporal-step sample carries every layer's
cache in full, [1, H, D, context] per K and V. For PersonaPlex-7B that is
32 layers x 2 x 4096 x 3000 x 4 bytes = 3.1 GB per sample, so copying the cache
into each sample cannot scale. The temporal samples therefore all reference ONE
copy of the cache taken at the end of the conversation. This is exact, not an
approximation: the graphs mask every ring slot at or after `offset` (the slot's
position would be negative), so entries written by later frames are invisible
to an earlier call, as long as the ring never wraps - which `record_calibration`
guarantees by cutting the conversation short of the context ("calibrate with a
short context"). Memory for the 7B is then one cache copy (3.1 GB) plus the
live one, whatever N is. Mimi's caches are small (and wrap every ~10 s), so
Mimi samples get their own copies.
"""

from __future__ import annotations

import bisect
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.audio.files import frames as cut_frames
from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.runtime.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    sha256_file,
)
from personaplex_edge.runtime.core.network import NETWORKS
from personaplex_edge.runtime.core.persona import DEFAULT_PERSONA, Persona, load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.errors import ConfigError, PpxError

from .progress import bar, note

DEFAULT_CALIB_DIR = Path(__file__).parent / "data" / "calib"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MIN_SECONDS = 0.5  # shorter clips carry too few frames to be worth a conversation turn
SILENCE_PEAK = 1e-4  # a clip whose peak is below this is silence, not speech
GAP_SECONDS = 0.5  # silence between clips: turn-taking, as in a real cabin conversation

# Samples kept per graph. Mimi and depformer samples are small; temporal-step samples share
# one cache (see above), so they cost little beyond the shared copy; prefill calls are few
# (the persona prompt: one call per `max_steps` chunk) and each carries many steps.
DEFAULT_SAMPLES: dict[str, int] = {
    "mimi_encoder": 64,
    "mimi_decoder": 64,
    "temporal_step": 64,
    "temporal_prefill": 4,
    "depformer": 64,
}
SHARED_CACHE_NETWORKS = ("temporal",)


@dataclass(frozen=True)
class SpeechClip:
    path: Path
    audio: np.ndarray  # float32 mono 24 kHz


@dataclass
class CalibrationSet:
    """Per graph key: recorded feed dicts (ONNX input name -> array)."""

    samples: dict[str, list[dict[str, np.ndarray]]]
    calls: dict[str, int]  # calls seen per graph (samples were drawn from these)
    files: list[str]  # clip file names, in play order
    sha256: str  # of the clips (names and bytes): identifies the calibration set
    frames: int  # conversation frames played
    persona: str = DEFAULT_PERSONA  # whose system prompt the conversation started from
    voice: str = ""  # the voice prompt it used (a preset name or a file)

    def nbytes(self, key: str) -> int:
        """Bytes held by the samples of `key` (a shared array counted once)."""
        seen: dict[int, int] = {}
        for sample in self.samples.get(key, []):
            for arr in sample.values():
                seen[id(arr)] = arr.nbytes
        return sum(seen.values())

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "files": self.files, "frames": self.frames,
                "samples": {k: len(v) for k, v in self.samples.items()}, "calls": dict(self.calls),
                "persona": self.persona, "voice": Path(self.voice).name}


def load_speech_dir(directory: Path | None, purpose: str = "calibration") -> list[SpeechClip]:
    """The usable clips of a directory of audio files (sorted by name).

    Unreadable, empty, silent and too-short files are skipped; when nothing usable is
    left, one PpxError names the directory and says what was found."""
    directory = Path(directory) if directory is not None else DEFAULT_CALIB_DIR
    if not directory.is_dir():
        raise PpxError(f"{directory}: {purpose} audio directory not found")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    clips: list[SpeechClip] = []
    problems = {"unreadable or empty": 0, f"shorter than {MIN_SECONDS} s": 0, "silent": 0}
    for path in files:
        try:
            audio = read_audio(path)
        except PpxError:
            problems["unreadable or empty"] += 1
            continue
        if len(audio) < MIN_SECONDS * SAMPLE_RATE:
            problems[f"shorter than {MIN_SECONDS} s"] += 1
        elif float(np.abs(audio).max()) < SILENCE_PEAK:
            problems["silent"] += 1
        else:
            clips.append(SpeechClip(path, audio))
    if not clips:
        found = ", ".join(f"{n} {what}" for what, n in problems.items() if n)
        detail = f"{len(files)} audio files ({found})" if files else "no .wav/.flac/.ogg files"
        raise PpxError(f"{directory}: no usable audio for {purpose}: {detail}; give a directory "
                       f"of speech recordings (WAV/FLAC/OGG, at least {MIN_SECONDS} s each)")
    return clips


def clips_sha256(clips: list[SpeechClip]) -> str:
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(clip.path.name.encode() + b"\0" + sha256_file(clip.path).encode() + b"\n")
    return digest.hexdigest()


def conversation_frames(clips: list[SpeechClip], max_frames: int | None = None) -> np.ndarray:
    """The user's side of one conversation: clips in turn, GAP_SECONDS of silence between,
    cut into frames [N, FRAME_SAMPLES] (at most `max_frames`)."""
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), np.float32)
    parts: list[np.ndarray] = []
    for i, clip in enumerate(clips):
        if i:
            parts.append(gap)
        parts.append(clip.audio)
    chunks = cut_frames(np.concatenate(parts), FRAME_SAMPLES)
    return chunks if max_frames is None else chunks[:max_frames]


def clip_end_frames(clips: list[SpeechClip], frames: int) -> list[int]:
    """For each clip the first `frames` frames of `conversation_frames` reach: how many
    frames have been played when that clip is over."""
    gap = int(GAP_SECONDS * SAMPLE_RATE)
    ends: list[int] = []
    start = 0
    for clip in clips:
        if start >= frames * FRAME_SAMPLES:
            break
        start += len(clip.audio)
        ends.append(min(-(-start // FRAME_SAMPLES), frames))
        start += gap
    return ends


class _Reservoir:
    """At most `budget` of the feeds offered, each call equally likely (Algorithm R)."""

    def __init__(self, budget: int, rng: np.random.Generator, shared: frozenset[str]):
        self.budget = budget
        self.rng = rng
        self.shared = shared  # input names kept by reference (caches, copied once at the end)
        self.samples: list[dict[str, np.ndarray]] = []
        self.calls = 0

    def offer(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.calls += 1
        if len(self.samples) < self.budget:
            slot = len(self.samples)
            self.samples.append({})
        else:
            slot = int(self.rng.integers(0, self.calls))
            if slot >= self.budget:
                return
        # Per-call inputs and states are copied (the backend may reuse their buffers);
        # shared caches are referenced live and frozen once by `freeze`.
        self.samples[slot] = {name: (value if name in self.shared else np.array(value, copy=True))
                              for name, value in feeds.items()}

    def freeze(self, frozen: dict[int, np.ndarray]) -> None:
        for sample in self.samples:
            for name in self.shared & sample.keys():
                live = sample[name]
                if id(live) not in frozen:
                    frozen[id(live)] = live.copy()
                sample[name] = frozen[id(live)]


class _RecordingSession:
    """Stands in for an onnxruntime.InferenceSession inside the ORT backend: offers every
    feed dict to the graph's reservoir, then runs the real session."""

    def __init__(self, inner: Any, reservoir: _Reservoir):
        self._inner = inner
        self._reservoir = reservoir

    def run(self, output_names: Any, feeds: Mapping[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        self._reservoir.offer(feeds)
        return self._inner.run(output_names, feeds, *args, **kwargs)


def calibration_persona(ref: str | Persona | None, manifest: Manifest) -> Persona:
    """The persona whose prompt the calibration conversation starts from.

    A named one (`--persona NAME|FILE`) is used as given. By default it is the default persona,
    but the build may lack its voice (any checkpoint without NATF2): then its prompt goes with
    the build's first voice preset, said in one line, rather than no calibration at all."""
    k_max = manifest.data["sampling"]["k_max"]
    voices = sorted(manifest.data.get("voices", {}))
    if ref is not None:
        persona = ref if isinstance(ref, Persona) else load_persona(ref, k_max=k_max)
        if not persona.voice_is_file and persona.voice not in voices:  # Session's error, early
            raise ConfigError(f"{persona.where('voice')}: voice: {persona.voice!r} is not a voice "
                              f"of this build (build voices: {', '.join(voices) or 'none'})")
        return persona
    persona = load_persona(DEFAULT_PERSONA, k_max=k_max)
    if persona.voice_is_file or persona.voice in voices:
        return persona
    if not voices:
        raise PpxError(f"{manifest.root / MANIFEST_NAME}: the build has no voices, so the default "
                       f"persona ({persona.name}, voice {persona.voice}) cannot start: give --persona "
                       "FILE, a persona YAML with a .wav voice")
    note(f"ppx-export: note: calibration: the build has no voice {persona.voice} (persona "
         f"{persona.name}'s); calibrating with {persona.name}'s prompt and the build's voice "
         f"{voices[0]}")
    return replace(persona, voice=voices[0])


def _cache_capacity(manifest: Manifest) -> int:
    return int(manifest.graph("temporal_step").meta.get("cache_capacity", manifest.model["lm"]["context"]))


def record_calibration(build_dir: Path, calib_dir: Path | None = None,
                       samples: Mapping[str, int] | None = None, graphs: tuple[str, ...] | None = None,
                       persona: str | Persona | None = None, seed: int = 0, backend: str = "ort-cpu",
                       max_frames: int | None = None, quiet: bool = False) -> CalibrationSet:
    """Run the build over the clips of `calib_dir` (default: the shipped set) and keep up to
    `samples[key]` feed dicts per graph (`graphs`: only these keys); a progress bar per clip
    unless `quiet`. `persona`: see `calibration_persona` (None: the default persona)."""
    clips = load_speech_dir(calib_dir)
    manifest = load_manifest(build_dir)
    persona = calibration_persona(persona, manifest)
    budgets = {**DEFAULT_SAMPLES, **(samples or {})}
    wanted = set(graphs) if graphs is not None else set(budgets)
    if not backend.startswith("ort-"):
        raise PpxError(f"calibration backend {backend!r}: calibration records through ONNX Runtime "
                       "(ort-cpu or ort-cuda)")
    rng = np.random.default_rng(seed)
    reservoirs: dict[str, _Reservoir] = {}
    with tempfile.TemporaryDirectory(prefix="ppx-calib-") as snapshots:
        session = Session(manifest, make_backend(backend), Path(snapshots))
        for net in (session.encoder, session.decoder, session.temporal, session.depformer):
            for key, graph in net._graphs.items():  # noqa: SLF001 - the ORT backend's own sessions
                if key not in wanted:
                    continue
                shared = frozenset(t.name for t in graph.inputs if t.role == "cache") \
                    if net.name in SHARED_CACHE_NETWORKS else frozenset()
                reservoirs[key] = _Reservoir(int(budgets.get(key, 0)), rng, shared)
                net._sessions[key] = _RecordingSession(net._sessions[key], reservoirs[key])  # noqa: SLF001
        # Sampled, not greedy: the conversation should visit the token distribution the model
        # produces in use; a fixed seed keeps the calibration set reproducible.
        prof = replace(persona, sampling=replace(persona.sampling, seed=seed, greedy=False))
        ready = session.start(prof, seed=seed)
        # One model step per frame after the prompt: stop before the ring would wrap.
        limit = max(_cache_capacity(manifest) - ready.prompt_steps - 1, 1)
        chunks = conversation_frames(clips, min(limit, max_frames) if max_frames else limit)
        ends = clip_end_frames(clips, len(chunks))
        with bar("calibration", len(ends), quiet=quiet, unit=" clips") as progress:
            played = 0
            for frame, chunk in enumerate(chunks):
                if played < len(ends):
                    progress.set_postfix_str(clips[played].path.name, refresh=False)
                session.step(chunk)
                done = bisect.bisect_right(ends, frame + 1)  # clips over after this frame
                progress.update(done - played)
                played = done
        if session.temporal.offset > _cache_capacity(manifest):  # cannot happen with the cut above
            raise PpxError("calibration: the temporal ring wrapped; shared cache samples would be wrong")
        frozen: dict[int, np.ndarray] = {}
        for reservoir in reservoirs.values():
            reservoir.freeze(frozen)
    return CalibrationSet(
        samples={k: r.samples for k, r in reservoirs.items()},
        calls={k: r.calls for k, r in reservoirs.items()},
        files=[c.path.name for c in clips], sha256=clips_sha256(clips), frames=len(chunks),
        persona=persona.name, voice=persona.voice)


def graphs_of_networks(networks: list[str]) -> tuple[str, ...]:
    return tuple(key for net in networks for key in NETWORKS[net])


__all__ = [
    "CalibrationSet", "DEFAULT_CALIB_DIR", "DEFAULT_SAMPLES", "SpeechClip", "calibration_persona",
    "clip_end_frames",
    "clips_sha256", "conversation_frames", "graphs_of_networks", "load_speech_dir", "record_calibration",
]
