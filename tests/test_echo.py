"""Echo cancellation (runtime/audio/echo.py) in the virtual cabin (personaplex_edge.sim.acoustics)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.runtime.audio.echo import (
    MISSING_LIBRARY,
    EchoCanceller,
    EchoStream,
    PassThrough,
    _FarHistory,
    make_echo_canceller,
)
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.sim.acoustics import (
    IR_RATE,
    block_active,
    cabin_scene,
    correlation,
    erle_db,
    load_ir,
    near_end_gain_db,
    seg_snr_db,
)

# The `aec` extra (part of the test install); the pass-through and missing-wheel tests run anyway.
needs_aec = pytest.mark.skipif(importlib.util.find_spec("pywebrtc_audio") is None,
                               reason="pywebrtc-audio (the aec extra) is not installed")

ROOT = Path(__file__).parents[1]


def run(aec, far: np.ndarray, mic: np.ndarray, chunk: int | None = None,
        far_chunk: int | None = None) -> np.ndarray:
    """Far and mic in step, `chunk` mic samples at a time (default: one block), as the two
    device threads would hand them over; far chunks scaled to the far rate."""
    stream = EchoStream(aec)
    chunk = chunk or aec.block
    far_chunk = far_chunk or max(1, round(chunk * len(far) / len(mic)))
    out, fi = [], 0
    for i in range(0, len(mic), chunk):
        j = fi + far_chunk if i + chunk < len(mic) else len(far)
        stream.far(far[fi:j])
        fi = j
        out.append(stream.near(mic[i : i + chunk]))
    y = np.concatenate(out)
    return np.concatenate([y, np.zeros(len(mic) - len(y), np.float32)])


def driver_through(rate: int, driver: np.ndarray) -> np.ndarray:
    """The driver as the canceller passes him with no echo at all (its high-pass included): the
    fair reference for what it keeps of him in double talk."""
    return run(EchoCanceller(rate), np.zeros_like(driver), driver)


@needs_aec
@pytest.mark.parametrize("rate,speaker", [(48000, "door"), (48000, "dash"), (24000, "door")])
def test_residual_echo_is_20_db_below_the_echo_after_one_second(rate: int, speaker: str) -> None:
    scene = cabin_scene(rate, 6.0, speaker=speaker, delay_ms=60.0)
    aec = make_echo_canceller("webrtc", rate)
    aec.set_delay_ms(62.0)  # what the daemon would estimate: playback path + acoustics
    out = run(aec, scene.far, scene.mic, chunk=rate // 50)  # 20 ms periods
    assert erle_db(scene.mic, out, rate, scene.far_active, from_s=1.0) >= 20.0
    assert aec.stats.realigned_ahead == aec.stats.realigned_behind == 0


@needs_aec
def test_double_talk_lets_the_driver_through() -> None:
    rate = 48000
    scene = cabin_scene(rate, 12.0, driver_from_s=3.0)
    out = run(make_echo_canceller("webrtc", rate), scene.far, scene.mic)
    ref = driver_through(rate, scene.driver)
    double = block_active(scene.driver, rate, -30.0) & scene.far_active
    double[: int(4.0 / 0.02)] = False  # one second into the driver's speech
    assert double.sum() > 100  # 2 s of double talk at least
    start = 4 * rate
    on, off = correlation(ref[start:], out[start:]), correlation(scene.driver[start:], scene.mic[start:])
    # Muting the mic while the agent talks ("half duplex") would score a correlation of 0,
    # a segmental SNR of 0 dB and a gain of -inf on these blocks.
    assert on > 0.65 and on > off + 0.15
    snr_on = seg_snr_db(ref, out, rate, double)
    snr_off = seg_snr_db(scene.driver, scene.mic, rate, double)
    assert snr_on > 1.0 and snr_on > snr_off + 2.0
    assert near_end_gain_db(ref, out, rate, double) > -8.0


@needs_aec
@pytest.mark.parametrize("rate,far_rate", [(48000, 24000), (24000, 48000)])
def test_a_far_end_at_another_rate_is_resampled(rate: int, far_rate: int) -> None:
    scene = cabin_scene(rate, 6.0, delay_ms=100.0)
    import soxr

    far = soxr.resample(scene.far, rate, far_rate, quality="VHQ").astype(np.float32)
    aec = make_echo_canceller("webrtc", rate, far_rate)
    aec.set_delay_ms(102.0)  # the resampler's 38 ms hold-back needs a path longer than 68 ms
    out = run(aec, far, scene.mic, chunk=rate // 50)
    assert erle_db(scene.mic, out, rate, scene.far_active, from_s=1.0) >= 20.0


@needs_aec
def test_jittery_device_threads_do_not_disturb_the_pairing() -> None:
    """The playback side delivers three periods at once, then nothing for two turns. The first
    pairing is made at the top of that cycle; the far end runs dry once at the bottom and is
    re-anchored there, and from then on the pairing holds."""
    rate = 48000
    scene = cabin_scene(rate, 6.0, delay_ms=80.0)
    aec = EchoCanceller(rate)
    aec.set_delay_ms(82.0)
    stream, period, out = EchoStream(aec), 960, []
    for k, i in enumerate(range(0, len(scene.mic), period)):
        if k % 3 == 0:
            stream.far(scene.far[i : i + 3 * period])
        out.append(stream.near(scene.mic[i : i + period]))
    out = np.concatenate(out)
    assert aec.stats.realigned_ahead == 0 and aec.stats.realigned_behind == 1
    assert erle_db(scene.mic, out, rate, scene.far_active, from_s=1.0) >= 20.0


@needs_aec
def test_a_stalled_far_end_is_silence_not_stale_echo() -> None:
    """Playback stalls at 4 s for 3 s (the speaker is silent, the driver talks), then resumes."""
    rate = 48000
    scene = cabin_scene(rate, 11.0, driver_from_s=4.0)
    stall = (4 * rate, 7 * rate)
    mic = scene.mic.copy()
    mic[stall[0] : stall[1]] = scene.driver[stall[0] : stall[1]]  # no echo while nothing plays
    aec = EchoCanceller(rate)
    b, out = aec.block, np.zeros_like(mic)
    for i in range(0, len(mic) - b + 1, b):
        if not stall[0] <= i < stall[1]:
            aec.process_far(scene.far[i : i + b])
        out[i : i + b] = aec.process_near(mic[i : i + b])
    assert np.isfinite(out).all() and np.abs(out).max() < 1.0
    ref = driver_through(rate, scene.driver)
    lo, hi = stall[0] + rate // 2, stall[1]  # after the last echo of the old far end died away
    assert correlation(ref[lo:hi], out[lo:hi]) > 0.95
    talking = block_active(scene.driver, rate, -30.0)
    in_stall = np.zeros_like(talking)
    in_stall[lo // (rate // 50) : hi // (rate // 50)] = True
    assert abs(near_end_gain_db(ref, out, rate, talking & in_stall)) < 1.0
    assert aec.stats.realigned_behind == 1 and aec.stats.silent_far_blocks >= 250
    # After the stall the far end lands where it did before: the echo is cancelled again
    # (single-talk blocks only: the driver is still talking).
    echo_only = scene.far_active & ~talking
    assert erle_db(mic, out, rate, echo_only, from_s=8.0) >= 15.0


@needs_aec
def test_drop_far_silences_what_never_played() -> None:
    rate = 48000
    aec = EchoCanceller(rate)
    aec.set_delay_ms(300.0)  # a deep playback buffer: ~260 ms queued ahead of the mic
    rng = np.random.default_rng(0)
    for _ in range(50):
        aec.process_far(rng.standard_normal(aec.block).astype(np.float32) * 0.3)
        aec.process_near(np.zeros(aec.block, np.float32))
    queued = aec.stats.silent_far_blocks
    aec.drop_far()  # the device dropped its buffer: those samples were never heard
    for _ in range(20):
        aec.process_near(np.zeros(aec.block, np.float32))
    assert aec.stats.silent_far_blocks - queued == 20 and aec.stats.dropped_far == 1


@pytest.mark.parametrize("mode", ["external", "off"])
def test_pass_through_modes_are_the_identity(mode: str) -> None:
    aec = make_echo_canceller(mode, 48000, 24000)
    assert isinstance(aec, PassThrough) and aec.mode == mode
    x = np.random.default_rng(1).uniform(-1, 1, 4800).astype(np.float32)
    aec.process_far(x)
    aec.set_delay_ms(100.0)
    assert np.array_equal(aec.process_near(x[:480]), x[:480])
    stream = EchoStream(aec)
    assert np.array_equal(np.concatenate([stream.near(x[:137]), stream.near(x[137:])]), x)


@needs_aec
def test_the_stream_reblocks_any_chunking_to_the_same_output() -> None:
    rate = 24000
    scene = cabin_scene(rate, 3.0)
    whole = run(EchoCanceller(rate), scene.far, scene.mic)  # one block at a time, far in step
    stream, out, i = EchoStream(EchoCanceller(rate)), [], 0
    rng = np.random.default_rng(2)
    while i < len(scene.mic):
        n = 240 if i == 0 else int(rng.integers(1, 700))  # the first as `run`: same pairing
        stream.far(scene.far[i : i + n])  # the far end up to the chunk's end (< 30 ms jitter)
        out.append(stream.near(scene.mic[i : i + n]))
        assert stream.pending < 240
        i += n
    got = np.concatenate(out)
    assert stream.canceller.stats.realigned_ahead == 0
    assert np.array_equal(got, whole[: len(got)]) and len(got) > len(whole) - 240


@needs_aec
def test_whole_block_chunks_come_back_at_once() -> None:
    stream = EchoStream(EchoCanceller(48000))
    x = np.zeros(960, np.float32)
    assert len(stream.near(x)) == 960 and stream.pending == 0
    assert len(stream.near(x[:500])) == 480 and stream.pending == 20
    assert len(stream.near(x[:460])) == 480 and stream.pending == 0


def test_far_history_ring() -> None:
    h, model = _FarHistory(1000), np.zeros(0, np.float32)
    rng = np.random.default_rng(3)
    for step in range(60):
        n = int(rng.integers(0, 700))
        if step % 7 == 3:
            h.silence(n)
            model = np.concatenate([model, np.zeros(n, np.float32)])
        else:
            x = rng.standard_normal(n).astype(np.float32)
            h.push(x)
            model = np.concatenate([model, x])
        if step % 11 == 5:
            begin = len(model) - int(rng.integers(0, 400))
            h.blank(begin)
            model[max(begin, 0):] = 0.0
        assert h.written == len(model)
        pos = len(model) - int(rng.integers(-50, 1100))
        out = np.empty(200, np.float32)
        h.read(pos, out)
        want = np.zeros(200, np.float32)
        for k in range(200):  # what the ring still holds, silence elsewhere
            if max(0, len(model) - 1000) <= pos + k < len(model):
                want[k] = model[pos + k]
        assert np.array_equal(out, want)


def test_configuration_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="one of webrtc, external, off"):
        make_echo_canceller("speex", 48000)
    with pytest.raises(ConfigError, match="multiple of 100 Hz"):
        make_echo_canceller("webrtc", 22050)
    with pytest.raises(ConfigError, match="far_rate"):
        make_echo_canceller("webrtc", 48000, 11025)


@needs_aec
def test_a_block_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="480-sample blocks"):
        EchoCanceller(48000).process_near(np.zeros(960, np.float32))


_BLOCK_WHEEL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pywebrtc_audio" or name.startswith("pywebrtc_audio."):
            raise ImportError("not installed")
        return None
sys.meta_path.insert(0, Block())
from personaplex_edge.runtime.audio.echo import make_echo_canceller
from personaplex_edge.runtime.errors import PpxError
make_echo_canceller("off", 48000)
make_echo_canceller("external", 48000)
try:
    make_echo_canceller("webrtc", 48000)
except PpxError as exc:
    print(exc)
"""


def test_a_missing_wheel_is_one_clear_line() -> None:
    proc = subprocess.run([sys.executable, "-c", _BLOCK_WHEEL], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MISSING_LIBRARY
    assert "pip install 'personaplex-edge[aec]'" in MISSING_LIBRARY


def test_shipped_cabin_impulse_responses() -> None:
    for name in ("door", "dash", "driver"):
        ir = load_ir(name)
        assert len(ir) == IR_RATE // 4  # 0.25 s
        onset = int(np.argmax(np.abs(ir) > 0.5 * np.abs(ir).max()))
        assert onset < IR_RATE * 5 // 1000  # the direct path within 5 ms
        edc = np.cumsum(ir[::-1] ** 2)[::-1]
        assert 10 * np.log10(edc[IR_RATE // 10] / edc[0]) < -35.0  # 35 dB down after 100 ms
    assert len(load_ir("door", 24000)) == 6000


def test_the_ir_script_reproduces_the_shipped_files() -> None:
    pytest.importorskip("pyroomacoustics")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_cabin_irs.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
