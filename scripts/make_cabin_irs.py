"""Make the car-cabin impulse responses shipped in tests/data/ (cabin_ir_*_48k.wav).

    .venv/bin/python scripts/make_cabin_irs.py [--out tests/data] [--check]

A car-sized shoebox (2.5 m front to rear, 1.5 m wide, 1.2 m high) simulated with
pyroomacoustics' image-source method. Only this script needs pyroomacoustics: the tests and
the benchmark read the WAV files it writes. The image-source method has no randomness, so the
files are the same on every run (`--check` regenerates them and compares with the shipped ones).

Coordinates: x from the windscreen (x=0) to the rear window, y from the driver's side
(left-hand drive, y=0) to the passenger's side, z from the floor up.

Surfaces (octave-band absorption, 125 Hz .. 8 kHz). A cabin is dominated by two things: the
glass (windscreen, side and rear windows), which reflects, and the upholstery, carpet and
headliner, which absorb most of the mid and high frequencies. A shoebox cannot hold seats as
objects, so their absorption goes into the surfaces they cover (floor, rear wall):
  front   windscreen + hard dashboard plastic    reflective
  rear    rear seat backs + rear window           absorbent (upholstery)
  sides   side windows + door trim + occupants    partly absorbent
  floor   carpet + seat cushions                  absorbent
  ceiling headliner (felt over steel)             absorbent above 500 Hz
The result: T20 (Schroeder decay, -5..-25 dB) of 60-95 ms in the 1 kHz and 4 kHz octaves and
150-200 ms at 250 Hz, the decay curve 23-27 dB down after 50 ms and 40 dB after 100 ms;
published passenger-car measurements sit in that range (tens of ms mid-band, longer below
300 Hz). A shoebox has parallel walls that a real cabin lacks, so its low-frequency flutter
is if anything pessimistic for an echo canceller.

Positions:
  mic         overhead console at the mirror         (0.55, 0.75, 1.12)
  driver      driver's mouth                         (1.05, 0.40, 0.98)
  door        driver's door woofer, low in the door  (0.95, 0.05, 0.35)
  dash        centre dash speaker, facing the glass  (0.25, 0.75, 0.85)

Files (48 kHz mono 16-bit PCM, 0.25 s, peak-normalised to 0.9; levels are set when mixing):
  cabin_ir_door_48k.wav    door speaker -> mic   (the echo path, far speaker)
  cabin_ir_dash_48k.wav    dash speaker -> mic   (the echo path, near speaker: strong echo)
  cabin_ir_driver_48k.wav  driver's mouth -> mic (the near-end talker)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

RATE = 48000
LENGTH_S = 0.25
FADE_S = 0.02  # raised-cosine fade over the last 20 ms: the truncation adds no click
ROOM = (2.5, 1.5, 1.2)
MAX_ORDER = 40  # images up to 40 reflections: the truncated tail sits > 60 dB below the peak
BANDS = [125, 250, 500, 1000, 2000, 4000, 8000]

SURFACES = {
    # pyroomacoustics' shoebox walls: west/east along x, south/north along y, floor/ceiling z.
    # Low bands: body panels and glass flex (membrane absorption), so even "hard" surfaces take
    # 0.25-0.35 at 125 Hz. The front occupants' absorption is folded into the door walls.
    "west": ("windscreen + dashboard", [0.25, 0.15, 0.10, 0.10, 0.10, 0.10, 0.10]),
    "east": ("rear seat backs + rear window", [0.35, 0.50, 0.65, 0.75, 0.75, 0.70, 0.65]),
    "south": ("driver's door: window, trim, driver", [0.30, 0.25, 0.30, 0.35, 0.35, 0.35, 0.35]),
    "north": ("passenger door: window, trim, seat", [0.30, 0.25, 0.30, 0.35, 0.35, 0.35, 0.35]),
    "floor": ("carpet + seat cushions", [0.30, 0.45, 0.65, 0.80, 0.80, 0.80, 0.80]),
    "ceiling": ("headliner", [0.30, 0.35, 0.50, 0.65, 0.70, 0.70, 0.70]),
}

MIC = (0.55, 0.75, 1.12)
SOURCES = {
    "door": (0.95, 0.05, 0.35),
    "dash": (0.25, 0.75, 0.85),
    "driver": (1.05, 0.40, 0.98),
}


def simulate(source: tuple[float, float, float]) -> np.ndarray:
    """The raw impulse response source -> MIC (float64, pyroomacoustics' own scale)."""
    import pyroomacoustics as pra

    materials = {wall: pra.Material({"description": desc, "coeffs": coeffs, "center_freqs": BANDS})
                 for wall, (desc, coeffs) in SURFACES.items()}
    room = pra.ShoeBox(ROOM, fs=RATE, materials=materials, max_order=MAX_ORDER,
                       air_absorption=True, ray_tracing=False, use_rand_ism=False)
    room.add_source(list(source))
    room.add_microphone(list(MIC))
    room.compute_rir()
    return np.asarray(room.rir[0][0], np.float64)


def shape(ir: np.ndarray) -> np.ndarray:
    """Trim the leading silence to 1 ms before the direct path, cut to LENGTH_S, fade, normalise.

    The leading part is kept short but not removed: the acoustic delay (a few ms) stays in the
    file, as a real measurement would have it."""
    onset = int(np.argmax(np.abs(ir) > 0.1 * np.abs(ir).max()))
    start = max(0, onset - RATE // 1000)
    n = int(LENGTH_S * RATE)
    out = np.zeros(n)
    seg = ir[start : start + n]
    out[: len(seg)] = seg
    fade = int(FADE_S * RATE)
    out[-fade:] *= (1 + np.cos(np.pi * np.arange(fade) / fade)) / 2
    return 0.9 * out / np.abs(out).max()


def t20_ms(ir: np.ndarray, octave: float | None = None) -> float:
    """Reverberation time from the Schroeder backward integral: the -5..-25 dB slope x 3, of
    the whole response or of one octave band around `octave` Hz."""
    if octave is not None:
        from scipy.signal import butter, sosfilt  # pyroomacoustics' own dependency

        ir = sosfilt(butter(3, [octave / 2**0.5, octave * 2**0.5], "bandpass", fs=RATE,
                            output="sos"), ir)
    edc = np.cumsum((ir**2)[::-1])[::-1]
    edc_db = 10 * np.log10(edc / edc[0] + 1e-300)
    i5, i25 = np.argmax(edc_db <= -5.0), np.argmax(edc_db <= -25.0)
    return 3.0 * (i25 - i5) / RATE * 1e3


def delay_ms(source: tuple[float, float, float]) -> float:
    return float(np.linalg.norm(np.subtract(source, MIC)) / 343.0 * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests" / "data")
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and compare with the files in --out")
    args = parser.parse_args()
    import soundfile as sf

    status = 0
    for name, pos in SOURCES.items():
        ir = shape(simulate(pos))
        path = args.out / f"cabin_ir_{name}_48k.wav"
        pcm = np.rint(ir * 32767).astype(np.int16)
        if args.check:
            shipped, _ = sf.read(str(path), dtype="int16")
            # 2 LSB of slack: another numpy or pyroomacoustics may round a tap differently
            diff = int(np.abs(shipped.astype(np.int32) - pcm).max()) if len(shipped) == len(pcm) else -1
            same = 0 <= diff <= 2
            status |= not same
            print(f"{path.name}: {'same' if same else 'DIFFERENT'} (largest difference {diff} LSB)")
            continue
        sf.write(str(path), pcm, RATE, subtype="PCM_16")
        bands = "/".join(f"{t20_ms(ir, f):.0f}" for f in (250, 1000, 4000))
        print(f"{path.name}: direct path {delay_ms(pos):.1f} ms "
              f"({np.linalg.norm(np.subtract(pos, MIC)):.2f} m), T20 {bands} ms at "
              f"250/1k/4k Hz, {len(ir) / RATE * 1e3:.0f} ms long")
    return status


if __name__ == "__main__":
    sys.exit(main())
