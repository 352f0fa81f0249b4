"""Shared fixtures: one tiny synthetic checkpoint and its ONNX build per test session, and the
clocked virtual ALSA plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from personaplex_edge.export.synth import synthesize

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    synthesize("tiny", seed=0, out=out, quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from personaplex_edge.export.export_onnx import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("build") / "tiny"
    export_onnx(tiny_checkpoint, out, ExportOptions(prefill_steps=64), quiet=True)
    return out


@pytest.fixture(scope="session")
def clock_lib() -> Path:
    """The ppx_clock ALSA plugin (personaplex_edge.sim.devices), built once; skips without a C
    compiler or the ALSA headers."""
    from personaplex_edge.sim.devices import build_clock_plugin

    lib = build_clock_plugin()
    if lib is None:
        pytest.skip("no C compiler or ALSA headers (libasound2-dev) for the ppx_clock plugin")
    return lib

# The 120-step-context build that test_lifecycle and test_conversation share.
from conversation_kit import short_context_build  # noqa: E402, F401
