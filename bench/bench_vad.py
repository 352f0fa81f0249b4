"""The driver's voice activity in road noise: Silero VAD (ONNX Runtime) against WebRTC VAD.

What is measured, per 80 ms frame (the runtime's frame), at 0, 5 and 10 dB SNR:
  precision, recall and F1 of "the driver is speaking" against labels from the clean speech,
  and the CPU time per frame of each detector fed the 24 kHz frame that goes to Mimi (its
  resampling to 16 kHz included), plus how many frames of road noise alone it calls speech.

The signal: the shipped speech (tests/data/*.wav, export/data/calib/*.wav,
export/data/synth_voice.wav; with --espeak also sentences made now by espeak-ng) laid end to
end with seeded 0.5-3 s silences between files, then road noise (personaplex_edge.sim.noise) added at
the SNR, where the speech level is mix_at_snr's active level of the speech alone (no gaps).
Averaged over --seeds road-noise seeds.

Labels, from the clean signal (personaplex_edge.sim.speech_corpus says it exactly): a frame is speech if
at least 20 ms of it is within 30 dB of its file's active level, held for 3 more frames (240 ms).

Detectors, all streaming frame by frame, all with the runtime's 2-frame hangover (a detector
decides about a frame at least half a frame late, and its hangover adds to that: 2 frames gave
Silero its best F1 against the 3-frame labels, 3 only cost precision):
  silero       runtime/audio/vad.py's UserVad as shipped: Silero VAD v6 (sequence ONNX model)
               on ONNX Runtime CPU, one thread, soxr QQ to 16 kHz; speech from 0.5, held
               down to 0.35.
  silero-hq    the same with soxr HQ resampling (anti-aliased, up to 37 ms more delay).
  webrtc-N     WebRTC's GMM VAD (webrtcvad-wheels) at aggressiveness N on 20 ms sub-frames
               (soxr HQ to 16 kHz); a frame is speech if at least 2 of its 4 sub-frames are.
  webrtc-3-hp  webrtc-3 after a 4th-order 600 Hz high-pass (scipy), to keep the road rumble
               out of its energy features: the best WebRTC variant found.

Usage: python bench/bench_vad.py [--espeak] [--seeds 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soxr

from personaplex_edge.runtime.audio.vad import (
    RESAMPLE_QUALITY,
    USER_HANGOVER,
    VAD_RATE,
    Hangover,
    UserVad,
)
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.sim.noise import road_noise
from personaplex_edge.sim.speech_corpus import (
    conversation,
    noisy,
    scores,
    shipped_speech,
    with_hangover,
)

SNRS = (0.0, 5.0, 10.0, float("inf"))  # inf: clean, to show every detector works at all
ESPEAK = [  # voice, words per minute, pitch, text
    ("en-us+m3", 150, 45, "Navigate to the nearest coffee shop with parking."),
    ("en-gb+f4", 170, 60, "What time does the museum close today?"),
    ("en-us+f1", 130, 70, "Call my sister and tell her we are running ten minutes late."),
    ("en-gb-x-rp+m2", 185, 35, "Is there a faster route that avoids the toll road?"),
    ("en-us+m7", 140, 50, "Open the window a little, it is getting warm in here."),
    ("en-029+f2", 160, 55, "Read me the last message from the office."),
    ("en-us-nyc+m1", 200, 40, "Skip this song. No, go back, I liked it."),
    ("en-gb-scotland+f3", 145, 65, "How much charge will we have when we arrive?"),
]


def espeak_files(tmp: Path) -> list[Path]:
    if shutil.which("espeak-ng") is None:
        sys.exit("--espeak needs espeak-ng on PATH")
    out = []
    for i, (voice, wpm, pitch, text) in enumerate(ESPEAK):
        path = tmp / f"espeak{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(path),
                        text], check=True, capture_output=True)
        out.append(path)
    return out


class Silero:
    def __init__(self, quality: str = RESAMPLE_QUALITY) -> None:
        self.name = "silero" if quality == RESAMPLE_QUALITY else f"silero-{quality.lower()}"
        self.vad = UserVad(quality=quality)

    def reset(self) -> None:
        self.vad.reset()

    def step(self, frame: np.ndarray) -> bool:
        return self.vad.step(frame).speech


class WebRtc:
    SUB = VAD_RATE // 50  # 20 ms

    def __init__(self, mode: int, highpass_hz: float | None = None) -> None:
        import webrtcvad

        self.name = f"webrtc-{mode}" + ("-hp" if highpass_hz else "")
        self.mode = mode
        self.make = webrtcvad.Vad
        self.hold = Hangover(USER_HANGOVER)
        self.sos = None
        if highpass_hz:
            from scipy.signal import butter

            self.sos = butter(4, highpass_hz, "highpass", fs=SAMPLE_RATE, output="sos")
        self.reset()

    def reset(self) -> None:
        self.vad = self.make(self.mode)  # a fresh noise model: it adapts while it runs
        self.zi = None if self.sos is None else np.zeros((len(self.sos), 2))
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32",
                                             quality="HQ")
        self.pending = np.zeros(0, np.int16)
        self.hold.reset()
        self.last = False

    def step(self, frame: np.ndarray) -> bool:
        if self.sos is not None:
            from scipy.signal import sosfilt

            frame, self.zi = sosfilt(self.sos, frame, zi=self.zi)
            frame = frame.astype(np.float32)
        y = self.resampler.resample_chunk(frame)
        y = np.clip(np.rint(y * 32767.0), -32768, 32767).astype(np.int16)
        self.pending = np.concatenate((self.pending, y))
        n = len(self.pending) // self.SUB
        if n:
            votes = [self.vad.is_speech(self.pending[i * self.SUB:(i + 1) * self.SUB].tobytes(),
                                        VAD_RATE) for i in range(n)]
            self.pending = self.pending[n * self.SUB:]
            self.last = sum(votes) >= min(2, n)
        return self.hold.step(self.last)


def run(detector, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame by frame -> (decisions, CPU ms of each frame on this thread)."""
    detector.reset()
    frames = audio.reshape(-1, FRAME_SAMPLES)
    out = np.zeros(len(frames), bool)
    ms = np.zeros(len(frames))
    for i, f in enumerate(frames):
        t0 = time.thread_time()
        out[i] = detector.step(f)
        ms[i] = (time.thread_time() - t0) * 1e3
    return out, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--espeak", action="store_true", help="add espeak-ng sentences")
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per SNR (averaged)")
    args = parser.parse_args()
    detectors = [Silero(), Silero("HQ")]
    try:
        detectors += [WebRtc(0), WebRtc(3)]
        try:
            detectors.append(WebRtc(3, highpass_hz=600.0))
        except ImportError:
            print("scipy not installed: no high-passed WebRTC variant")
    except ImportError:
        print("webrtcvad not installed (pip install webrtcvad-wheels): Silero only")
    with tempfile.TemporaryDirectory() as tmp:
        files = shipped_speech() + (espeak_files(Path(tmp)) if args.espeak else [])
        clean, speech_only, raw = conversation(files, seed=1)
    truth = with_hangover(raw)
    results: dict[str, dict] = {d.name: {"ms": []} for d in detectors}
    for snr in SNRS:
        for seed in range(args.seeds):
            audio = noisy(clean, speech_only, snr, seed)
            for d in detectors:
                pred, ms = run(d, audio)
                results[d.name].setdefault(snr, []).append(scores(pred, truth))
                results[d.name]["ms"].append(ms)
    noise_only = road_noise(30.0, SAMPLE_RATE, seed=99)
    noise_only = (0.05 * noise_only[: len(noise_only) // FRAME_SAMPLES * FRAME_SAMPLES])
    print(f"{len(files)} files, {len(clean) / SAMPLE_RATE:.0f} s, {truth.size} frames, "
          f"{truth.mean():.0%} labelled speech; {args.seeds} road-noise seeds per SNR")
    head = "".join(f"{(f'{s:g} dB' if np.isfinite(s) else 'clean') + ' P / R / F1':>20}"
                   for s in SNRS)
    print(f"{'detector':<12}{head}{'ms mean':>9}{'ms p99':>8}{'noise-only':>12}")
    for d in detectors:
        r = results[d.name]
        cells = ""
        for snr in SNRS:
            p, rc, f1 = np.mean(r[snr], axis=0)
            cells += f"{p:>8.2f} /{rc:>5.2f} /{f1:>5.2f}"
        fp, _ = run(d, noise_only)
        ms = np.concatenate(r["ms"])
        print(f"{d.name:<12}{cells}{ms.mean():>9.3f}{np.percentile(ms, 99):>8.3f}{fp.mean():>11.1%}")
    print("noise-only: share of frames called speech in 30 s of road noise alone (-26 dBFS RMS)")
    print("ms: CPU time per 80 ms frame on the calling thread, resampling included (goal <= 0.5)")


if __name__ == "__main__":
    main()
