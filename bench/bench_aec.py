"""Echo cancellation in the virtual car cabin: AEC off and on side by side, against the goals.

The cabin (personaplex_edge.sim.acoustics): the agent's voice (tests/data/speech_24k.wav, looped)
plays through a door or dash speaker, reaches the overhead-console microphone through the
shipped pyroomacoustics impulse responses, 100 ms after the canceller got it as reference
(ALSA playback buffer and converters); the driver (tests/data/driver_questions_24k.wav)
through his own impulse response. The echo's active level at the mic is -20 dBFS, the
driver's -26 dBFS (the speaker is louder at the mic than he is). The canceller is
runtime/audio/echo.py as the daemon would run it: 20 ms periods in, set_delay_ms(102) (the
delay the daemon measures: playback path + the acoustic 2 ms).

Cabins:
  linear       the IR only (door speaker; dash speaker on the ERLE line too)
  nonlinear    a small speaker driven hard (soft clip + even-order term, ~5 % distortion
               near full scale) and road noise 10 dB below the driver (personaplex_edge.sim.noise)

Figures:
  ERLE            single talk, 2 s to 12 s: mic energy / output energy over blocks with echo.
                  In noise the mic/out ratio is capped by the echo-to-noise ratio (stated), so
                  the output's level over the road noise alone is given as well.
  convergence     from the first echo until the sliding 200 ms ERLE reaches 25 dB and holds
                  (90 % of the next 2 s); also after the echo path changes (door -> dash at 6 s).
  double talk     the driver talks from 4 s over the agent; scored on the blocks where both
                  are active, after 5 s. The reference for "AEC on" is the driver alone through
                  the same canceller (its high-pass and processing delay are not echo), for
                  "AEC off" the clean driver at the mic. segSNR: per-20-ms SNR clamped to
                  [-10, 35] dB, averaged. Near-end gain: how loud the driver comes through
                  (projection onto the reference). "Mute" is half duplex (mic off while the
                  agent talks): segSNR 0 dB, gain -inf, correlation 0 by construction.
  Mimi input      the output resampled to 24 kHz (soxr HQ, as CaptureConverter does): RMS of
                  the residual echo over blocks with echo, single talk, after 2 s.
  CPU             per 80 ms of audio (4 periods of 20 ms through EchoStream, far and near),
                  p50 / p95 of the thread's CPU time and of wall time, at 48 and 24 kHz.

--candidates adds the raw libraries on the linear cabin (those installed): pywebrtc-audio
(what echo.py wraps), livekit's AudioProcessingModule, pyaec (speex MDF).

Usage: python bench/bench_aec.py [--candidates]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import soxr
from machine_info import describe

from personaplex_edge.runtime.audio.echo import EchoCanceller, EchoStream
from personaplex_edge.sim.acoustics import (
    BLOCK_S,
    cabin_scene,
    convergence_s,
    correlation,
    erle_db,
    near_end_gain_db,
    seg_snr_db,
)

RATE = 48000
DELAY_MS = 100.0  # playback path between the reference and the speaker
ESTIMATE_MS = 102.0  # what the daemon would tell set_delay_ms (plus the acoustic path)
PERIOD_S = 0.02


def cancel(far: np.ndarray, mic: np.ndarray, rate: int = RATE, delay_ms: float | None = ESTIMATE_MS,
           times: list | None = None) -> np.ndarray:
    """echo.py as the daemon runs it: 20 ms periods of far and mic, in step."""
    aec = EchoCanceller(rate)
    if delay_ms is not None:
        aec.set_delay_ms(delay_ms)
    stream, period, out = EchoStream(aec), int(PERIOD_S * rate), []
    for i in range(0, len(mic), period):
        t0, c0 = time.perf_counter(), time.thread_time()
        stream.far(far[i : i + period])
        out.append(stream.near(mic[i : i + period]))
        if times is not None:
            times.append((time.perf_counter() - t0, time.thread_time() - c0))
    y = np.concatenate(out)
    return np.concatenate([y, np.zeros(len(mic) - len(y), np.float32)])


def rms_dbfs(x: np.ndarray, rate: int, mask: np.ndarray, from_s: float) -> float:
    block = int(BLOCK_S * rate)
    n = min(len(x) // block, len(mask))
    e = np.mean(np.asarray(x[: n * block], np.float64).reshape(n, block) ** 2, axis=1)
    keep = mask[:n].copy()
    keep[: int(from_s / BLOCK_S)] = False
    return float(10 * np.log10(e[keep].mean() + 1e-20))


def at_24k(x: np.ndarray) -> np.ndarray:
    return soxr.resample(x, RATE, 24000, quality="HQ").astype(np.float32)


def single_talk() -> dict:
    res = {}
    for name, kw in (("door", {}), ("dash", {"speaker": "dash"}),
                     ("nonlinear", {"nonlinear": True, "snr_db": 10.0})):
        s = cabin_scene(RATE, 12.0, delay_ms=DELAY_MS, **kw)
        out = cancel(s.far, s.mic)
        r = {"erle": erle_db(s.mic, out, RATE, s.far_active, from_s=2.0),
             "conv": convergence_s(s.mic, out, RATE, s.far_active, 25.0),
             "echo_24k": rms_dbfs(at_24k(s.echo), 24000, s.far_active, 2.0),
             "resid_24k": rms_dbfs(at_24k(out), 24000, s.far_active, 2.0)}
        if kw.get("snr_db") is not None:
            r["cap"] = erle_db(s.mic, s.noise, RATE, s.far_active, from_s=2.0)
            r["over_noise"] = erle_db(out, s.noise, RATE, s.far_active, from_s=2.0)
            r["noise_24k"] = rms_dbfs(at_24k(s.noise), 24000, s.far_active, 2.0)
        res[name] = r
    # the echo path changes at 6 s (door -> dash speaker: a passenger moves, a door opens)
    a = cabin_scene(RATE, 12.0, delay_ms=DELAY_MS)
    b = cabin_scene(RATE, 12.0, delay_ms=DELAY_MS, speaker="dash")
    cut = 6 * RATE
    mic = np.concatenate([a.mic[:cut], b.mic[cut:]])
    mask = a.far_active.copy()
    out = cancel(a.far, mic)
    after = convergence_s(mic[cut:], out[cut:], RATE, mask[cut // int(BLOCK_S * RATE):], 25.0)
    res["path_change_s"] = after
    # no delay estimate at all: AEC3's own estimator has to find the 100 ms
    out = cancel(a.far, a.mic, delay_ms=None)
    res["no_estimate_erle"] = erle_db(a.mic, out, RATE, a.far_active, from_s=2.0)
    res["no_estimate_conv"] = convergence_s(a.mic, out, RATE, a.far_active, 25.0)
    return res


def double_talk() -> dict:
    res = {}
    for name, kw in (("linear", {}), ("nonlinear", {"nonlinear": True, "snr_db": 10.0})):
        s = cabin_scene(RATE, 16.0, delay_ms=DELAY_MS, driver_from_s=4.0, **kw)
        out = cancel(s.far, s.mic)
        ref = cancel(np.zeros_like(s.far), s.driver)
        both = s.driver_active & s.far_active[: len(s.driver_active)]
        both[: int(5.0 / BLOCK_S)] = False
        muted = s.mic.copy()
        block = int(BLOCK_S * RATE)
        for k in np.nonzero(s.far_active)[0]:
            muted[k * block : (k + 1) * block] = 0.0
        st = 5 * RATE
        res[name] = {
            "blocks": int(both.sum()),
            "seg_on": seg_snr_db(ref, out, RATE, both),
            "seg_off": seg_snr_db(s.driver, s.mic, RATE, both),
            "seg_mute": seg_snr_db(s.driver, muted, RATE, both),
            "gain_on": near_end_gain_db(ref, out, RATE, both),
            "corr_on": correlation(ref[st:], out[st:]),
            "corr_off": correlation(s.driver[st:], s.mic[st:]),
            "corr_mute": correlation(s.driver[st:], muted[st:]),
        }
    return res


def cpu() -> dict:
    res = {}
    for rate in (48000, 24000):
        s = cabin_scene(rate, 12.0, delay_ms=DELAY_MS)
        times: list[tuple[float, float]] = []
        cancel(s.far, s.mic, rate, times=times)
        t = np.asarray(times[: len(times) // 4 * 4]).reshape(-1, 4, 2).sum(axis=1) * 1e3
        res[rate] = {kind: (float(np.percentile(t[:, k], 50)), float(np.percentile(t[:, k], 95)))
                     for k, kind in enumerate(("wall", "cpu"))}
    return res


def candidates() -> list[tuple[str, str]]:
    """The raw libraries on the linear door cabin, 10 ms blocks, reference 100 ms ahead."""
    rows = []
    s = cabin_scene(RATE, 12.0, delay_ms=DELAY_MS)
    dt = cabin_scene(RATE, 16.0, delay_ms=DELAY_MS, driver_from_s=4.0)
    b = RATE // 100

    def run(make, process, scene, far):
        state, out, t = make(), np.zeros_like(scene.mic), []
        for i in range(0, len(scene.mic) - b + 1, b):
            t0 = time.perf_counter()
            out[i : i + b] = process(state, scene.mic[i : i + b], far[i : i + b])
            t.append(time.perf_counter() - t0)
        return out, float(np.median(t)) * 8e3

    def to16(x):
        return np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16)

    libs = []
    try:
        import pywebrtc_audio

        libs.append(("pywebrtc-audio 0.2 (AEC3)", lambda: pywebrtc_audio.AudioProcessor(
            RATE, echo_cancellation=True, high_pass_filter=True),
            lambda ap, near, far: ap.process(near, far)))
    except ImportError:
        rows.append(("pywebrtc-audio", "not installed"))
    try:
        from livekit import rtc

        def lk(apm, near, far):
            apm.process_reverse_stream(rtc.AudioFrame(to16(far).tobytes(), RATE, 1, b))
            frame = rtc.AudioFrame(to16(near).tobytes(), RATE, 1, b)
            apm.set_stream_delay_ms(0)
            apm.process_stream(frame)
            return np.frombuffer(frame.data, np.int16).astype(np.float32) / 32768

        libs.append(("livekit 1.2 APM (AEC3)", lambda: rtc.AudioProcessingModule(
            echo_cancellation=True, high_pass_filter=True), lk))
    except ImportError:
        rows.append(("livekit", "not installed"))
    try:
        from pyaec import Aec

        def speex(aec, near, far):
            y = aec.cancel_echo(to16(near).tolist(), to16(far).tolist())
            return np.asarray(y, np.float32) / 32768

        libs.append(("pyaec 1.0 (speex MDF, 200 ms)", lambda: Aec(b, RATE // 5, RATE, True), speex))
    except ImportError:
        rows.append(("pyaec", "not installed"))
    for name, make, process in libs:
        out, ms = run(make, process, s, s.far)
        erle = erle_db(s.mic, out, RATE, s.far_active, from_s=2.0)
        conv = convergence_s(s.mic, out, RATE, s.far_active, 25.0)
        out_dt, _ = run(make, process, dt, dt.far)
        ref, _ = run(make, process, type("S", (), {"mic": dt.driver})(), np.zeros_like(dt.far))
        both = dt.driver_active & dt.far_active[: len(dt.driver_active)]
        both[: int(5.0 / BLOCK_S)] = False
        seg = seg_snr_db(ref, out_dt, RATE, both)
        rows.append((name, f"ERLE {erle:5.1f} dB  conv {conv:4.2f} s  double-talk segSNR "
                           f"{seg:4.1f} dB  CPU {ms:.2f} ms / 80 ms"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", action="store_true",
                        help="also run the raw candidate libraries (those installed)")
    args = parser.parse_args()
    import pywebrtc_audio  # noqa: F401  (the aec extra; fail here with the import's own message)

    st, dt, c = single_talk(), double_talk(), cpu()
    print(f"echo cancellation in the virtual cabin, {RATE} Hz, reference {DELAY_MS:.0f} ms ahead; "
          f"{describe()}")
    row = "{:<46}{:>11}{:>11}{:>12}"
    print(row.format("", "AEC off", "AEC on", "goal"))
    print(row.format("ERLE, linear cabin, door speaker (dB)", "0.0", f"{st['door']['erle']:.1f}",
                     ">= 25"))
    print(row.format("ERLE, linear cabin, dash speaker (dB)", "0.0", f"{st['dash']['erle']:.1f}",
                     ">= 25"))
    nl = st["nonlinear"]
    print(row.format("ERLE, nonlinear speaker + road noise (dB)", "0.0", f"{nl['erle']:.1f}",
                     "stated"))
    print(f"  (the road noise caps mic/out at {nl['cap']:.1f} dB unless the noise is lowered too)")
    print(row.format("  output over the road noise alone (dB)", f"{nl['cap']:.1f}",
                     f"{nl['over_noise']:.1f}", "<= 0"))
    print(row.format("convergence to 25 dB ERLE (s)", "never", f"{st['door']['conv']:.2f}", "<= 1"))
    print(row.format("  after the echo path changes (s)", "never", f"{st['path_change_s']:.2f}",
                     "<= 1"))
    print(row.format("  no delay estimate: ERLE dB / convergence s", "",
                     f"{st['no_estimate_erle']:.1f}/{st['no_estimate_conv']:.2f}", ""))
    for name, label in (("linear", "linear"), ("nonlinear", "nonlinear+noise")):
        d = dt[name]
        print(f"double talk, {label} cabin ({d['blocks']} blocks of 20 ms with both talking):")
        print(row.format("  driver segSNR (dB; mute: 0.0)", f"{d['seg_off']:.1f}",
                         f"{d['seg_on']:.1f}", "> off, > 0"))
        print(row.format("  driver correlation (mute: 0.00)", f"{d['corr_off']:.2f}",
                         f"{d['corr_on']:.2f}", "> off"))
        print(row.format("  driver gain through the canceller (dB)", "0.0", f"{d['gain_on']:.1f}",
                         "> -6"))
    for name, label in (("door", "linear"), ("nonlinear", "nonlin.+noise")):
        r = st[name]
        print(row.format(f"level at Mimi's input, {label} (dBFS)", f"{r['echo_24k']:.1f}",
                         f"{r['resid_24k']:.1f}", f"< {nl['noise_24k']:.1f}"))
    print(row.format("  (the road noise there, for scale: dBFS)", f"{nl['noise_24k']:.1f}", "", ""))
    for rate, r in c.items():
        print(row.format(f"CPU per 80 ms frame at {rate // 1000} kHz (ms, p50/p95)", "-",
                         "{:.2f}/{:.2f}".format(*r["cpu"]), "<= 3"))
        print(row.format("  wall time (ms, p50/p95)", "-", "{:.2f}/{:.2f}".format(*r["wall"]), ""))
    if args.candidates:
        print("candidates (raw libraries, linear door cabin, 10 ms blocks):")
        for name, text in candidates():
            print(f"  {name:<32}{text}")


if __name__ == "__main__":
    main()
