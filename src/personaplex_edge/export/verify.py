"""`ppx-export verify`: runs a quantized build (or TensorRT engines) against the full-precision reference.

One greedy conversation runs on the reference (the persona `quantize` calibrated the build
with, or `--persona`; its system prompt compiled, then the speech clips as the user's side). Every call into
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
precision of the build) and explained in verify_metrics.THRESHOLDS. Engines are verified the
same way through the runtime's backend interface: `backend="tensorrt"`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.core.manifest import Manifest, load_manifest
from personaplex_edge.runtime.core.network import NETWORKS, Network, network_precisions
from personaplex_edge.runtime.core.persona import Persona, load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.core.snapshot import Snapshot, snapshot_key
from personaplex_edge.runtime.errors import PpxError

from .calibration import (
    DEFAULT_CALIB_DIR,
    calibration_persona,
    clips_sha256,
    conversation_frames,
    load_speech_dir,
)
from .progress import bar
from .verify_metrics import ORDER, THRESHOLDS, cosines, snr_db
from .verify_report import Check, VerifyReport, write_json
from .verify_tape import TapingBackend, conform, replay, untaped

MAX_FRAMES = 250  # 20 s of conversation: enough samples per metric, minutes at most on a CPU
E2E_FRAMES = 50  # free-running (informational) comparison window (4 s)


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


def _teacher_forced_depformer(tape: list, reference: Network, tested: Network,
                              manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    ref_logits, test_logits = [], []
    for kind, graph, inputs, ref_out in list(tape):
        if kind != "run":
            continue
        forced = dict(inputs, forced_tokens=ref_out["audio_tokens"].astype(np.int64),
                      force_mask=np.ones_like(inputs["force_mask"], dtype=bool))
        ref_logits.append(reference.run(graph, forced)["audio_logits"])
        test_logits.append(tested.run(graph, conform(manifest, graph, forced))["audio_logits"].astype(np.float32))
    return np.concatenate(ref_logits), np.concatenate(test_logits)


def build_precisions(manifest: Manifest, override: str | None = None) -> dict[str, str]:
    """Per network: `override`, else what the build records (`network_precisions`); each must
    have verify thresholds."""
    if override:
        if override not in ORDER:
            raise PpxError(f"--precision: {override!r} is not one of {', '.join(ORDER)}")
        return {net: override for net in NETWORKS}
    out = network_precisions(manifest)
    for net, precision in out.items():
        if precision not in THRESHOLDS:
            raise PpxError(f"{manifest.root}: network {net}: precision {precision!r} has no verify "
                           f"thresholds (known: {', '.join(ORDER)}); give --precision")
    return out


def verify(build_dir: Path, reference_dir: Path, inputs: Path | None = None, backend: str = "ort-cpu",
           reference_backend: str = "ort-cpu", precision: str | None = None, persona: str | None = None,
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
    prof, why = verify_persona(persona, tested_m, ref_m)
    prof = replace(prof, sampling=replace(prof.sampling, greedy=True))

    taping = TapingBackend(make_backend(reference_backend))
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
                           "sha256": clips_sha256(clips)}, len(chunks), n, checks,
                          persona=f"persona {prof.name}, voice {Path(prof.voice).name} ({why})")
    if json_path is not None:
        write_json(Path(json_path), report.to_dict())
    return report


def verify_persona(ref: str | None, tested: Manifest, reference: Manifest) -> tuple[Persona, str]:
    """The persona of the compared conversation, and why that one: `--persona NAME|FILE` as given;
    else the persona and voice that `quantize` calibrated the tested build with (its manifest
    records them), so a build without the default persona's voice verifies as it quantized; else
    the default persona, with a voice of the build when it lacks the default's."""
    if ref is not None:
        return calibration_persona(ref, reference), "--persona"
    recorded = tested.data.get("quantization", {}).get("calibration", {})
    voices = reference.data.get("voices", {})
    try:
        persona = load_persona(recorded["persona"], k_max=reference.data["sampling"]["k_max"])
    except (KeyError, PpxError):  # not quantized here, or calibrated with a file of its own
        return calibration_persona(None, reference), "the default persona"
    if recorded.get("voice") in voices:
        persona = replace(persona, voice=recorded["voice"])
    return calibration_persona(persona, reference), "as quantize calibrated"


def _add(checks: list[Check], network: str, metric: str, value: float, key: str, precision: str) -> None:
    threshold = THRESHOLDS[precision][key]
    checks.append(Check(network, metric, float(value), threshold, bool(value >= threshold)))


def _check_encoder(checks: list[Check], tape: list, test: Session, precisions: Mapping[str, str]) -> None:
    pairs = replay(tape, test.encoder, test.manifest)
    agree = np.mean([np.mean(r["codes"] == t["codes"]) for _, r, t in pairs])
    _add(checks, "mimi_encoder", "code agreement", agree, "code_agreement", precisions["mimi_encoder"])


def _check_decoder(checks: list[Check], enc_tape: list, ref: Session, test: Session,
                   precisions: Mapping[str, str]) -> None:
    """Round trip of the user's speech: the reference encoder's codes (after the last reset:
    the conversation) through both decoders."""
    last_reset = max(i for i, e in enumerate(enc_tape) if e[0] == "reset")
    codes = [e[3]["codes"] for e in enc_tape[last_reset:] if e[0] == "run"]
    ref_decoder = untaped(ref.decoder)
    ref_decoder.reset()
    test.decoder.reset()
    a = np.concatenate([ref_decoder.run("mimi_decoder", {"codes": c})["pcm"].reshape(-1) for c in codes])
    b = np.concatenate([test.decoder.run("mimi_decoder", {"codes": c})["pcm"].reshape(-1).astype(np.float32)
                        for c in codes])
    _add(checks, "mimi_decoder", "round-trip SNR dB", snr_db(a, b), "snr_db", precisions["mimi_decoder"])


def _check_temporal(checks: list[Check], tape: list, test: Session, precisions: Mapping[str, str]) -> None:
    pairs = replay(tape, test.temporal, test.manifest)
    p = precisions["temporal"]
    prefill = [cosines(r["hidden"][0], t["hidden"][0]) for g, r, t in pairs if g == "temporal_prefill"]
    if prefill:
        _add(checks, "temporal", "prefill hidden cosine min", np.concatenate(prefill).min(), "prefill_cos_min", p)
    steps = [(r["text_logits"], t["text_logits"]) for g, r, t in pairs if g == "temporal_step"]
    ref_logits = np.concatenate([r for r, _ in steps])
    test_logits = np.concatenate([t for _, t in steps])
    cos = cosines(ref_logits, test_logits)
    _add(checks, "temporal", "text token agreement", np.mean(ref_logits.argmax(-1) == test_logits.argmax(-1)),
         "token_agreement", p)
    _add(checks, "temporal", "text logit cosine mean", cos.mean(), "cos_mean", p)
    _add(checks, "temporal", "text logit cosine min", cos.min(), "cos_min", p)


def _check_depformer(checks: list[Check], tape: list, ref: Session, test: Session,
                     precisions: Mapping[str, str]) -> None:
    ref_logits, test_logits = _teacher_forced_depformer(tape, untaped(ref.depformer), test.depformer,
                                                        test.manifest)
    cos = cosines(ref_logits, test_logits)
    p = precisions["depformer"]
    _add(checks, "depformer", "audio token agreement", np.mean(ref_logits.argmax(-1) == test_logits.argmax(-1)),
         "token_agreement", p)
    _add(checks, "depformer", "audio logit cosine mean", cos.mean(), "cos_mean", p)
    _add(checks, "depformer", "audio logit cosine min", cos.min(), "cos_min", p)


def _lm_frames(taping: TapingBackend, start: int) -> list[tuple[int, int | None]]:
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


def _check_e2e(checks: list[Check], taping: TapingBackend, lm_frames: list[tuple[int, int | None]],
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
    ref_depformer, m, state = untaped(ref.depformer), test.manifest, test.lm.state
    text: list[bool] = []
    audio: list[np.ndarray] = []
    for feeds, (t, d) in zip(pcm, lm_frames, strict=True):
        codes = test.encoder.run("mimi_encoder", conform(m, "mimi_encoder", feeds))["codes"][0]
        step = state.next_input(user=codes)
        _, _, t_in, t_ref = temporal[t]
        feeds = conform(m, "temporal_step", dict(t_in, tokens=step.tokens[None, :]))
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
            feeds = conform(m, "depformer", dict(forced, hidden=out["hidden"]))
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


def run_verify(build: Path, reference: Path, json_path: Path | None = None, inputs: Path | None = None,
               backend: str = "ort-cpu", precision: str | None = None, frames: int = MAX_FRAMES,
               e2e_frames: int = E2E_FRAMES, quiet: bool = False, persona: str | None = None) -> int:
    """The CLI's verify: print the table; 0 when every check passes, 1 otherwise."""
    report = verify(build, reference, inputs=inputs, backend=backend, precision=precision,
                    persona=persona, max_frames=frames, e2e_frames=e2e_frames, json_path=json_path,
                    quiet=quiet)
    print(report.table())
    return 0 if report.passed else 1
