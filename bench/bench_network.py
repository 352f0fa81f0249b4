"""A network session's mic-to-speaker latency on loopback (the click probe), its parts, and the
CPU cost of Ogg/Opus per 80 ms frame.

The daemon runs on the tiny build (ONNX Runtime, CPU) on a silent virtual cabin with
PPX_DEBUG_LATENCY_PROBE=1 and the network endpoint on 127.0.0.1 (runtime/network/). A Python
client (personaplex_edge.sim.chat_client) is the remote microphone and speaker: it sends 80 ms
of audio every 80 ms in real time, as Ogg/Opus pages, silence with a 2 ms burst every ~0.5 s at
another place in its frame each time. The daemon's probe puts a click in the reply where the
frame the model heard had its peak (runtime/service/debug_audio.py), so a click that arrives
at the client took: client framing (the frame is sent once its last sample is "captured"),
Opus, loopback, the jitter buffer, the wait for the frame loop's next tick (the cabin's clock),
the model step, Opus again, loopback; a speaker would play it at the page's arrival plus its
place in the page. That time, from the burst's capture time to the click's play time, is the
figure; the jitter buffer's own mean wait (`ctl status`: network.session.jitter.wait_ms) and
the frame loop's compute are printed beside it. No playback buffer of the client is included.

Usage: python bench/bench_network.py [--build DIR] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine_info import describe

from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.runtime.network.opus import OpusDecoder, OpusEncoder
from personaplex_edge.sim.builds import tiny_build
from personaplex_edge.sim.chat_client import ChatClient
from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    reap,
    serve_config,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin
from personaplex_edge.sim.shipped import speech

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
BURST = (0.9 * np.sin(2 * np.pi * 1000 * np.arange(48) / SAMPLE_RATE)).astype(np.float32)


def opus_cpu_ms(frames: int = 200) -> tuple[float, float]:
    """CPU ms per 80 ms frame: encoding a reply frame, decoding a client's frame (+ resampling)."""
    audio = speech(SAMPLE_RATE)
    encoder, decoder = OpusEncoder(), OpusDecoder()
    chunks = [audio[(i * FRAME_SAMPLES) % (len(audio) - FRAME_SAMPLES):][:FRAME_SAMPLES]
              for i in range(frames)]
    t0 = time.process_time()
    pages = [encoder.encode(c) for c in chunks]
    enc = (time.process_time() - t0) * 1e3 / frames
    t0 = time.process_time()
    for page in pages:
        decoder.feed(page)
    dec = (time.process_time() - t0) * 1e3 / frames
    return enc, dec


def run(build: Path, seconds: float, work: Path, jitter_ms: float, page_ms: int) -> dict:
    cabin = VirtualCabin.create(work / "alsa", mic_audio=np.zeros(48000, np.float32),
                                mic_pad_s=seconds + 600, mic_rate=48000, mic_channels=2,
                                spk_rate=48000, spk_channels=2)
    port = free_port()
    config = serve_config(work, build, extra=(
        "logging: {level: warning, transcripts: false}\n"
        f"network: {{enabled: true, port: {port}, cabin_idle_s: 0, idle_timeout_s: 30, "
        f"jitter_ms: {jitter_ms}}}"))
    notify = NotifyListener(work / "notify.sock")
    proc = start_serve(config, {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path),
                                "PPX_DEBUG_LATENCY_PROBE": "1"})
    try:
        notify.wait_for("READY=1", timeout=300)
        client = ChatClient.connect(f"ws://127.0.0.1:{port}/api/chat?seed=1")
        client.wait_handshake()
        frames = int(seconds / FRAME_S)
        bursts: list[float] = []  # capture time of each burst's first sample
        t0 = time.monotonic()
        status = None
        for k in range(frames):
            pcm = np.zeros(FRAME_SAMPLES, np.float32)
            if k % 6 == 0:  # every 480 ms, at another place in the frame each time
                at = (k // 6 * 397) % (FRAME_SAMPLES - len(BURST))
                pcm[at:at + len(BURST)] = BURST
                bursts.append(t0 + (k * FRAME_SAMPLES + at) / SAMPLE_RATE)
            # Each page goes once its last sample is "captured", as a microphone would give it.
            step = int(page_ms * SAMPLE_RATE / 1000)
            for j in range(0, FRAME_SAMPLES, step):
                page = client._encoder.encode(pcm[j:j + step])
                time.sleep(max(0.0, t0 + (k * FRAME_SAMPLES + j + step) / SAMPLE_RATE
                               - time.monotonic()))
                if page:
                    client.send_audio(page)
            if k == frames - 10:
                status = ctl_json(config, "status")
        time.sleep(1.0)
        client.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        reap(proc, notify)
    clicks = []
    for arrival, pcm in list(client.audio):
        idx = np.flatnonzero(np.abs(pcm) > 0.05)
        if len(idx):
            clicks.append(arrival + idx[0] / SAMPLE_RATE)
    latencies = []
    # The first second is the session's start (the jitter buffer fills): left out.
    bursts = [b for b in bursts if b > t0 + 1.0]
    for b in bursts:  # each burst's first click after it (a click can spill into the next page)
        after = [c for c in clicks if b < c < b + 0.45]
        if after:
            latencies.append((after[0] - b) * 1e3)
    session = (status or {}).get("network", {}).get("session") or {}
    return {"latencies": latencies, "bursts": len(bursts), "jitter": session.get("jitter", {}),
            "frame_p50": (status or {}).get("frame_ms_p50"),
            "frame_p99": (status or {}).get("frame_ms_p99"),
            "rtt": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", type=Path)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--jitter-ms", default="0,40", help="network.jitter_ms values to run")
    ap.add_argument("--page-ms", type=int, default=20, help="audio per Ogg page the client sends")
    args = ap.parse_args()
    print(describe())
    enc, dec = opus_cpu_ms()
    print(f"Opus CPU per 80 ms frame: encode {enc:.2f} ms, decode {dec:.2f} ms "
          f"(decode includes Ogg parsing and the 48 -> 24 kHz resampler)")
    with tempfile.TemporaryDirectory(prefix="ppx-net-") as tmp:
        build = args.build or tiny_build(Path(tmp) / "tiny")
        for jitter_ms in (float(v) for v in args.jitter_ms.split(",")):
            work = Path(tmp) / f"jitter{jitter_ms:g}"
            work.mkdir()
            r = run(build, args.seconds, work, jitter_ms, args.page_ms)
            lat = r["latencies"]
            print(f"network.jitter_ms {jitter_ms:g}, {args.page_ms} ms pages:")
            if not lat:
                print("  no click came back")
                continue
            q = statistics.quantiles(lat, n=10) if len(lat) >= 10 else [min(lat)] * 9
            print(f"  click probe over loopback: {len(lat)} of {r['bursts']} clicks back; median "
                  f"{statistics.median(lat):.1f} ms, p10 {q[0]:.1f}, p90 {q[-1]:.1f}, "
                  f"max {max(lat):.1f}")
            print(f"  jitter buffer: mean wait {r['jitter'].get('wait_ms')} ms, underruns "
                  f"{r['jitter'].get('underruns')}")
            print(f"  frame loop compute: p50 {r['frame_p50']} ms, p99 {r['frame_p99']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
