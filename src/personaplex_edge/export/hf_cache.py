"""Resolve `--checkpoint` to a directory: a local path, or a repo id in the Hugging Face cache.

`resolve_checkpoint("nvidia/personaplex-7b-v1@main")` returns the cached snapshot
(`models--nvidia--personaplex-7b-v1/snapshots/<commit>`) found by `huggingface_hub`
with `local_files_only=True`, so it never touches the network. Only `download=True`
fetches, and then only the files the export reads. A path that exists is always a path;
something shaped like `org/name[@revision]` that is not one is a repo id.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from personaplex_edge.runtime.errors import PpxError

from .config import FILE_KEYS, ModelConfig

# What `Checkpoint.open` and `voice_sources` read; config.json may name further files.
EXPORT_PATTERNS = ("config.json", "model.safetensors", "tokenizer-*.safetensors",
                   "tokenizer_spm_*.model", "voices.tgz", "voices/*")
# A branch, tag or commit: a conservative subset of git's ref names. With `..` refused as
# well, the ref file looked up under refs/ never lies outside it.
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")


def is_repo_spec(text: str) -> bool:
    """True when `text` names a Hub repo rather than a directory."""
    if Path(text).expanduser().exists():
        return False
    # Written like a path (absolute, relative, home) or a single name: keep the path's own error.
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    # `out/ck` where `out` is a local directory: a mistyped path, not the Hub org "out".
    if Path(text.split("/", 1)[0]).expanduser().is_dir():
        return False
    return "/" in text


def hub_cache_dir() -> Path:
    """The hub cache: HF_HUB_CACHE, else HF_HOME/hub, else the library's default."""
    from huggingface_hub import constants

    # Read at call time: the library reads these when it is first imported.
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """`org/name[@revision]` -> (repo id, revision or None); a bad one is one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = spec.partition("@")
    shape = "neither a directory nor a Hugging Face repo id (org/name[@revision])"
    if repo_id.count("/") != 1:
        raise PpxError(f"checkpoint {spec}: {shape}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PpxError(f"checkpoint {spec}: {shape}: {repo_id!r} is not a valid repo id") from None
    if at and (not _REF.fullmatch(revision) or ".." in revision or revision.endswith("/")):
        raise PpxError(f"checkpoint {spec}: {shape}: revision {revision!r} is not a branch, "
                       "tag or 40-hex commit")
    return repo_id, (revision if at else None)


def resolve_checkpoint(spec: str, download: bool = False) -> Path:
    """The checkpoint directory `spec` names: itself, or its snapshot in the hub cache."""
    if not is_repo_spec(spec):
        return Path(spec).expanduser()
    repo_id, revision = parse_repo_spec(spec)
    cache = hub_cache_dir()
    if download:
        snapshot = _download(spec, repo_id, revision, cache, list(EXPORT_PATTERNS))
        missing = [n for n in _named_files(snapshot) if not (snapshot / n).exists()]
        if missing:  # config.json names files outside the default patterns
            snapshot = _download(spec, repo_id, revision, cache, missing)
    else:
        snapshot = _cached_snapshot(spec, repo_id, revision, cache)
    _check_snapshot(spec, snapshot)
    return snapshot


def _cached_snapshot(spec: str, repo_id: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    # Raised (by newer hub versions only) when a cached tree listing shows files missing.
    incomplete = getattr(errors, "IncompleteSnapshotError", ())

    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    fetch = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}` or add --download"
    if not repo_dir.is_dir():
        # Also says "not a directory": `out/ckpt` with a typo reads as a repo id too.
        raise PpxError(f"checkpoint {spec}: not a directory, and not in the Hugging Face cache "
                       f"({cache}); accept the licence at https://huggingface.co/{repo_id}, then {fetch}")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                 allow_patterns=list(EXPORT_PATTERNS))
    except incomplete as exc:
        why = " ".join(str(exc).split())
        raise PpxError(f"checkpoint {spec}: incomplete in the Hugging Face cache ({why}); {fetch}") from None
    except errors.LocalEntryNotFoundError:
        refs = sorted(p.relative_to(repo_dir / "refs").as_posix()
                      for p in (repo_dir / "refs").rglob("*") if p.is_file())
        cached = f"cached: {', '.join(refs)}" if refs else "no cached refs"
        raise PpxError(f"checkpoint {spec}: revision {revision or 'main'} is not in the Hugging Face "
                       f"cache ({repo_dir}; {cached}); {fetch}") from None
    return Path(path)


def _download(spec: str, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"https://huggingface.co/{repo_id}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=patterns))
    except GatedRepoError:
        raise PpxError(f"checkpoint {spec}: gated: accept the licence at {url} and log in "
                       "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise PpxError(f"checkpoint {spec}: no such repository on the Hugging Face Hub "
                       "(or it is private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise PpxError(f"checkpoint {spec}: no revision {revision} in {url}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PpxError(f"checkpoint {spec}: download failed ({first})") from None


def _named_files(snapshot: Path) -> list[str]:
    """Files the snapshot's config.json names (its own errors are left to load_model_config)."""
    try:
        raw = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    return [raw[k] for k in FILE_KEYS if isinstance(raw.get(k), str) and raw[k]]


def _check_snapshot(spec: str, snapshot: Path) -> None:
    """Every file the export reads resolves: a missing blob is named here, not mid-export."""
    defaults = ModelConfig()
    named = {getattr(defaults, k) for k in FILE_KEYS} | set(_named_files(snapshot))
    for path in sorted(snapshot.rglob("*")):
        rel = path.relative_to(snapshot).as_posix()
        read = rel in named or any(fnmatch.fnmatch(rel, p) for p in EXPORT_PATTERNS)
        if read and path.is_symlink() and not path.exists():
            raise PpxError(f"checkpoint {spec}: {path}: blob missing (broken symlink in the Hugging "
                           "Face cache); fetch it again or add --download")
