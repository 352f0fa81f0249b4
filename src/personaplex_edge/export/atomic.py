"""Outputs appear whole or not at all (build in a temporary sibling, then rename), and never
over their own inputs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from personaplex_edge.runtime.errors import PpxError


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out`.

    On any error the temporary directory is removed and `out` is untouched.
    An existing, non-empty `out` is only replaced with `force`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PpxError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise PpxError(f"{out}: directory exists and is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PpxError(f"{out.parent}: cannot create: {exc.strerror}") from None
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_overlap(out: Path, inputs: Mapping[str, Path | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (flag -> path).

    Replacing the output directory would delete the input (`onnx --checkpoint ck --out ck
    --force` would lose a 16.7 GB download), and writing inside it would change it; so this
    runs before any work, whatever --force says."""
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "contains"
        elif source in target.parents:
            how = "is inside"
        else:
            continue
        raise PpxError(f"{flag} {out}: {how} the {name} directory {path}; writing there would "
                       f"{'change' if how == 'is inside' else 'replace'} it: choose another {flag}")
