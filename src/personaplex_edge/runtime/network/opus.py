"""Ogg/Opus at 24 kHz both ways, through PyAV's libopus (PyAV's wheels bundle libopus, also for
aarch64 / Python 3.10: nothing to install on a Jetson besides the wheel).

`OpusDecoder.feed(bytes)` takes the client's Ogg stream in whatever pieces it arrives and gives
24 kHz float32 mono; `OpusEncoder.encode(frame)` turns one 80 ms reply frame into one Ogg page
(the first call also gives the two header pages). libopus decodes at 48 kHz; the runtime's
block-free FIR resampler (audio/resample.py, ~1.3 ms) takes it to 24 kHz.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from personaplex_edge.runtime.audio.resample import FirResampler
from personaplex_edge.runtime.constants import SAMPLE_RATE
from personaplex_edge.runtime.network.ogg import OggReader, OggWriter
from personaplex_edge.runtime.network.protocol import ProtocolError

OPUS_RATE = 48000  # the rate libopus decodes to, and Ogg/Opus counts granules in
PACKET_MS = 20  # the encoder's frame: 4 packets per 80 ms reply frame
BITRATE = 32000  # speech, mono


def _av():
    import av  # missing: one line naming the network extra (runtime/extras.py), exit 78

    return av


class OpusDecoder:
    """A client's Ogg/Opus stream -> 24 kHz mono float32 (libopus drops the pre-skip)."""

    def __init__(self) -> None:
        self._ogg = OggReader()
        self._ctx = None
        self._packets = 0
        self._resampler = FirResampler(OPUS_RATE, SAMPLE_RATE)

    def feed(self, data: bytes) -> np.ndarray:
        out: list[np.ndarray] = []
        for packet in self._ogg.feed(data):
            self._packets += 1
            if self._packets == 1:
                self._head(packet)
            elif self._packets == 2:
                if not packet.startswith(b"OpusTags"):
                    raise ProtocolError("audio: the second Ogg packet is not OpusTags")
            else:
                pcm = self._decode(packet)
                if len(pcm):
                    out.append(self._resampler.resample_chunk(pcm))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _head(self, packet: bytes) -> None:
        if not packet.startswith(b"OpusHead") or len(packet) < 19:
            raise ProtocolError("audio: the stream does not start with an OpusHead packet")
        _version, channels = struct.unpack_from("<BB", packet, 8)
        if channels not in (1, 2):
            raise ProtocolError(f"audio: {channels} channels (mono or stereo only)")
        # The pre-skip goes to libopus with the OpusHead: it drops those samples itself.
        av = _av()
        ctx = av.CodecContext.create("libopus", "r")
        ctx.extradata = packet
        self._ctx = ctx

    def _decode(self, packet: bytes) -> np.ndarray:
        av = _av()
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except (av.error.FFmpegError, ValueError) as exc:
            raise ProtocolError(f"audio: Opus packet {self._packets - 2} does not decode "
                                f"({type(exc).__name__})") from None
        parts = []
        for frame in frames:
            raw = frame.to_ndarray()
            # scale before mixing: a mean turns int16 into float64 and would keep the int scale
            pcm = raw.astype(np.float32) / 32768.0 if raw.dtype == np.int16 else raw.astype(np.float32)
            channels = len(frame.layout.channels)
            if frame.format.is_planar:
                pcm = pcm.mean(axis=0)
            elif channels > 1:
                pcm = pcm.reshape(-1, channels).mean(axis=1)
            parts.append(np.asarray(pcm, np.float32).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class OpusEncoder:
    """24 kHz mono float32 frames -> Ogg/Opus pages (the stream the web client plays)."""

    def __init__(self, bitrate: int = BITRATE) -> None:
        av = _av()
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "flt"
        ctx.bit_rate = bitrate
        ctx.options = {"frame_duration": str(PACKET_MS), "application": "voip"}
        ctx.open()
        self._ctx = ctx
        self._ogg = OggWriter(struct.unpack("<I", os.urandom(4))[0])
        self._pts = 0
        self._granule = 0
        self._started = False
        self.pre_skip = 312  # libopus' lookahead at 48 kHz (6.5 ms), written into OpusHead

    def _headers(self) -> bytes:
        extradata = self._ctx.extradata
        head = bytes(extradata) if extradata and extradata.startswith(b"OpusHead") else (
            b"OpusHead" + struct.pack("<BBHIhB", 1, 1, self.pre_skip, SAMPLE_RATE, 0, 0))
        self.pre_skip = struct.unpack_from("<H", head, 10)[0]
        tags = b"OpusTags" + struct.pack("<I", 16) + b"personaplex-edge" + struct.pack("<I", 0)
        return (self._ogg.page([head], 0, first=True) + self._ogg.page([tags], 0))

    def encode(self, pcm: np.ndarray) -> bytes:
        av = _av()
        out = b""
        if not self._started:
            out, self._started = self._headers(), True
        samples = np.ascontiguousarray(np.clip(pcm, -1.0, 1.0), np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        self._pts += samples.shape[1]
        packets = [bytes(p) for p in self._ctx.encode(frame)]
        if not packets:
            return out
        self._granule += len(packets) * PACKET_MS * OPUS_RATE // 1000
        return out + self._ogg.page(packets, self._granule)
