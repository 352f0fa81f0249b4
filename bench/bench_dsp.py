"""The audio path's resamplers side by side, and what the daemon's DSP costs per ALSA period.

Resamplers (48 -> 24 kHz capture, 24 -> 48 kHz playback), fed 10 ms chunks as the threads do:
the block-free FIR (runtime/audio/resample.py, the default), soxr HQ and soxr HQ with vr=True.
- delay: from an input sample's arrival to its output, fed a sample at a time (impulses at
  4 places, median): what the driver hears on top of the periods;
- hold: the most output that runs behind its input after a chunk;
- ripple: gain spread of tones from 100 Hz to 10.5 kHz;
- aliasing / imaging: the loudest tone from 12.5 kHz up that leaks into the other side's band;
- CPU per 10 ms chunk (p50).
Then one 20 ms period at 48 kHz stereo, both directions, as the capture and playback threads
run it: CaptureConverter, PlaybackConverter, OutputStage and the int16 packer.

Usage: python bench/bench_dsp.py [--periods 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import soxr
from machine_info import describe

from personaplex_edge.runtime.audio.dsp import (
    CaptureConverter,
    Int16Packer,
    OutputStage,
    PlaybackConverter,
)
from personaplex_edge.runtime.audio.resample import FirResampler
from personaplex_edge.runtime.constants import FRAME_SAMPLES

PERIOD = 960  # 20 ms at 48 kHz


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (0.2 * x * np.sin(np.linspace(0, 40, n)) ** 2).astype(np.float32)


RESAMPLERS = {
    "FIR (block-free)": lambda a, b: FirResampler(a, b),
    "soxr HQ": lambda a, b: soxr.ResampleStream(a, b, 1, dtype="float32", quality="HQ"),
    "soxr HQ vr": lambda a, b: soxr.ResampleStream(a, b, 1, dtype="float32", quality="HQ", vr=True),
}


def run_chunks(make, rate_in: int, rate_out: int, x: np.ndarray, chunk: int):
    """(output, output count after each chunk, CPU seconds per chunk)."""
    stream, outs, counts, cpu = make(rate_in, rate_out), [], [], []
    for i in range(0, len(x), chunk):
        t0 = time.perf_counter()
        outs.append(stream.resample_chunk(x[i : i + chunk]))
        cpu.append(time.perf_counter() - t0)
        counts.append(sum(len(o) for o in outs))
    return np.concatenate(outs), np.asarray(counts), np.asarray(cpu)


def delay_and_hold(make, rate_in: int, rate_out: int) -> tuple[float, float]:
    """Delay: fed one sample at a time, from an impulse's arrival to the output of its peak
    (plus where the peak sits against the input's time, for streams that are not aligned);
    hold: fed 10 ms chunks, the most output running behind its input."""
    delays = []
    for k in range(4):
        at = int(0.15 * rate_in) + k * int(0.0043 * rate_in)
        x = np.zeros(int(0.25 * rate_in), np.float32)
        x[at] = 1.0
        y, counts, _ = run_chunks(make, rate_in, rate_out, x, 1)
        peak = int(np.argmax(np.abs(y)))
        emitted_at = int(np.searchsorted(counts, peak + 1))  # index of the input that gave it
        delays.append((emitted_at - at) / rate_in + (peak / rate_out - at / rate_in))
    chunk = rate_in // 100
    _, counts, _ = run_chunks(make, rate_in, rate_out, np.zeros(rate_in, np.float32), chunk)
    pushed = np.arange(1, len(counts) + 1) * chunk * rate_out / rate_in
    return 1e3 * float(np.median(delays)), 1e3 * float(np.max(pushed - counts)) / rate_out


def tone_gain_db(make, rate_in: int, rate_out: int, freq: float, band: tuple[float, float]) -> float:
    """Output level within `band` (Hz, at the output rate) of a tone at `freq`, re its input."""
    t = np.arange(rate_in) / rate_in
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    y, _, _ = run_chunks(make, rate_in, rate_out, x, rate_in // 100)
    y = y[len(y) // 4 : len(y) // 4 + rate_out // 2]
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
    f = np.fft.rfftfreq(len(y), 1 / rate_out)
    inside = spectrum[(f >= band[0]) & (f <= band[1])].sum()
    ref = np.abs(np.fft.rfft(x[: len(y)] * np.hanning(len(y)))) ** 2  # same length, same level
    return 10 * np.log10(inside / ref.sum() + 1e-30)


def resampler_table() -> None:
    row = "{:<34}" + "{:>18}" * len(RESAMPLERS)
    print(row.format("resampler", *RESAMPLERS))
    for rate_in, rate_out in ((48000, 24000), (24000, 48000)):
        low = min(rate_in, rate_out) / 2
        cells = {name: [] for name in RESAMPLERS}
        for name, make in RESAMPLERS.items():
            delay, hold = delay_and_hold(make, rate_in, rate_out)
            passband = [tone_gain_db(make, rate_in, rate_out, f, (f - 50, f + 50))
                        for f in (100, 1000, 4000, 8000, 10000, 10500)]
            # Tones that must not come through: above 12.5 kHz on the input (aliasing) or their
            # images above 12.5 kHz on the output (imaging).
            if rate_in > rate_out:
                leak = max(tone_gain_db(make, rate_in, rate_out, f, (0, low))
                           for f in (12500, 14000, 18000, 23000))
            else:
                leak = max(tone_gain_db(make, rate_in, rate_out, f, (low * 25 / 24, rate_out / 2))
                           for f in (1000, 8000, 10500, 11500))
            _, _, cpu = run_chunks(make, rate_in, rate_out,
                                   speechlike(rate_in * 4), rate_in // 100)
            cells[name] = [f"{delay:.1f}", f"{hold:.1f}", f"{np.ptp(passband):.3f}",
                           f"{leak:.1f}", f"{1e6 * np.median(cpu):.0f}"]
        print(f"{rate_in // 1000} -> {rate_out // 1000} kHz")
        kind = "aliasing" if rate_in > rate_out else "imaging"
        for i, label in enumerate(("  delay (ms)", "  hold (ms, most)", "  passband ripple (dB)",
                                   f"  {kind} from 12.5 kHz (dB)", "  CPU per 10 ms (us)")):
            print(row.format(label, *(cells[name][i] for name in RESAMPLERS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=2000)
    args = parser.parse_args()
    print(describe())
    resampler_table()
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
