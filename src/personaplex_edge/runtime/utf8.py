"""Text files are UTF-8: a file that is not fails as one line naming where, not a traceback.

Personas, the daemon config and target profiles (YAML) and build manifests (JSON) are all
read through `decode_utf8`, so `persona.yaml:3: not UTF-8 text: byte 0xe9 at offset 32`
points at the offending byte whichever file it is in.
"""

from __future__ import annotations

from pathlib import Path

from personaplex_edge.runtime.errors import PpxError


def decode_utf8(raw: bytes, path: Path, error: type[PpxError] = PpxError) -> str:
    """`raw` as text, or `error("FILE:LINE: not UTF-8 text: byte 0x.. at offset N ...")`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                    f"{exc.start} (save the file as UTF-8)") from None
