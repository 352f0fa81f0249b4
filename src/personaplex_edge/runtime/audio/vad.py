"""Voice activity, one decision per 80 ms frame: the driver (a VAD), the agent, and the pauses.

    vad = UserVad()                           # Silero VAD v6 on ONNX Runtime (CPU), 16 kHz
    agent = AgentActivity()
    talk = ConversationActivity()
    for mic in frames:                        # the 1920-sample 24 kHz frame that goes to Mimi
        result = session.step(mic)
        now = talk.update(vad.step(mic).speech, agent.step(result.text_token, result.pcm))
        lifecycle.after_frame(now.speaking)   # or: now.pause_frames >= N

- `UserVad`: the driver. The mic frame is resampled 24 -> 16 kHz by a soxr stream, cut into
  Silero's 32 ms chunks (512 samples plus the previous chunk's last 64) and all chunks that are
  complete run in one ONNX Runtime call of the shipped sequence model, with the LSTM state
  carried between calls. A frame's probability is the highest of the chunks it completed.
  Speech starts at `threshold`, holds down to `release` (hysteresis), and lasts `hangover`
  frames after that. `run(audio)` is the same computation over a whole signal at once; it gives
  exactly what `step` gives frame by frame (tested).
- `AgentActivity`: the agent. It speaks while its text stream emits word tokens (anything but
  padding) or its own output is louder than a threshold, with a hangover: PersonaPlex emits one
  text token per word piece and pads while the word is spoken.
- `ConversationActivity`: both together: is someone speaking, and for how many frames has
  nobody been (what the idle reset and re-anchoring wait for).

Chunk timing: chunk j (16 kHz samples [512 j, 512 j + 512)) is decided in the first frame k
with 512 (j + 1) + lag <= 1280 (k + 1), where `lag` is the most the soxr stream ever holds back
(measured once at start-up by feeding it silence, since it depends only on sample counts). So
a frame's decision is a fixed function of sample positions, which is what makes the streaming
and the batch results identical, and the decision lags the audio by at most lag + 32 ms.

The model needs ONNX Runtime, imported on first use: every install with the `onnx` extra has
it; a TensorRT-only install adds the `vad` extra (PyPI's CPU onnxruntime, aarch64 wheels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.constants import (
    FRAME_RATE,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    TEXT_PADDING_ID,
)

VAD_RATE = 16_000  # Silero's rate (it also takes 8 kHz; 16 kHz keeps the consonants)
CHUNK = 512  # 32 ms: the chunk Silero v5/v6 was trained on
CONTEXT = 64  # samples of the previous chunk prepended to each chunk (as Silero's own wrapper)
STATE_SHAPE = (1, 1, 128)  # LSTM h and c
VAD_FRAME = FRAME_SAMPLES * VAD_RATE // SAMPLE_RATE  # 1280 samples per 80 ms frame at 16 kHz
MODEL_PATH = Path(__file__).parent / "data" / "silero_vad_16k_sequence.onnx"
# soxr's quick cubic interpolation: it runs 1 sample behind the input, where HQ holds back up
# to 37 ms. It has no anti-alias filter (10 kHz folds to 6 kHz at -2 dB), which Silero does not
# mind (its own wrapper takes 48 kHz to 16 kHz by dropping samples): in road noise it scored as
# well as HQ or better (bench/bench_vad.py), for 37 ms less delay.
RESAMPLE_QUALITY = "QQ"

# Defaults, measured in bench/bench_vad.py on speech in road noise at 0-10 dB SNR (docs/cabin-audio.md:
# "Voice activity"). Silero's own defaults are 0.5 / 0.35.
THRESHOLD = 0.5
RELEASE = 0.35
# Frames (160 ms). With the model's own decay and a frame's lag this bridges the gaps between
# words as a 240 ms hangover on the clean labels does; 3 frames only lowered precision.
USER_HANGOVER = 2
AGENT_HANGOVER = 6  # frames (480 ms): a word's audio trails its text token by a few frames
AGENT_LEVEL_DBFS = -45.0  # the model's own output above this counts as speaking


class Hangover:
    """A boolean that stays true for `frames` frames after its input was last true."""

    def __init__(self, frames: int) -> None:
        if frames < 0:
            raise ValueError(f"hangover must be >= 0 frames, not {frames}")
        self.frames = int(frames)
        self._left = 0

    def step(self, active: bool) -> bool:
        if active:
            self._left = self.frames
            return True
        if self._left > 0:
            self._left -= 1
            return True
        return False

    def reset(self) -> None:
        self._left = 0


class SpeechGate:
    """Probability -> speech: on at `threshold`, held down to `release`, then a hangover."""

    def __init__(self, threshold: float = THRESHOLD, release: float = RELEASE,
                 hangover: int = USER_HANGOVER) -> None:
        if not 0.0 < release <= threshold < 1.0:
            raise ValueError(f"need 0 < release ({release}) <= threshold ({threshold}) < 1")
        self.threshold = float(threshold)
        self.release = float(release)
        self._hold = Hangover(hangover)
        self._on = False

    def step(self, probability: float) -> bool:
        # Hysteresis first, so a word's quieter middle does not start the hangover early.
        self._on = probability >= (self.release if self._on else self.threshold)
        return self._hold.step(self._on)

    def reset(self) -> None:
        self._on = False
        self._hold.reset()


@dataclass(frozen=True)
class VadFrame:
    probability: float  # the highest Silero probability among the chunks this frame completed
    speech: bool  # after hysteresis and hangover


def _resample_lag(quality: str, frames: int = 200) -> int:
    """The most 16 kHz samples a soxr stream fed 1920-sample frames ever holds back.

    soxr releases output in internal blocks, so how far behind it runs depends only on the
    sample counts; 200 frames cover its repeating pattern many times over."""
    import soxr

    stream = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32", quality=quality)
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    delivered = lag = 0
    for k in range(1, frames + 1):
        delivered += len(stream.resample_chunk(silence))
        lag = max(lag, k * VAD_FRAME - delivered)
    return lag


def _chunk_frames(chunks: int, lag: int) -> np.ndarray:
    """The frame in which each chunk is decided (see the module docstring)."""
    ends = (np.arange(chunks, dtype=np.int64) + 1) * CHUNK + lag
    return -(-ends // VAD_FRAME) - 1


class SileroVad:
    """The shipped Silero VAD sequence model on ONNX Runtime's CPU provider, one thread."""

    def __init__(self, model_path: Path = MODEL_PATH) -> None:
        import onnxruntime as ort  # missing: one line (runtime/extras.py)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # A 0.3 M-parameter LSTM: a thread pool's hand-offs would cost more than they save,
        # and the GPU stays with the LM.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    def run(self, chunks: np.ndarray, h: np.ndarray, c: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """chunks [n, CONTEXT + CHUNK] float32 -> (probabilities [n], h, c)."""
        probs, h, c = self.session.run(["speech_probs", "hn", "cn"],
                                       {"input": chunks, "h": h, "c": c})
        return probs.reshape(-1), h, c


def _with_context(samples: np.ndarray, context: np.ndarray) -> np.ndarray:
    """[n * CHUNK] samples -> [n, CONTEXT + CHUNK]: each chunk after the previous one's tail."""
    chunks = samples.reshape(-1, CHUNK)
    out = np.empty((len(chunks), CONTEXT + CHUNK), np.float32)
    out[:, CONTEXT:] = chunks
    out[0, :CONTEXT] = context
    out[1:, :CONTEXT] = chunks[:-1, -CONTEXT:]
    return out


class UserVad:
    """The driver's voice activity, fed the 24 kHz frames that go to Mimi."""

    def __init__(self, threshold: float = THRESHOLD, release: float = RELEASE,
                 hangover: int = USER_HANGOVER, model_path: Path = MODEL_PATH,
                 quality: str = RESAMPLE_QUALITY) -> None:
        self.model = SileroVad(model_path)
        self.threshold, self.release, self.hangover = threshold, release, hangover
        self.quality = quality
        self.lag = _resample_lag(quality)
        self.gate = SpeechGate(threshold, release, hangover)
        self.reset()

    def reset(self) -> None:
        """Forget everything heard (a new conversation, a reopened microphone)."""
        import soxr

        self._resampler = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32",
                                              quality=self.quality)
        self._pending = np.zeros(0, np.float32)  # resampled, not yet in a chunk
        self._context = np.zeros(CONTEXT, np.float32)
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._frames = 0
        self._chunks = 0
        self._probability = 0.0  # held when a frame completes no chunk (only ever frame 0)
        self.gate.reset()

    def step(self, frame: np.ndarray) -> VadFrame:
        """One 80 ms frame (1920 float32 samples at 24 kHz) -> this frame's decision."""
        frame = np.asarray(frame, np.float32).reshape(-1)
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"a frame is {FRAME_SAMPLES} samples at {SAMPLE_RATE} Hz, "
                             f"not {len(frame)}")
        out = self._resampler.resample_chunk(frame)
        self._pending = np.concatenate((self._pending, out)) if len(self._pending) else out
        self._frames += 1
        # Only chunks that end `lag` before the frame's end: the same ones `run` gives this frame.
        due = (self._frames * VAD_FRAME - self.lag) // CHUNK - self._chunks
        ready = min(max(due, 0), len(self._pending) // CHUNK)
        if ready:
            chunks = _with_context(self._pending[: ready * CHUNK], self._context)
            probs, self._h, self._c = self.model.run(chunks, self._h, self._c)
            self._context = chunks[-1, -CONTEXT:].copy()
            self._pending = self._pending[ready * CHUNK:]
            self._chunks += ready
            self._probability = float(probs.max())
        return VadFrame(self._probability, self.gate.step(self._probability))

    def chunk_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """A whole 24 kHz signal, frame-aligned -> Silero's probability of every 32 ms chunk
        that `step` would have decided by the last frame. The streaming state is untouched."""
        import soxr

        audio = np.asarray(audio, np.float32).reshape(-1)
        n_frames = len(audio) // FRAME_SAMPLES
        n_chunks = max((n_frames * VAD_FRAME - self.lag) // CHUNK, 0)
        if n_chunks == 0:
            return np.zeros(0, np.float32)
        resampled = soxr.resample(audio[: n_frames * FRAME_SAMPLES], SAMPLE_RATE, VAD_RATE,
                                  quality=self.quality)
        chunks = _with_context(resampled[: n_chunks * CHUNK].astype(np.float32),
                               np.zeros(CONTEXT, np.float32))
        h = np.zeros(STATE_SHAPE, np.float32)
        c = np.zeros(STATE_SHAPE, np.float32)
        probs = []
        for start in range(0, n_chunks, 1024):  # bounded memory for long recordings
            p, h, c = self.model.run(chunks[start:start + 1024], h, c)
            probs.append(p)
        return np.concatenate(probs)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """A whole 24 kHz signal at once -> one probability per 80 ms frame (the last frame
        zero-padded), as `step` would give from a fresh start. The streaming state is untouched."""
        from personaplex_edge.runtime.audio.files import frames as cut_frames

        audio = cut_frames(np.asarray(audio, np.float32).reshape(-1), FRAME_SAMPLES).reshape(-1)
        n_frames = len(audio) // FRAME_SAMPLES
        result = np.zeros(n_frames, np.float32)
        probs = self.chunk_probabilities(audio)
        if len(probs) == 0:
            return result
        best = np.full(n_frames, -1.0, np.float32)
        np.maximum.at(best, _chunk_frames(len(probs), self.lag), probs)
        held = 0.0
        for k, value in enumerate(best):  # a frame that completed no chunk keeps the last value
            held = float(value) if value >= 0.0 else held
            result[k] = held
        return result

    def run(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A whole 24 kHz signal -> (probability, speech) per frame, as `step` frame by frame."""
        probs = self.probabilities(audio)
        gate = SpeechGate(self.threshold, self.release, self.hangover)
        return probs, np.array([gate.step(float(p)) for p in probs], bool)

    @property
    def latency_ms(self) -> float:
        """The longest a chunk's end waits for its frame's decision (resampler lag + chunking)."""
        return (self.lag + CHUNK) / VAD_RATE * 1e3


def output_level_dbfs(pcm: np.ndarray) -> float:
    """RMS level of a float frame in dB full scale (-inf for digital silence)."""
    pcm = np.asarray(pcm, np.float32)
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
    return 20.0 * math.log10(rms) if rms > 0.0 else -math.inf


class AgentActivity:
    """The agent's voice activity from its text stream and its own output level."""

    def __init__(self, hangover: int = AGENT_HANGOVER,
                 level_dbfs: float | None = AGENT_LEVEL_DBFS) -> None:
        self.level_dbfs = level_dbfs  # None: the text stream alone decides
        self._hold = Hangover(hangover)

    @staticmethod
    def is_word(text_token: int) -> bool:
        """A text token that is part of what the agent says: not padding and not a marker.
        The end-of-padding token (0) counts: it announces a word in the next frame."""
        return text_token >= 0 and text_token != TEXT_PADDING_ID

    def step(self, text_token: int, pcm: np.ndarray | None = None) -> bool:
        """One frame: `text_token` from `StepResult.text_token`, and `pcm` the model's own
        output for the frame (before the persona's gain; None or silence when muted)."""
        loud = (pcm is not None and self.level_dbfs is not None
                and output_level_dbfs(pcm) > self.level_dbfs)
        return self._hold.step(self.is_word(int(text_token)) or loud)

    def reset(self) -> None:
        self._hold.reset()


@dataclass(frozen=True)
class Activity:
    """Who is speaking in this frame, and how long nobody has."""

    user: bool
    agent: bool
    pause_frames: int  # consecutive frames, up to and including this one, with neither speaking

    @property
    def speaking(self) -> bool:
        """Someone (the driver or the agent) is speaking."""
        return self.user or self.agent

    @property
    def pause_s(self) -> float:
        return self.pause_frames / FRAME_RATE

    def paused(self, frames: int) -> bool:
        """Nobody has spoken for at least `frames` frames."""
        return self.pause_frames >= frames


class ConversationActivity:
    """Combines the driver's and the agent's activity, frame by frame."""

    def __init__(self) -> None:
        self.reset()

    def update(self, user: bool, agent: bool) -> Activity:
        self._quiet = 0 if (user or agent) else self._quiet + 1
        self.last = Activity(bool(user), bool(agent), self._quiet)
        return self.last

    def reset(self) -> None:
        self._quiet = 0
        self.last = Activity(False, False, 0)


class CabinActivity:
    """Who speaks in a frame: the driver's VAD on the microphone, the agent's text and level."""

    def __init__(self) -> None:
        self.vad = UserVad()
        self.agent = AgentActivity()
        self.talk = ConversationActivity()

    def update(self, mic: np.ndarray, text_token: int, pcm: np.ndarray | None) -> bool:
        """One frame; `pcm` None: the agent was held quiet (its words were not heard).
        Returns whether the driver or the agent speaks."""
        user = self.vad.step(mic).speech
        agent = self.agent.step(TEXT_PADDING_ID, None) if pcm is None else self.agent.step(text_token, pcm)
        return self.talk.update(user, agent).speaking

    def new_conversation(self) -> None:
        self.agent.reset()
        self.talk.reset()

    def microphone_reopened(self) -> None:
        self.vad.reset()  # its stream restarts with the device

