"""`ppx-export verify`: a quantized build (or TensorRT engines) against the full-precision reference.

One greedy conversation runs on the reference (default persona, its system
prompt compiled, then the speech clips as the user's side). Every call into
each network is taped, and the tested build is checked two ways:

Per network, teacher-forced (each network sees exactly the reference's inputs,
keeping its own state, so errors do not compound across networks):
  - mimi_encoder: code agreement with the reference encoder on the same audio;
  - mimi_decoder: round-trip SNR (dB) of the tested vs the reference decoder
    output for the reference codes of the user's speech;
  - temporal: the prompt through `temporal_prefill` (hidden-state cosine), then
    every conversation step's token row: greedy text-token agreement
    (argmax of the text logits) and text-logit cosine (mean, min);
  - depformer: the reference hidden state and text token, every depth step
    forced to the reference's audio token: greedy audio-token agreement and
    audio-logit cosine (mean, min).
End to end, teacher-forced: the tested build starts from the reference's persona
snapshot and runs the whole conversation with all its networks chained - its own
Mimi encoder on the user's audio, its temporal transformer, its depformer on its
own temporal hidden state - while the agent's text and audio history is the
reference's (each frame's tokens are the reference's greedy choices): greedy
text- and audio-token agreement per frame. Errors compound across networks
within a frame, but one flipped token does not desynchronise the frames after it.
Free-running (informational, not a pass/fail check): both builds run free, greedy,
from the same snapshot, and the tokens of the first N frames are compared. A
free-running conversation diverges for good at its first differing token, after
which agreement is chance: on the tiny random-weight model that comes within a
few frames for any quantization, so the figure varies from seed to seed (text
0.12 to 0.76 for every precision alike) and cannot tell a good build from a bad one.

Thresholds are per precision (the network's own; end to end uses the lowest
precision of the build) and explained in THRESHOLDS. Engines are verified the
same way through the runtime's backend interface: `backend="tensorrt"`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.core.manifest import Manifest, load_manifest
from personaplex_edge.runtime.core.network import NETWORKS, Backend, Network
from personaplex_edge.runtime.core.persona import DEFAULT_PERSONA, Persona, load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.core.snapshot import Snapshot, snapshot_key
from personaplex_edge.runtime.errors import PpxError

from .calibration import DEFAULT_CALIB_DIR, clips_sha256, conversation_frames, load_speech_dir
from .progress import bar

MAX_FRAMES = 250  # 20 s of conversation: enough samples per metric, minutes at most on a CPU
E2E_FRAMES = 50  # free-running (informational) comparison window (4 s)
SNR_CAP_DB = 200.0  # identical outputs: a finite number JSON can hold
ORDER = ("fp32", "fp16", "bf16", "int8", "int8-sq", "fp8", "int4-awq")  # increasing error

# Pass thresholds, by precision (of the network checked; end to end: the build's lowest).
#
# Derived by bench/verify_thresholds.py (issue 11: fixed bounds from one seed failed good
# builds of other seeds): tiny synthetic model, seeds 0-7, each quantized from its fp16
# build (and seeds 0-1 also from fp32) with the CLI's defaults, verified on the shipped
# calibration speech and on held-out speech (tests/data), ORT CPU: 20 runs per precision
# (fp16: its build vs the fp32 one, 4 runs). Observed min / median:
#              temporal text              depformer audio            prefill   teacher-forced e2e
#              agree  cos mean  cos min   agree  cos mean  cos min   cos min   text       audio
#   fp16       1.00   1.0000    1.0000    0.9975 1.0000    1.0000    1.0000    0.996/1.0  0.99/1.0
#   int8       0.94   0.9998    0.9994    0.949  0.9998    0.9979    0.9995    0.95/0.98  0.93/0.95
#   int8-sq    0.94   0.9995    0.976     0.93   0.9992    0.939     0.9994    0.95/0.97  0.92/0.93
#   fp8        0.82   0.9960    0.9875    0.79   0.9954    0.953     0.9931    0.83/0.89  0.73/0.78
#   int4-awq   0.65   0.9819    0.947     0.74   0.9893    0.897     0.947     0.78/0.89  0.65/0.70
#   (medians, agree: int8 0.98/0.96, int8-sq 0.96/0.95, fp8 0.89/0.83, int4-awq 0.76/0.76)
#   scrambled weights (controls, 4 runs): the scrambled network's agreement <= 0.05 (end to
#   end too), its logit cosine <= 0.01.
# Rule: bound = min - max(2 * (median - min), (1 - min) / 2) - the observed lower
# half-spread twice more below the worst run (~4 sigma below the median), at least half the
# worst error again - rounded down, lowest over the metrics sharing a key, never above a
# more precise precision's bound. A threshold is then min(bound, the reasoned bound below):
# the sweep only loosens (a trained 7B cannot be measured here, and its deeper stack keeps
# the reasoned cosine bounds honest); it moved int8 token agreement 0.90 -> 0.87, int8-sq
# cos min 0.95 -> 0.87 (seed 7 measured 0.939), fp8 token agreement 0.75 -> 0.66 and cos min
# 0.93 -> 0.87, int4-awq token agreement 0.65 -> 0.43 (seed 4: 0.651), cos mean 0.97 -> 0.967,
# cos min 0.85 -> 0.84 and prefill 0.95 -> 0.904 (seed 5: 0.947). End to end (teacher-forced,
# new) is the rule's bound, capped at the precision's token-agreement bound (the composition
# of the two networks agrees no better than each); fp32 and bf16 are not measured: fp32
# takes fp16's bounds, bf16 allows 8x fp16's worst end-to-end error (0.032 / 0.076), 0.90.
#
# Random weights make the worst case for token agreement: the logits are nearly flat, so
# top-1 margins are tiny and the smallest perturbation flips an argmax (int8 keeps a 0.9998
# cosine yet flips 5% of the 2048-way audio argmaxes). A trained 7B has peaked distributions
# (most frames one clear token, text mostly PAD while listening): agreement there is higher
# at the same cosine, so the cosine bounds are the quality gate; the agreement bounds only
# keep good tiny builds passing while a broken network (agreement ~0) still fails.
# The reasoned bounds:
# - fp32 (same build on another backend, e.g. TensorRT FP32 vs ORT CPU): only summation order
#   differs; cosine >= 0.9999, agreement >= 0.99 allows a flipped near-tie.
# - fp16: ~1e-3 relative error per layer -> cosine >= 0.999; Mimi round trip >= 30 dB (the
#   tiny fp16 Mimi measures 78 dB; a deep fp16 conv stack keeps ~40 dB).
# - bf16 (TensorRT engines only; not measured here): 8 mantissa bits, ~8x fp16's rounding
#   -> cosine 0.998 / 0.98, Mimi >= 25 dB.
# - int8 (weight-only, per output channel): quantization noise ~0.3% of each channel's range
#   -> cosine >= 0.999 mean, >= 0.99 worst frame. Published W8A16 results on 7B LLMs are
#   within noise of FP16, so a trained model sits far above these bounds.
# - int8-sq (W8A8 after smoothing): activations add per-tensor rounding -> 0.995 mean
#   (SmoothQuant W8A8 on 7B LLMs keeps perplexity within ~1% of FP16).
# - fp8 (E4M3, 3 mantissa bits: up to 6% relative rounding on weights and activations)
#   -> 0.99 mean; FP8 W8A8 on trained LLMs is near lossless, higher there.
# - int4-awq (16 levels per 128-weight block): 0.97 mean; random weights have no salient
#   channels for AWQ to protect, so the tiny model is a pessimistic case.
# - Mimi is kept at the build's precision by `quantize`; if quantized (--network), its code
#   agreement and round-trip SNR bounds follow the same scale (codes flip at Voronoi borders).
# - Free-running agreement (informational) has no bound: over the same quantized runs it
#   spans 0.12-0.76 (text) and 0.09-0.36 (audio), every precision alike (seed 3's int8:
#   0.14, the failure), so it cannot tell a good build from a bad one.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"code_agreement": 0.99, "snr_db": 60.0, "token_agreement": 0.99, "cos_mean": 0.9999,
             "cos_min": 0.999, "prefill_cos_min": 0.9999, "e2e_text": 0.98, "e2e_audio": 0.97},
    "fp16": {"code_agreement": 0.97, "snr_db": 30.0, "token_agreement": 0.97, "cos_mean": 0.999,
             "cos_min": 0.99, "prefill_cos_min": 0.999, "e2e_text": 0.97, "e2e_audio": 0.97},
    "bf16": {"code_agreement": 0.95, "snr_db": 25.0, "token_agreement": 0.95, "cos_mean": 0.998,
             "cos_min": 0.98, "prefill_cos_min": 0.998, "e2e_text": 0.9, "e2e_audio": 0.9},
    "int8": {"code_agreement": 0.9, "snr_db": 20.0, "token_agreement": 0.87, "cos_mean": 0.999,
             "cos_min": 0.99, "prefill_cos_min": 0.995, "e2e_text": 0.87, "e2e_audio": 0.87},
    "int8-sq": {"code_agreement": 0.85, "snr_db": 15.0, "token_agreement": 0.85, "cos_mean": 0.995,
                "cos_min": 0.87, "prefill_cos_min": 0.99, "e2e_text": 0.85, "e2e_audio": 0.85},
    "fp8": {"code_agreement": 0.85, "snr_db": 15.0, "token_agreement": 0.66, "cos_mean": 0.99,
            "cos_min": 0.87, "prefill_cos_min": 0.989, "e2e_text": 0.66, "e2e_audio": 0.59},
    "int4-awq": {"code_agreement": 0.7, "snr_db": 10.0, "token_agreement": 0.43, "cos_mean": 0.967,
                 "cos_min": 0.84, "prefill_cos_min": 0.904, "e2e_text": 0.43, "e2e_audio": 0.43},
}


@dataclass(frozen=True)
class Check:
    network: str
    metric: str
    value: float
    threshold: float | None
    passed: bool
    informational: bool = False  # reported, never fails the build (threshold: none)


@dataclass
class VerifyReport:
    build: str
    reference: str
    backend: str
    precisions: dict[str, str]
    inputs: dict[str, Any]
    frames: int
    e2e_frames: int
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        rows = [f"{'network':<14}{'metric':<34}{'value':>10}{'threshold':>12}  pass"]
        for c in self.checks:
            bound = "-" if c.informational else ">= " + _fmt(c.threshold)
            verdict = "info" if c.informational else "yes" if c.passed else "NO"
            rows.append(f"{c.network:<14}{c.metric:<34}{c.value:>10.4f}{bound:>12}  {verdict}")
        gating = sum(not c.informational for c in self.checks)
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failed())} of {gating} checks)"
        rows.append(f"verify: {verdict}: {self.build} ({_describe(self.precisions)}, "
                    f"{self.backend}) vs {self.reference}; {self.frames} frames, "
                    f"free-running {self.e2e_frames}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _describe(precisions: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in precisions.items())


# -- taping the reference ------------------------------------------------------------------
class _TapedNetwork:
    """A Network that passes everything through and tapes calls, resets and restores."""

    def __init__(self, inner: Network,
                 tape: list[tuple[str, str, dict[str, np.ndarray], dict[str, np.ndarray]]],
                 order: list[tuple[str, int]]):
        self._inner = inner
        self._tape = tape
        self._order = order
        self.name = inner.name

    @property
    def run_ms(self) -> float:
        return self._inner.run_ms

    @run_ms.setter
    def run_ms(self, value: float) -> None:
        self._inner.run_ms = value

    @property
    def offset(self) -> int:
        return self._inner.offset

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._inner.run(graph, inputs)
        self._tape.append(("run", graph, {k: np.array(v, copy=True) for k, v in inputs.items()},
                           {k: np.array(v, copy=True) for k, v in out.items()}))
        self._order.append((self.name, len(self._tape) - 1))
        return out

    def reset(self) -> None:
        self._tape.append(("reset", "", {}, {}))
        self._inner.reset()

    def snapshot(self, slots: int | None = None) -> dict[str, np.ndarray]:
        return self._inner.snapshot(slots)

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self._tape.append(("restore", "", {}, {}))
        self._inner.restore(state)


def _untaped(net: Any) -> Network:
    return net._inner if isinstance(net, _TapedNetwork) else net  # noqa: SLF001


class _TapingBackend:
    def __init__(self, inner: Backend):
        self._inner = inner
        self.name = inner.name
        self.tapes: dict[str, list[tuple[str, str, dict[str, np.ndarray], dict[str, np.ndarray]]]] = {}
        # (network, tape index) of every run, in call order (the encoder runs on a worker
        # thread, so only the LM's entries are ordered among the networks).
        self.order: list[tuple[str, int]] = []

    def open(self, manifest: Manifest, network: str) -> _TapedNetwork:
        tape = self.tapes.setdefault(network, [])
        return _TapedNetwork(self._inner.open(manifest, network), tape, self.order)


def _start(session: Session, persona: Persona, snap: Snapshot | None = None) -> Snapshot:
    """Session.start without the snapshot files: compile (or take `snap`), restore, greedy."""
    if snap is None:
        snap = session.compile(persona, snapshot_key(session.build_id, persona.content_hash()))
    session.restore(snap)
    session.lm.set_sampling(persona.sampling, 0)
    session.persona = persona
    return snap


def _fit_snapshot(snap: Snapshot, manifest: Manifest) -> Snapshot:
    """The reference's prompt state in the tested build's state dtypes (an fp16 build's caches)."""
    dtypes = {t.name: t.dtype for g in NETWORKS["temporal"] if g in manifest.graphs
              for t in manifest.graph(g).inputs if t.role in ("cache", "state_in")}
    arrays = {}
    for name, value in snap.arrays.items():
        inner = name.split(".", 1)[1] if name.startswith("temporal.") else ""
        arrays[name] = value.astype(dtypes[inner]) if inner in dtypes else value
    return Snapshot(snap.key, arrays)


# -- metrics -------------------------------------------------------------------------------
def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where((a == b).all(-1), 1.0, 0.0))


def snr_db(reference: np.ndarray, tested: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(reference, np.float64) - tested) ** 2))
    signal = float(np.sum(np.asarray(reference, np.float64) ** 2))
    if noise == 0.0:
        return SNR_CAP_DB
    return min(10.0 * math.log10(max(signal, 1e-30) / noise), SNR_CAP_DB)


def _conform(manifest: Manifest, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-call inputs in the dtypes the tested graph declares (an fp16 build takes fp16)."""
    dtypes = {t.name: t.dtype for t in manifest.graph(graph).inputs}
    return {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False) for k, v in inputs.items()}


def _replay(tape: list, tested: Network, manifest: Manifest) -> list[tuple[str, dict, dict]]:
    """Feed the tested network the taped inputs in order; (graph, reference out, tested out)."""
    pairs = []
    for kind, graph, inputs, ref_out in tape:
        if kind == "reset":
            tested.reset()
        elif kind == "run":
            out = tested.run(graph, _conform(manifest, graph, inputs))
            pairs.append((graph, ref_out, {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                                           else v for k, v in out.items()}))
        # "restore": after compiling, the session restores the state it just made: a no-op
    return pairs


def _teacher_forced_depformer(tape: list, reference: Network, tested: Network,
                              manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    ref_logits, test_logits = [], []
    for kind, graph, inputs, ref_out in list(tape):
        if kind != "run":
            continue
        forced = dict(inputs, forced_tokens=ref_out["audio_tokens"].astype(np.int64),
                      force_mask=np.ones_like(inputs["force_mask"], dtype=bool))
        ref_logits.append(reference.run(graph, forced)["audio_logits"])
        test_logits.append(tested.run(graph, _conform(manifest, graph, forced))["audio_logits"].astype(np.float32))
    return np.concatenate(ref_logits), np.concatenate(test_logits)


def build_precisions(manifest: Manifest, override: str | None = None) -> dict[str, str]:
    """Per network: `override`; else what the build records - an engines build's
    `engines.precision` (what TensorRT was asked for), a quantized build's
    `quantization.networks` ("none": the build's dtype) - else the build's dtype."""
    base = str(manifest.data.get("dtype", "fp32"))
    if override:
        if override not in ORDER:
            raise PpxError(f"--precision: {override!r} is not one of {', '.join(ORDER)}")
        return {net: override for net in NETWORKS}
    engines = (manifest.data.get("engines") or {}).get("precision") or {}
    quantized = (manifest.data.get("quantization") or {}).get("networks") or {}
    out = {}
    for net in NETWORKS:
        value = engines.get(net) or quantized.get(net) or "none"
        out[net] = base if value == "none" else str(value)
        if out[net] not in THRESHOLDS:
            raise PpxError(f"{manifest.root}: network {net}: precision {out[net]!r} has no verify "
                           f"thresholds (known: {', '.join(ORDER)}); give --precision")
    return out


def verify(build_dir: Path, reference_dir: Path, inputs: Path | None = None, backend: str = "ort-cpu",
           reference_backend: str = "ort-cpu", precision: str | None = None, persona: str = DEFAULT_PERSONA,
           max_frames: int = MAX_FRAMES, e2e_frames: int = E2E_FRAMES, json_path: Path | None = None,
           quiet: bool = False) -> VerifyReport:
    """Compare `build_dir` (run on `backend`) with the full-precision `reference_dir`; a
    progress bar per network unless `quiet`."""
    if max_frames < 1 or e2e_frames < 1:
        raise PpxError(f"--frames / --e2e-frames: {max_frames} / {e2e_frames}: both must be at least 1")
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise PpxError(f"--json: directory {Path(json_path).parent} does not exist")
    tested_m, ref_m = load_manifest(build_dir), load_manifest(reference_dir)
    ref_m.verify_files()
    tested_m.verify_files()
    if "quantization" in ref_m.data:
        raise PpxError(f"--reference: {reference_dir} is a quantized build; give the full-precision build")
    if tested_m.model != ref_m.model:
        raise PpxError(f"{build_dir}: not the same model as the reference {reference_dir} (model configs differ)")
    precisions = build_precisions(tested_m, precision)
    clips = load_speech_dir(inputs, purpose="verify")
    chunks = conversation_frames(clips, max_frames)
    prof = load_persona(persona, k_max=ref_m.data["sampling"]["k_max"])
    prof = replace(prof, sampling=replace(prof.sampling, greedy=True))

    taping = _TapingBackend(make_backend(reference_backend))
    tested_backend = make_backend(backend)
    checks: list[Check] = []
    with bar("verify", 6, quiet=quiet, unit=" steps") as progress, \
            tempfile.TemporaryDirectory(prefix="ppx-verify-") as scratch:
        progress.set_postfix_str("reference conversation")
        ref = Session(ref_m, taping, Path(scratch))
        snap = _start(ref, prof)
        conversation_start = len(taping.order)
        ref_frames = [ref.step(c).frame for c in chunks]
        lm_frames = _lm_frames(taping, conversation_start)
        test = Session(tested_m, tested_backend, Path(scratch))
        progress.update(1)
        for network, check in (
                ("mimi_encoder", lambda: _check_encoder(checks, taping.tapes["mimi_encoder"], test, precisions)),
                ("mimi_decoder", lambda: _check_decoder(checks, taping.tapes["mimi_encoder"], ref, test,
                                                        precisions)),
                ("temporal", lambda: _check_temporal(checks, taping.tapes["temporal"], test, precisions)),
                ("depformer", lambda: _check_depformer(checks, taping.tapes["depformer"], ref, test, precisions))):
            progress.set_postfix_str(network)
            check()
            progress.update(1)

        progress.set_postfix_str("end to end")
        _start(test, prof, _fit_snapshot(snap, tested_m))
        _check_e2e(checks, taping, lm_frames, ref, test, precisions)
        _start(test, prof, _fit_snapshot(snap, tested_m))
        n = min(e2e_frames, len(chunks))
        test_frames = [test.step(c).frame for c in chunks[:n]]
        _free_running(checks, np.stack(ref_frames[:n]), np.stack(test_frames), ref.codebooks)
        progress.update(1)

    report = VerifyReport(str(build_dir), str(reference_dir), tested_backend.name, precisions,
                          {"dir": str(inputs or DEFAULT_CALIB_DIR), "files": [c.path.name for c in clips],
                           "sha256": clips_sha256(clips)}, len(chunks), n, checks)
    if json_path is not None:
        write_json(Path(json_path), report.to_dict())
    return report


def _add(checks: list[Check], network: str, metric: str, value: float, key: str, precision: str) -> None:
    threshold = THRESHOLDS[precision][key]
    checks.append(Check(network, metric, float(value), threshold, bool(value >= threshold)))


def _check_encoder(checks: list[Check], tape: list, test: Session, precisions: Mapping[str, str]) -> None:
    pairs = _replay(tape, test.encoder, test.manifest)
    agree = np.mean([np.mean(r["codes"] == t["codes"]) for _, r, t in pairs])
    _add(checks, "mimi_encoder", "code agreement", agree, "code_agreement", precisions["mimi_encoder"])


def _check_decoder(checks: list[Check], enc_tape: list, ref: Session, test: Session,
                   precisions: Mapping[str, str]) -> None:
    """Round trip of the user's speech: the reference encoder's codes (after the last reset:
    the conversation) through both decoders."""
    last_reset = max(i for i, e in enumerate(enc_tape) if e[0] == "reset")
    codes = [e[3]["codes"] for e in enc_tape[last_reset:] if e[0] == "run"]
    ref_decoder = _untaped(ref.decoder)
    ref_decoder.reset()
    test.decoder.reset()
    a = np.concatenate([ref_decoder.run("mimi_decoder", {"codes": c})["pcm"].reshape(-1) for c in codes])
    b = np.concatenate([test.decoder.run("mimi_decoder", {"codes": c})["pcm"].reshape(-1).astype(np.float32)
                        for c in codes])
    _add(checks, "mimi_decoder", "round-trip SNR dB", snr_db(a, b), "snr_db", precisions["mimi_decoder"])


def _check_temporal(checks: list[Check], tape: list, test: Session, precisions: Mapping[str, str]) -> None:
    pairs = _replay(tape, test.temporal, test.manifest)
    p = precisions["temporal"]
    prefill = [_cosines(r["hidden"][0], t["hidden"][0]) for g, r, t in pairs if g == "temporal_prefill"]
    if prefill:
        _add(checks, "temporal", "prefill hidden cosine min", np.concatenate(prefill).min(), "prefill_cos_min", p)
    steps = [(r["text_logits"], t["text_logits"]) for g, r, t in pairs if g == "temporal_step"]
    ref_logits = np.concatenate([r for r, _ in steps])
    test_logits = np.concatenate([t for _, t in steps])
    cos = _cosines(ref_logits, test_logits)
    _add(checks, "temporal", "text token agreement", np.mean(ref_logits.argmax(-1) == test_logits.argmax(-1)),
         "token_agreement", p)
    _add(checks, "temporal", "text logit cosine mean", cos.mean(), "cos_mean", p)
    _add(checks, "temporal", "text logit cosine min", cos.min(), "cos_min", p)


def _check_depformer(checks: list[Check], tape: list, ref: Session, test: Session,
                     precisions: Mapping[str, str]) -> None:
    ref_logits, test_logits = _teacher_forced_depformer(tape, _untaped(ref.depformer), test.depformer,
                                                        test.manifest)
    cos = _cosines(ref_logits, test_logits)
    p = precisions["depformer"]
    _add(checks, "depformer", "audio token agreement", np.mean(ref_logits.argmax(-1) == test_logits.argmax(-1)),
         "token_agreement", p)
    _add(checks, "depformer", "audio logit cosine mean", cos.mean(), "cos_mean", p)
    _add(checks, "depformer", "audio logit cosine min", cos.min(), "cos_min", p)


def _lm_frames(taping: _TapingBackend, start: int) -> list[tuple[int, int | None]]:
    """The reference conversation's LM calls after `start` (an index into `taping.order`),
    one per frame: (temporal_step tape index, depformer tape index or None when the frame's
    audio was all forced and the depformer skipped)."""
    frames: list[tuple[int, int | None]] = []
    for network, index in taping.order[start:]:
        if network == "temporal":
            frames.append((index, None))
        elif network == "depformer" and frames:
            frames[-1] = (frames[-1][0], index)
    return frames


def _check_e2e(checks: list[Check], taping: _TapingBackend, lm_frames: list[tuple[int, int | None]],
               ref: Session, test: Session, precisions: Mapping[str, str]) -> None:
    """Teacher-forced end to end (see the module docstring); `test` restored from the
    reference's snapshot. Per frame: the tested encoder's codes of the user's audio go
    into the tested LM state, whose agent history holds the reference's tokens; the tested
    temporal step, then the tested depformer on the tested hidden state (depth steps
    forced to the reference's audio tokens); argmax vs the reference's logits."""
    enc_tape = taping.tapes["mimi_encoder"]
    last_reset = max(i for i, e in enumerate(enc_tape) if e[0] == "reset")
    pcm = [e[2] for e in enc_tape[last_reset:] if e[0] == "run"]
    if len(pcm) != len(lm_frames):
        raise PpxError(f"verify: {len(lm_frames)} LM steps for {len(pcm)} frames of audio")
    temporal, depformer = taping.tapes["temporal"], taping.tapes["depformer"]
    ref_depformer, m, state = _untaped(ref.depformer), test.manifest, test.lm.state
    text: list[bool] = []
    audio: list[np.ndarray] = []
    for feeds, (t, d) in zip(pcm, lm_frames, strict=True):
        codes = test.encoder.run("mimi_encoder", _conform(m, "mimi_encoder", feeds))["codes"][0]
        step = state.next_input(user=codes)
        _, _, t_in, t_ref = temporal[t]
        feeds = _conform(m, "temporal_step", dict(t_in, tokens=step.tokens[None, :]))
        out = test.temporal.run("temporal_step", feeds)
        text.append(int(np.argmax(t_ref["text_logits"])) == int(np.argmax(out["text_logits"])))
        text_token = step.text_token(int(t_ref["text_token"][0]))
        if d is None:  # the reference's audio was all forced: its depformer did not run
            tokens = step.audio_targets
        else:
            _, _, d_in, d_ref = depformer[d]
            tokens = d_ref["audio_tokens"].astype(np.int64)
            forced = dict(d_in, forced_tokens=tokens,
                          force_mask=np.ones_like(d_in["force_mask"], dtype=bool))
            a = ref_depformer.run("depformer", forced)["audio_logits"]
            feeds = _conform(m, "depformer", dict(forced, hidden=out["hidden"]))
            b = test.depformer.run("depformer", feeds)["audio_logits"]
            audio.append(np.asarray(a).argmax(-1).ravel() == np.asarray(b).argmax(-1).ravel())
        state.commit(text_token, tokens)
    worst = max(precisions.values(), key=ORDER.index)
    _add(checks, "end_to_end", "teacher-forced text agreement", np.mean(text) if text else 1.0,
         "e2e_text", worst)
    _add(checks, "end_to_end", "teacher-forced audio agreement",
         np.mean(np.concatenate(audio)) if audio else 1.0, "e2e_audio", worst)


def _free_running(checks: list[Check], ref: np.ndarray, test: np.ndarray, codebooks: int) -> None:
    """Informational: greedy agreement of two free-running conversations (chaotic after
    the first differing token, see the module docstring)."""
    live = (ref[:, 0] >= 0) | (test[:, 0] >= 0)  # frames before the LM's first output hold -2
    ref, test = ref[live], test[live]
    audio = slice(1, 1 + codebooks)
    text_agree = np.mean(ref[:, 0] == test[:, 0]) if len(ref) else 1.0
    audio_agree = np.mean(ref[:, audio] == test[:, audio]) if len(ref) else 1.0
    for metric, value in (("free-running text agreement", text_agree),
                          ("free-running audio agreement", audio_agree)):
        checks.append(Check("end_to_end", metric, float(value), None, True, informational=True))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PpxError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def run_verify(build: Path, reference: Path, json_path: Path | None = None, inputs: Path | None = None,
               backend: str = "ort-cpu", precision: str | None = None, frames: int = MAX_FRAMES,
               e2e_frames: int = E2E_FRAMES, quiet: bool = False) -> int:
    """The CLI's verify: print the table; 0 when every check passes, 1 otherwise."""
    report = verify(build, reference, inputs=inputs, backend=backend, precision=precision,
                    max_frames=frames, e2e_frames=e2e_frames, json_path=json_path, quiet=quiet)
    print(report.table())
    return 0 if report.passed else 1
