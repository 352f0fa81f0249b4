"""What the daemon's audio DSP costs per ALSA period: capture conversion and the playback chain.

One 20 ms period at 48 kHz stereo, both directions, as the capture and playback threads run it:
CaptureConverter (downmix, resample to 24 kHz, re-frame), PlaybackConverter (24 kHz frames to
the device rate), OutputStage (gain, fades, limiter) and the int16 packer. A period must cost a
small part of its 20 ms.

Usage: python bench/bench_dsp.py [--periods 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from personaplex_edge.runtime.audio.dsp import (
    CaptureConverter,
    Int16Packer,
    OutputStage,
    PlaybackConverter,
)
from personaplex_edge.runtime.constants import FRAME_SAMPLES

PERIOD = 960  # 20 ms at 48 kHz


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (0.2 * x * np.sin(np.linspace(0, 40, n)) ** 2).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=2000)
    args = parser.parse_args()
    cap = CaptureConverter(48000, 2)
    play = PlaybackConverter(48000)
    stage = OutputStage(48000, gain_db=3.0)
    stage.fade_in()
    packer = Int16Packer(2, PERIOD)
    pcm = np.rint(speechlike(PERIOD * 2) * 32767).astype(np.int16)
    frame = speechlike(FRAME_SAMPLES)
    buf = np.empty(PERIOD, np.float32)
    times = []
    for k in range(args.periods):
        t0 = time.perf_counter()
        cap.frames(pcm)
        if k % 4 == 0:  # one 80 ms model frame per four 20 ms periods
            play.push_frame(frame)
        play.pop_into(buf)
        packer.pack(stage.process(buf))
        times.append((time.perf_counter() - t0) * 1e6)
    t = np.asarray(times[100:])
    print(f"capture + playback DSP per 20 ms period at 48 kHz stereo: p50 {np.percentile(t, 50):.0f} us, "
          f"p99 {np.percentile(t, 99):.0f} us ({np.percentile(t, 50) / 200:.2f}% of the period)")


if __name__ == "__main__":
    main()
