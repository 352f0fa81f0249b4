"""The virtual cabin as a process: what a daemon plays comes back on its microphone.

    python -m personaplex_edge.sim.cabin --speaker SPK_FIFO --mic MIC_FIFO --out DIR [options]

tests/test_echo_alsa.py points alsa-lib's `file` plugins at two FIFOs (sim.devices:
`speaker_file` and the mic `infile`, both over the clocked ppx_clock). This process reads
the speaker FIFO (what the daemon wrote to ALSA, int16, `--spk-channels`) and, for every chunk,
writes the same number of mic samples (int16 mono) to the mic FIFO:

    mic[n] = echo[n] + driver[n] + noise[n]
    echo   = echo_gain * (cabin IR `--speaker-ir` * loudspeaker(speaker[n - lead]))
    driver = the driver's questions through the driver IR, from `--driver-from-s` on
    noise  = road noise `--snr-db` below the driver's active level

So the mic runs sample for sample with the speaker stream, `--lead-ms` behind it: that much
silence is in the FIFO before the daemon opens it, the margin that keeps the capture side from
ever reading an empty FIFO (a short read would shift the mic stream). The FIFO's fill is
logged, and its lowest value after the capture started is in stats.json: above zero, the
mic stream stayed aligned. The echo path the daemon's canceller sees is the ALSA delays plus
`lead` plus the file plugin's own hold (it writes a period out once more than a buffer waits)
plus the IR.

Both FIFOs are opened before the daemon starts, the mic one read-write, so neither of the
daemon's opens blocks (a blocking open in a device thread would hold up the other thread).
Everything that went in and out is appended to DIR as float32 (speaker.f32: the mono speaker
stream; echo.f32, driver.f32, noise.f32: the mic's parts, mic-sample indexed). SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np

from personaplex_edge.sim.acoustics import active_rms, convolve, driver_speech, load_ir, loudspeaker
from personaplex_edge.sim.noise import mix_at_snr, road_noise

F_SETPIPE_SZ = 1031  # fcntl.h (Linux)
FIONREAD = 0x541B
PIPE_BYTES = 1 << 20
CHUNK = 960  # speaker frames convolved at a time (the FFT is sized for it)


class OverlapAdd:
    """Streaming linear convolution with a fixed IR, any chunk up to CHUNK samples."""

    def __init__(self, ir: np.ndarray) -> None:
        self.m = len(ir)
        self.n = 1 << (CHUNK + self.m - 1).bit_length()
        self.h = np.fft.rfft(ir, self.n)
        self.tail = np.zeros(self.m - 1)

    def push(self, x: np.ndarray) -> np.ndarray:
        y = np.fft.irfft(np.fft.rfft(x, self.n) * self.h, self.n)[: len(x) + self.m - 1]
        y[: self.m - 1] += self.tail
        self.tail = y[len(x):].copy()
        return y[: len(x)]


def near_end(rate: int, seconds: float, driver_from_s: float, driver_dbfs: float,
             snr_db: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The driver (from driver_from_s, starting with his first word) and the road noise."""
    n = int(seconds * rate)
    talker = convolve(driver_speech(rate, seconds + 5.0), load_ir("driver", rate))
    talker *= np.float32(10 ** (driver_dbfs / 20) / active_rms(talker, rate))
    block = rate // 50
    energy = np.mean(talker[: len(talker) // block * block].reshape(-1, block) ** 2, axis=1)
    first = max(0, int(np.argmax(energy > np.max(energy) * 1e-3)) * block - rate // 10)
    driver = np.zeros(n, np.float32)
    start = int(driver_from_s * rate)
    driver[start:] = talker[first : first + n - start]
    noise = mix_at_snr(talker, road_noise(seconds + 5.0, rate, seed), snr_db, rate)[:n]
    return driver, noise.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speaker", type=Path, required=True)
    ap.add_argument("--mic", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--spk-channels", type=int, default=2)
    ap.add_argument("--lead-ms", type=float, default=120.0)
    ap.add_argument("--speaker-ir", default="door")
    ap.add_argument("--echo-gain", type=float, default=1.0)
    ap.add_argument("--drive", type=float, default=1.0, help="loudspeaker drive (nonlinearity)")
    ap.add_argument("--even", type=float, default=0.05, help="loudspeaker even-order term")
    ap.add_argument("--driver-from-s", type=float, default=6.0)
    ap.add_argument("--driver-dbfs", type=float, default=-26.0)
    ap.add_argument("--snr-db", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=40.0, help="longest run (driver track)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rate, out = args.rate, args.out
    out.mkdir(parents=True, exist_ok=True)
    driver, noise = near_end(rate, args.seconds, args.driver_from_s, args.driver_dbfs,
                             args.snr_db, args.seed)
    room = OverlapAdd(load_ir(args.speaker_ir, rate) * args.echo_gain)
    lead = int(args.lead_ms * rate / 1000)

    spk = os.open(args.speaker, os.O_RDONLY | os.O_NONBLOCK)
    mic = os.open(args.mic, os.O_RDWR)  # never blocks; the daemon's O_RDONLY open then won't
    for fd in (spk, mic):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass
    os.set_blocking(mic, False)
    files = {k: open(out / f"{k}.f32", "wb") for k in ("speaker", "echo", "driver", "noise")}  # noqa: SIM115
    fill_log = open(out / "fill.log", "w")  # noqa: SIM115

    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    n = 0  # mic samples written
    dropped = 0
    stats: dict = {"lead": lead, "min_fill": None, "speaker_samples": 0, "mic_samples": 0}

    def write_mic(echo: np.ndarray) -> None:
        nonlocal n, dropped
        k = len(echo)
        d, z = driver[n : n + k], noise[n : n + k]
        if len(d) < k:  # past the prepared track: no driver, no noise
            d = np.concatenate([d, np.zeros(k - len(d), np.float32)])
            z = np.concatenate([z, np.zeros(k - len(z), np.float32)])
        pcm = np.rint(np.clip(echo + d + z, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        try:
            written = os.write(mic, pcm)
        except BlockingIOError:
            written = 0
        dropped += len(pcm) - written  # never with a 1 MB pipe; counted to be sure
        for key, part in (("echo", echo), ("driver", d), ("noise", z)):
            files[key].write(np.asarray(part, "<f4").tobytes())
        n += k

    write_mic(np.zeros(lead, np.float32))
    (out / "ready").write_text("1")
    pending = b""
    frame_bytes = 2 * args.spk_channels
    t0 = time.monotonic()
    poller = select.poll()
    poller.register(spk, select.POLLIN)
    while not stop:
        if not poller.poll(50):
            continue
        try:
            data = os.read(spk, 1 << 16)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not data:  # no writer (the daemon closed the device): wait for the next
            time.sleep(0.02)
            continue
        pending += data
        whole = len(pending) // frame_bytes * frame_bytes
        raw, pending = pending[:whole], pending[whole:]
        x = np.frombuffer(raw, "<i2").reshape(-1, args.spk_channels).mean(axis=1) / 32768.0
        files["speaker"].write(x.astype("<f4").tobytes())
        stats["speaker_samples"] += len(x)
        for i in range(0, len(x), CHUNK):
            part = x[i : i + CHUNK]
            write_mic(room.push(loudspeaker(part, args.drive, args.even)).astype(np.float32))
        fill = struct.unpack("i", fcntl.ioctl(mic, FIONREAD, b"\0\0\0\0"))[0] // 2
        if stats["speaker_samples"] > 2 * rate // 10:  # the capture side is reading by now
            stats["min_fill"] = fill if stats["min_fill"] is None else min(stats["min_fill"], fill)
        fill_log.write(f"{time.monotonic() - t0:.3f} {fill}\n")
    stats.update(mic_samples=n, dropped_bytes=dropped,
                 min_fill_ms=None if stats["min_fill"] is None
                 else 1000.0 * stats["min_fill"] / rate)
    for f in (*files.values(), fill_log):
        f.close()
    (out / "stats.json").write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
