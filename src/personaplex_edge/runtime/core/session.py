"""One conversation on a build: Mimi encoder -> LM -> Mimi decoder, with a persona.

`Session` owns the four networks of a build (through a backend), the text
tokenizer and the persona snapshots. `start(persona)` makes the model ready to
listen - restoring the persona's snapshot, or compiling it first - and
`step(pcm)` turns one 80 ms frame of user audio into one frame of the model's
speech plus its text token. The offline `play` command and the live daemon
both drive this class.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.audio.files import frames as cut_frames
from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.audio.loudness import normalize_loudness
from personaplex_edge.runtime.constants import (
    SAMPLE_RATE,
    TEXT_END_PADDING_ID,
    TEXT_PADDING_ID,
    ZERO_TOKEN,
)
from personaplex_edge.runtime.core.lm import LMEngine, LMShape, SamplingInputs
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, sha256_file
from personaplex_edge.runtime.core.network import Backend
from personaplex_edge.runtime.core.persona import SEED_MAX, Persona
from personaplex_edge.runtime.core.prompt import (
    VoicePreset,
    context_warning,
    prefix_rows,
    prompt_frames,
    wrap_system,
)
from personaplex_edge.runtime.core.snapshot import (
    Snapshot,
    load_snapshot,
    save_snapshot,
    snapshot_key,
)
from personaplex_edge.runtime.core.stats import StageTimer
from personaplex_edge.runtime.errors import ConfigError, PpxError

log = logging.getLogger("personaplex.session")

NETWORK_SOURCE = "network"  # Persona.source of a prompt a network client brought
NETWORK_DIR = "network"  # its snapshots: a subdirectory of the snapshot directory


@dataclass(frozen=True)
class StepResult:
    pcm: np.ndarray  # [frame_samples] float32, the model's speech for this frame
    text_token: int  # the agent's text stream token (PAD/EPAD when silent)
    frame: np.ndarray  # [1 + dep_q] the undelayed LM frame (text, agent audio, user audio)
    user_codes: np.ndarray  # [codebooks] Mimi codes of this frame's user audio


@dataclass(frozen=True)
class PersonaReady:
    persona: Persona
    compiled: bool  # a new snapshot was made (else restored)
    why_compiled: str
    restore_ms: float
    compile_ms: float
    prompt_steps: int
    snapshot_bytes: int
    snapshot: Snapshot  # the persona's prefix: what a conversation on it stands on


@dataclass(frozen=True)
class ModelState:
    """A host copy of what a conversation has put into the model. The temporal KV cache (MBs
    to GBs) only when asked for: a refused change rebuilds it from its anchor instead."""

    temporal: dict[str, np.ndarray] | None
    tokens: np.ndarray
    provided: np.ndarray
    offset: int
    encoder: dict[str, np.ndarray]
    decoder: dict[str, np.ndarray]
    sampling: SamplingInputs | None
    persona: Persona | None


class Session:
    def __init__(self, manifest: Manifest, backend: Backend, snapshot_dir: Path):
        self.manifest = manifest
        self.backend = backend
        self.snapshot_dir = Path(snapshot_dir)
        self.encoder = backend.open(manifest, "mimi_encoder")
        self.decoder = backend.open(manifest, "mimi_decoder")
        self.temporal = backend.open(manifest, "temporal")
        self.depformer = backend.open(manifest, "depformer")
        self.shape = LMShape.from_manifest(manifest)
        self.lm = LMEngine(self.temporal, self.depformer, self.shape)
        self.frame_samples = int(manifest.model["mimi"]["sample_rate"] / manifest.model["mimi"]["frame_rate"])
        self.codebooks = int(manifest.model["mimi"]["num_codebooks"])
        self.silence_tokens = tuple(manifest.data["prompt_tokens"]["silence"])
        self.prefill_steps = int(manifest.graph("temporal_prefill").meta.get("max_steps", self.shape.context))
        self.build_id = sha256_file(manifest.root / MANIFEST_NAME)
        self.tokenizer = _load_tokenizer(manifest.path(manifest.data["tokenizer"]))
        self.persona: Persona | None = None
        self.timer = StageTimer()
        self.snapshot_save_errors = 0  # snapshots that could not be written (read-only, full)
        # One worker: the encoder's streaming state must see frames in order.
        self._encoder_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppx-encode")

    # -- persona ------------------------------------------------------------------------
    def start(self, persona: Persona, seed: int | None = None) -> PersonaReady:
        """Ready the model for a new conversation with `persona` (snapshot restore, or compile).

        The model's state is replaced, also when this fails part-way (a compile runs on the live
        state): `Conversation.switch_persona` is the way in that leaves a running conversation
        untouched when a switch is refused."""
        if seed is not None and not 0 <= seed <= SEED_MAX:  # numpy would raise a bare ValueError
            raise PpxError(f"seed {seed}: expected 0..{SEED_MAX}")
        return self._start(persona, seed)

    def _start(self, persona: Persona, seed: int | None) -> PersonaReady:
        digest = persona.content_hash()  # hashes a voice file's audio: once per start
        key = snapshot_key(self.build_id, digest)
        path = self.snapshot_path(persona, digest)
        snap, why = load_snapshot(path, key)
        compile_ms = restore_ms = 0.0
        if snap is not None:
            t0 = time.perf_counter()
            try:
                self.restore(snap)
                restore_ms = (time.perf_counter() - t0) * 1e3
            except (PpxError, KeyError, ValueError):  # a valid key whose arrays do not fit
                snap, why = None, "stale (does not fit this build's state)"
        if snap is None:
            t0 = time.perf_counter()
            snap = self.compile(persona, key)
            compile_ms = (time.perf_counter() - t0) * 1e3
            try:
                save_snapshot(path, snap)
            except OSError as exc:  # still usable from memory; only the next start pays again
                self.snapshot_save_errors += 1
                log.warning("snapshot %s not saved (%s): it stays in memory only", path, exc.strerror)
            t0 = time.perf_counter()
            self.restore(snap)
            restore_ms = (time.perf_counter() - t0) * 1e3
        seed = persona.sampling.seed if seed is None else seed
        self.lm.set_sampling(persona.sampling, seed)
        self.persona = persona
        steps = int(snap.arrays["lm.offset"])
        if (crowded := context_warning(steps, self.shape.context)) is not None:
            # play prints it on stderr (runtime/console.py), serve logs it
            log.warning("%s: prompt: %s", persona.where("prompt"), crowded)
        return PersonaReady(persona, compile_ms > 0, why, restore_ms, compile_ms, steps,
                            snap.nbytes(), snap)

    def snapshot_path(self, persona: Persona, digest: str | None = None) -> Path:
        """Where `persona`'s snapshot on this build lives (absent: `start` compiles it);
        `digest`: its content hash, if already known."""
        # The build's digest is in the name too: builds sharing a directory keep their own.
        digest = persona.content_hash() if digest is None else digest
        # A network client's prompts live apart, in a directory its owner caps (NetworkSeat).
        base = self.snapshot_dir / NETWORK_DIR if persona.source == NETWORK_SOURCE else self.snapshot_dir
        return base / f"{persona.name}-{digest[:16]}-{self.manifest.digest[:12]}.npz"

    def compile(self, persona: Persona, key: dict[str, str], batched: bool = True) -> Snapshot:
        """Run the persona's system prompt once and capture the state after it.

        `batched` runs the whole prefix as prefill calls; otherwise it is stepped
        frame by frame through the one-step graph, as upstream does (the
        reference the snapshot tests and the benchmark compare against)."""
        # Everything that can fail on the persona's content comes before the state is touched.
        voice_codes, preset = self._voice(persona)
        tokens = self.tokenizer.encode(wrap_system(persona.prompt))
        prompt = self.manifest.data["prompt_tokens"]
        frames = prompt_frames(voice_codes, tokens, prompt["silence"], prompt["sine"])
        steps = len(frames) + (len(preset.embeddings) if preset is not None else 0)
        if steps >= self.shape.context:
            raise ConfigError(f"{persona.where('prompt')}: prompt: the system prompt takes {steps} "
                              f"steps, more than the model context ({self.shape.context})")
        self.lm.reset()
        state = self.lm.state
        if batched:
            rows: list[np.ndarray] = []
            extra: list[np.ndarray] = []
            if preset is not None:
                rows, extra = self._replay_preset(preset)
            rows += prefix_rows(state, frames)
            self.lm.prefill(rows, np.stack(extra) if extra else None, max_steps=self.prefill_steps)
        else:
            if preset is not None:
                raise PpxError("step-by-step replay of an embedding preset is not supported")
            self.lm.set_sampling(persona.sampling, 0)
            for frame in frames:
                self.lm.step(user=frame.user, agent=frame.agent, text=frame.text)
        arrays = {f"temporal.{k}": v for k, v in self.temporal.snapshot(slots=self.temporal.offset).items()}
        arrays.update({"lm.tokens": state.tokens.copy(), "lm.provided": state.provided.copy(),
                       "lm.offset": np.array(state.offset, np.int64)})
        return Snapshot(key, arrays)

    def restore(self, snap: Snapshot) -> None:
        """Conversation start: LM state from the snapshot, fresh codec state (as upstream)."""
        prefix = "temporal."
        self.temporal.restore({k[len(prefix):]: v for k, v in snap.arrays.items() if k.startswith(prefix)})
        state = self.lm.state
        state.tokens[...] = snap.arrays["lm.tokens"]
        state.provided[...] = snap.arrays["lm.provided"]
        state.offset = int(snap.arrays["lm.offset"])
        self.encoder.reset()
        self.decoder.reset()

    # -- what the conversation owner builds on -------------------------------------------
    @property
    def context_fill(self) -> int:
        """Steps in the temporal transformer's context: the persona prefix plus the conversation."""
        return self.temporal.offset

    def rebuild(self, anchor: Snapshot, rows: list[np.ndarray]) -> None:
        """The temporal state becomes `anchor`'s prefix followed by `rows` (model input rows
        really fed earlier) replayed through the batched prefill graph. The token ring and the
        Mimi codec states are left as they are: the audio goes on with no seam."""
        prefix = "temporal."
        self.temporal.restore({k[len(prefix):]: v for k, v in anchor.arrays.items()
                               if k.startswith(prefix)})
        self.lm.prefill(rows, max_steps=self.prefill_steps)

    def save_state(self, temporal: bool = False) -> ModelState:
        """What a conversation has put into the model, to undo a refused change."""
        state = self.lm.state
        return ModelState(self.temporal.snapshot() if temporal else None, state.tokens.copy(), state.provided.copy(),
                          state.offset, self.encoder.snapshot(), self.decoder.snapshot(),
                          self.lm.sampling, self.persona)

    def load_state(self, saved: ModelState) -> None:
        if saved.temporal is not None:
            self.temporal.restore(saved.temporal)
        state = self.lm.state
        state.tokens[...], state.provided[...], state.offset = saved.tokens, saved.provided, saved.offset
        self.encoder.restore(saved.encoder)
        self.decoder.restore(saved.decoder)
        self.lm.sampling, self.persona = saved.sampling, saved.persona

    def check_voice(self, persona: Persona) -> None:
        """ConfigError if `persona`'s voice cannot be used with this build; touches no state."""
        if persona.voice_is_file:
            if not Path(persona.voice).is_file():  # as read_audio says it
                raise PpxError(f"{persona.voice}: audio file not found")
            return
        voices = self.manifest.data.get("voices", {})
        if persona.voice not in voices:
            known = ", ".join(voices) or "none"
            raise ConfigError(f"{persona.where('voice')}: voice: {persona.voice!r} is not a voice "
                              f"of this build (build voices: {known})")

    def _voice(self, persona: Persona) -> tuple[np.ndarray | None, VoicePreset | None]:
        self.check_voice(persona)
        if persona.voice_is_file:
            return self.encode_voice(Path(persona.voice)), None
        voices = self.manifest.data.get("voices", {})
        path = self.manifest.path(voices[persona.voice])
        if path.suffix == ".npz":
            with np.load(path) as data:
                return None, VoicePreset(data["embeddings"], data["cache"])
        return self.encode_voice(path), None

    def encode_voice(self, path: Path) -> np.ndarray:
        """Voice prompt audio -> Mimi codes [N, codebooks] (-24 LUFS, as upstream)."""
        audio = normalize_loudness(read_audio(path), SAMPLE_RATE)
        self.encoder.reset()
        codes = [self.encoder.run("mimi_encoder", {"pcm": f[None, None, :]})["codes"][0]
                 for f in cut_frames(audio, self.frame_samples)]
        self.encoder.reset()
        return np.stack(codes)

    def _replay_preset(self, preset: VoicePreset) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A released preset: its embeddings are the model inputs of the voice phase;
        the token ring saved with it replaces ours afterwards (upstream's replay)."""
        state = self.lm.state
        initial = [self.shape.card] * self.codebooks
        zero_row = np.full(len(self.shape.delays), ZERO_TOKEN, np.int64)
        rows, extra = [], []
        for emb in preset.embeddings:
            step = state.next_input(user=initial, agent=initial, text=TEXT_PADDING_ID)
            if step is None:
                step = state.next_input(user=initial, agent=initial, text=TEXT_PADDING_ID)
            rows.append(zero_row)
            extra.append(np.asarray(emb, np.float32))
            state.commit(step.text_target, step.audio_targets)
        state.load_tokens(preset.ring)
        return rows, extra

    # -- conversation -----------------------------------------------------------------
    def step(self, pcm: np.ndarray, silence_agent: bool = False) -> StepResult:
        """One 80 ms frame of user audio in, one frame of the model's speech out.

        `silence_agent` forces the agent's audio to the silence tokens for this frame
        (pause, busy driver, turn limit): the model then knows it stayed silent,
        rather than believing it said what nobody heard.

        The user's audio is Mimi-encoded on a worker thread while the LM runs (the
        LM needs this frame's user tokens only for its bookkeeping). Per-stage times
        go to `self.timer`: encode, lm, decode, and `engine` - the critical path's
        time inside the backend's run calls, so the rest of a frame is host work."""
        timer = self.timer
        encoded = self._encoder_pool.submit(self._encode, pcm)
        waited = 0.0

        def user_codes() -> np.ndarray:
            nonlocal waited
            if not encoded.done():
                t0 = time.perf_counter()
                encoded.result()
                waited += (time.perf_counter() - t0) * 1e3
            return encoded.result()

        try:
            with timer.stage("lm"):
                self.temporal.run_ms = self.depformer.run_ms = 0.0
                frame = self.lm.step(user=user_codes, agent=self.silence_tokens if silence_agent else None)
            codes = user_codes()
        except BaseException:
            # Never leave an encode running into the next reset/restore of the encoder.
            futures_wait([encoded])
            raise
        engine_ms = self.temporal.run_ms + self.depformer.run_ms + waited
        if frame is None:  # only before any prompt: nothing to say yet
            timer.add("engine", engine_ms)
            return StepResult(np.zeros(self.frame_samples, np.float32), TEXT_PADDING_ID,
                              np.full(1 + self.shape.dep_q, -2, np.int64), codes)
        agent = frame[1:1 + self.codebooks]
        with timer.stage("decode"):
            out = self.decoder.run("mimi_decoder", {"codes": agent[None, :].astype(np.int64)})["pcm"]
        timer.add("engine", engine_ms + self.decoder.run_ms)
        return StepResult(out.reshape(-1), int(frame[0]), frame, codes)

    def _encode(self, pcm: np.ndarray) -> np.ndarray:
        with self.timer.stage("encode"):
            return self.encoder.run("mimi_encoder", {"pcm": pcm.reshape(1, 1, -1)})["codes"][0]

    def piece(self, text_token: int) -> str:
        """The transcript text of one text token ('' for padding and control tokens)."""
        if text_token in (TEXT_PADDING_ID, TEXT_END_PADDING_ID) or not 0 <= text_token < self.tokenizer.get_piece_size():
            return ""
        if self.tokenizer.is_control(text_token) or self.tokenizer.is_unknown(text_token):
            return ""  # <s>, </s>, <unk>: markers, not words
        return self.tokenizer.id_to_piece(text_token).replace("\u2581", " ")


def _load_tokenizer(path: Path):
    import sentencepiece as spm

    if not path.is_file():
        raise PpxError(f"{path}: text tokenizer not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise PpxError(f"{path}: not a SentencePiece model ({exc})") from None
