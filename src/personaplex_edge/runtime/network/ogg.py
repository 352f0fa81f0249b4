"""Ogg pages (RFC 3533) in and out: packets from a byte stream that arrives in pieces, and
pages around the packets we send. Only what an Opus stream needs: one logical stream."""

from __future__ import annotations

import struct

from personaplex_edge.runtime.network.protocol import ProtocolError

CAPTURE = b"OggS"
HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, segments
MAX_PACKET = 64 * 1024  # far above any Opus packet (at most 1275 bytes per frame, 120 ms)
CONTINUED, FIRST = 0x01, 0x02


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_TABLE = _crc_table()


def crc32(data: bytes) -> int:
    """Ogg's CRC: polynomial 0x04C11DB7, not reflected, zero start (zlib's is another one)."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


class OggReader:
    """Bytes in any pieces -> whole packets, in order. ProtocolError on anything not Ogg."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._partial = bytearray()  # a packet continued on the next page
        self.serial: int | None = None
        self.pages = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        packets: list[bytes] = []
        while True:
            if len(self._buf) < HEADER.size:
                if self._buf and not CAPTURE.startswith(bytes(self._buf[:4])):
                    raise ProtocolError("audio: not an Ogg stream (no OggS page header)")
                return packets
            capture, version, flags, _granule, serial, _seq, crc, count = HEADER.unpack_from(self._buf)
            if capture != CAPTURE or version != 0:
                raise ProtocolError("audio: not an Ogg stream (no OggS page header)")
            if len(self._buf) < HEADER.size + count:
                return packets
            lacing = self._buf[HEADER.size:HEADER.size + count]
            size = HEADER.size + count + sum(lacing)
            if len(self._buf) < size:
                return packets
            page = bytes(self._buf[:size])
            del self._buf[:size]
            check = page[:22] + b"\0\0\0\0" + page[26:]
            if crc32(check) != crc:
                raise ProtocolError(f"audio: Ogg page {self.pages} fails its checksum")
            if self.serial is None:
                self.serial = serial
            elif serial != self.serial:
                raise ProtocolError("audio: more than one Ogg stream (one mono Opus stream only)")
            if not flags & CONTINUED:
                self._partial.clear()
            self.pages += 1
            at = HEADER.size + count
            for n in lacing:
                self._partial += page[at:at + n]
                at += n
                if len(self._partial) > MAX_PACKET:
                    raise ProtocolError("audio: an Ogg packet larger than any Opus packet")
                if n < 255:
                    packets.append(bytes(self._partial))
                    self._partial.clear()


class OggWriter:
    """Packets -> Ogg pages, one page per call (our pages are never larger than one 80 ms frame)."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.seq = 0

    def page(self, packets: list[bytes], granule: int, first: bool = False) -> bytes:
        lacing = bytearray()
        for packet in packets:
            lacing += b"\xff" * (len(packet) // 255) + bytes((len(packet) % 255,))
        if len(lacing) > 255:
            raise ValueError("too many packets for one Ogg page")
        flags = FIRST if first else 0
        head = HEADER.pack(CAPTURE, 0, flags, granule, self.serial, self.seq, 0, len(lacing))
        body = bytes(lacing) + b"".join(packets)
        crc = crc32(head + body)
        self.seq += 1
        return head[:22] + struct.pack("<I", crc) + head[26:] + body
