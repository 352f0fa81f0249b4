"""A client that sends faster than real time for long: its session ends.

Decoding (libopus, the FIR resampler) and Ogg's pure-Python CRC (about 16 ms per 64 KiB page)
run on the endpoint's thread, which shares the CPUs with the frame loop; the jitter buffer drops
what the model cannot hear in time, but not that cost. A client may send a burst (what the
jitter buffer holds and 2 s more, or a few messages' worth of bytes) and then up to twice real
time: audio at twice the clock, bytes at twice Opus' highest bitrate. Beyond that it floods.
"""

from __future__ import annotations

from personaplex_edge.runtime.network.protocol import ProtocolError

RATE = 2.0  # how much faster than real time a client may send, after its burst
OPUS_MAX_BYTES_S = 510_000 // 8  # Opus' highest bitrate, in bytes per second


class FloodGuard:
    def __init__(self, burst_s: float, burst_bytes: int) -> None:
        self.burst_s = burst_s
        self.burst_bytes = burst_bytes
        self.started: float | None = None
        self.audio_s = 0.0
        self.bytes = 0

    def check(self, now: float, nbytes: int, audio_s: float) -> None:
        """Count one message (its bytes, and the seconds of audio it decoded to) that arrived
        at `now`; ProtocolError when the client is past its burst and twice real time."""
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        self.bytes += nbytes
        self.audio_s += audio_s
        if self.audio_s > self.burst_s + RATE * elapsed:
            raise ProtocolError(f"flood: {self.audio_s:.1f} s of audio in {elapsed:.1f} s (more "
                                f"than {RATE:g}x real time beyond network.jitter_max_ms)")
        if self.bytes > self.burst_bytes + RATE * OPUS_MAX_BYTES_S * elapsed:
            raise ProtocolError(f"flood: {self.bytes} bytes in {elapsed:.1f} s (more than "
                                f"{RATE:g}x Opus' highest bitrate)")
