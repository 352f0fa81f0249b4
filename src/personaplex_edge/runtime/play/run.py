"""`ppx-runtime play`: a recorded conversation through the full runtime, frame by frame.

The same `Conversation.step` the live daemon calls, fed from a file instead of the
microphone: the reply has exactly the input's length, and a latency report
says how each stage did against the 80 ms frame budget.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.audio.files import frames, read_audio, write_wav
from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.session import PersonaReady, Session
from personaplex_edge.runtime.errors import PpxError


@dataclass
class PlayResult:
    reply: np.ndarray
    user_tokens: np.ndarray  # [T, codebooks]
    out_tokens: np.ndarray  # [T, 1 + dep_q]
    transcript: str
    ready: PersonaReady
    frame_ms: np.ndarray
    session: Session
    # What the HTML report draws (see play/report_html.py): the input as the session
    # heard it, each frame's transcript piece, and each stage's time per frame.
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pieces: list[str] = field(default_factory=list)
    stage_ms: dict[str, np.ndarray] = field(default_factory=dict)  # NaN where a stage did not run
    backend: str = ""
    conversation: str = ""  # the lifecycle's summary: re-anchors, idle resets, longest context


def default_snapshot_dir() -> Path:
    if os.environ.get("PPX_SNAPSHOT_DIR"):
        return Path(os.environ["PPX_SNAPSHOT_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "personaplex-edge" / "snapshots"


def play(input_path: Path, build: Path, persona_ref: str, seed: int | None = None, greedy: bool = False,
         backend: str = "ort-cpu", threads: int | None = None, snapshot_dir: Path | None = None) -> PlayResult:
    audio = read_audio(input_path)
    manifest = load_manifest(build)
    snapshot_dir = snapshot_dir or default_snapshot_dir()
    manifest.verify_files(stamp_dir=snapshot_dir)  # weights checked before first use
    persona = load_persona(persona_ref, k_max=manifest.data["sampling"]["k_max"])
    if greedy:
        from dataclasses import replace

        persona = replace(persona, sampling=replace(persona.sampling, greedy=True))
    session = Session(manifest, make_backend(backend, threads), snapshot_dir)
    # The daemon's conversation, fed from a file: voice activity, re-anchors and idle resets.
    conversation = Conversation(session)
    ready = conversation.switch_persona(persona, seed=seed)
    chunks = frames(audio, FRAME_SAMPLES)
    reply, user, out, pieces, frame_ms = [], [], [], [], []
    per_frame: list[dict[str, float]] = []
    samples = session.timer.samples
    for chunk in chunks:
        seen = {name: len(values) for name, values in samples.items()}
        t0 = time.perf_counter()
        result = conversation.step(chunk).result  # a re-anchor counts in the frame it happens in
        frame_ms.append((time.perf_counter() - t0) * 1e3)
        # The timer only appends; what this step added is this frame's time per stage
        # (the encode worker has finished by the time step() has its codes).
        per_frame.append({name: sum(values[seen.get(name, 0):]) for name, values in samples.items()
                          if len(values) > seen.get(name, 0)})
        reply.append(result.pcm)
        out.append(result.frame)
        pieces.append(session.piece(result.text_token))
        user.append(result.user_codes)
    stages = list(dict.fromkeys(name for frame in per_frame for name in frame))
    stage_ms = {name: np.array([frame.get(name, math.nan) for frame in per_frame]) for name in stages}
    return PlayResult(np.concatenate(reply)[: len(audio)], np.stack(user), np.stack(out), "".join(pieces).strip(),
                      ready, np.asarray(frame_ms), session, audio=audio, pieces=pieces, stage_ms=stage_ms,
                      backend=backend, conversation=conversation.summary())


def report(result: PlayResult) -> str:
    frame = result.frame_ms
    total_audio_s = len(result.reply) / SAMPLE_RATE
    host = np.asarray(result.frame_ms) - np.asarray(result.session.timer.samples["engine"][-len(frame):])
    r = result.ready
    lines = [
        f"persona {r.persona.name}: {'compiled' if r.compiled else 'restored'} "
        f"({r.prompt_steps} prompt steps{', ' + r.why_compiled if r.compiled else ''}); "
        f"ready in {r.restore_ms:.1f} ms" + (f" after a {r.compile_ms:.0f} ms compile" if r.compiled else ""),
        result.session.timer.table(),
        f"{'frame (total)':<16}{np.percentile(frame, 50):>9.2f}{np.percentile(frame, 95):>9.2f}"
        f"{frame.max():>9.2f}{len(frame):>8}",
        f"{'host (non-engine)':<16}{np.percentile(host, 50):>9.2f}{np.percentile(host, 95):>9.2f}"
        f"{host.max():>9.2f}{len(host):>8}",
        f"real-time factor {frame.sum() / 1e3 / total_audio_s:.3f} "
        f"({frame.sum() / 1e3:.2f} s compute for {total_audio_s:.2f} s of audio; budget 80 ms per frame)",
        result.conversation,
    ]
    return "\n".join(lines)


def write_outputs(result: PlayResult, out: Path, dump_tokens: Path | None, transcript: Path | None) -> None:
    write_wav(out, result.reply)
    if dump_tokens is not None:
        tmp = dump_tokens.with_name(f".{dump_tokens.name}.partial.npz")
        np.savez(tmp, user_tokens=result.user_tokens.astype(np.int64), out_tokens=result.out_tokens.astype(np.int64))
        os.replace(tmp, dump_tokens)
    if transcript is not None:
        tmp = transcript.with_name(f".{transcript.name}.partial")
        tmp.write_text(result.transcript + "\n")
        os.replace(tmp, transcript)


def check_output_paths(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not Path(path).parent.exists():
            raise PpxError(f"{path}: directory {Path(path).parent} does not exist")
