"""`ppx-export quantize` on the tiny build: modelopt on CPU, builds that the runtime plays,
calibration recording, and the bad inputs (no usable audio, manifest mismatch)."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from personaplex_edge.export.calibration import (
    DEFAULT_CALIB_DIR,
    load_speech_dir,
    record_calibration,
)
from personaplex_edge.export.quantize import QuantizeOptions, quantize_build
from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.play.run import play

DATA = Path(__file__).parent / "data"
SPEECH = DATA / "speech_24k.wav"
# Few samples: the tiny graphs calibrate in seconds; AWQ's clip search scales with them.
FAST = QuantizeOptions(samples={"temporal_step": 8, "depformer": 8, "temporal_prefill": 2})
QDQ_TYPES = {"int8": onnx.TensorProto.INT8, "int8-sq": onnx.TensorProto.INT8,
             "fp8": onnx.TensorProto.FLOAT8E4M3FN, "int4-awq": onnx.TensorProto.INT4}
MIN_OPSET = {"int8": 19, "int8-sq": 19, "fp8": 19, "int4-awq": 21}


@pytest.fixture(scope="module")
def quantized(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp("quantized") / precision
            made[precision] = quantize_build(tiny_build, precision, None, out, options=FAST, quiet=True)
        return made[precision]
    return get


def _weight_types(path: Path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return {inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("precision", ["int8", "int4-awq", "int8-sq", "fp8"])
def test_quantized_build_has_qdq_graphs_and_plays(precision: str, quantized, tiny_build: Path,
                                                  tmp_path: Path) -> None:
    build = quantized(precision)
    manifest = load_manifest(build)
    manifest.verify_files()
    source = load_manifest(tiny_build)
    q = manifest.data["quantization"]
    assert q["precision"] == precision and q["modelopt_version"]
    assert q["networks"] == {"mimi_encoder": "none", "mimi_decoder": "none", "temporal": precision,
                             "depformer": precision}
    assert q["calibration"]["sha256"] and q["calibration"]["samples"]["temporal_prefill"] >= 1
    for key in ("temporal_step", "temporal_prefill", "depformer"):
        path = build / manifest.graph(key).file
        assert QDQ_TYPES[precision] in _weight_types(path), key
        assert _opset(path) >= MIN_OPSET[precision]
        # Same inputs/outputs and roles: the runtime binds the quantized graph as before.
        assert manifest.data["graphs"][key]["inputs"] == source.data["graphs"][key]["inputs"]
        assert manifest.data["graphs"][key]["outputs"] == source.data["graphs"][key]["outputs"]
    assert manifest.data["opset"] >= MIN_OPSET[precision]
    # Mimi is copied untouched.
    for key in ("mimi_encoder", "mimi_decoder"):
        assert manifest.files[f"{key}.onnx"] == source.files[f"{key}.onnx"]
    # Step and prefill still share one data file, and their weights are stored once.
    assert manifest.graph("temporal_step").data_file == manifest.graph("temporal_prefill").data_file
    step, prefill = (onnx.load(str(build / f"{k}.onnx"), load_external_data=False)
                     for k in ("temporal_step", "temporal_prefill"))
    where = {t.name: [(e.key, e.value) for e in t.external_data] for t in step.graph.initializer}
    shared = [t for t in prefill.graph.initializer if t.name.startswith("transformer.") and t.external_data]
    assert shared and all(where.get(t.name) == [(e.key, e.value) for e in t.external_data] for t in shared)

    result = play(SPEECH, build, "copilot", greedy=True, snapshot_dir=tmp_path / "snaps")
    assert len(result.reply) == len(read_audio(SPEECH)) and np.isfinite(result.reply).all()
    assert result.out_tokens.shape[1] == 17 and (result.out_tokens[:, 1:9] >= 0).all()


def test_quantize_leaves_the_source_build_untouched(quantized, tiny_build: Path) -> None:
    quantized("fp8")  # modelopt's fp8 path rewrites its input graph in place: only our copy
    load_manifest(tiny_build).verify_files()


def test_quantized_graphs_run_on_onnxruntime_cpu_with_calibration_feeds(quantized, tiny_build: Path) -> None:
    calib = record_calibration(tiny_build, samples={"depformer": 2}, graphs=("depformer",))
    build = quantized("int8")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ref = ort.InferenceSession(str(tiny_build / "depformer.onnx"), options, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(build / "depformer.onnx"), options, providers=["CPUExecutionProvider"])
    for feeds in calib.samples["depformer"]:
        a = ref.run(["audio_logits"], feeds)[0]
        b = new.run(["audio_logits"], feeds)[0]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.9  # close to, not equal to, the full-precision logits
        assert not np.array_equal(a, b)


def test_calibration_records_every_graph_with_the_system_prompt(tiny_build: Path) -> None:
    budget = {"mimi_encoder": 5, "mimi_decoder": 5, "temporal_step": 6, "temporal_prefill": 4, "depformer": 7}
    calib = record_calibration(tiny_build, samples=budget)
    manifest = load_manifest(tiny_build)
    for key, n in budget.items():
        names = {t.name for t in manifest.graph(key).inputs}
        assert 1 <= len(calib.samples[key]) <= n
        assert calib.calls[key] >= len(calib.samples[key])
        assert all(set(s) == names for s in calib.samples[key]), key  # keyed by ONNX input name
    # The persona's prompt went through the prefill graph (64 steps per call in this build).
    assert calib.calls["temporal_prefill"] >= 2
    assert calib.files == sorted(p.name for p in DEFAULT_CALIB_DIR.glob("*.wav"))
    assert calib.frames > 100

    # Temporal samples share one cache copy (end of conversation); exact because every
    # slot at or after `offset` is masked: zeroing those slots changes nothing.
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tiny_build / "temporal_step.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    samples = calib.samples["temporal_step"]
    assert samples[0]["k.0"] is samples[-1]["k.0"]
    for feeds in samples:
        offset = int(feeds["offset"][0])
        truncated = dict(feeds)
        for name, value in feeds.items():
            if name.startswith(("k.", "v.")):
                value = value.copy()
                index = [slice(None)] * value.ndim
                index[3 if name.startswith("k.") else 2] = slice(offset, None)
                value[tuple(index)] = 0
                truncated[name] = value
        for a, b in zip(session.run(None, feeds), session.run(None, truncated), strict=True):
            np.testing.assert_array_equal(a, b)


def _wav(path: Path, seconds: float, amplitude: float = 0.3) -> None:
    n = int(seconds * 24000)
    pcm = (amplitude * 32767 * np.sin(np.arange(n) * 0.05)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm.tobytes())


def test_calibration_dir_without_usable_audio_is_one_clear_error(tiny_build: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "empty.wav").write_bytes(b"")
    (calib / "notes.wav").write_text("not audio")
    _wav(calib / "short.wav", 0.2)
    _wav(calib / "silent.wav", 2.0, amplitude=0.0)
    (calib / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    with pytest.raises(PpxError) as err:
        quantize_build(tiny_build, "int8", calib, out, options=FAST, quiet=True)
    message = str(err.value)
    assert message.startswith(f"{calib}: no usable audio for calibration: 4 audio files")
    assert "2 unreadable or empty" in message and "1 shorter than 0.5 s" in message and "1 silent" in message
    assert "\n" not in message
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written

    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(PpxError, match="no .wav/.flac/.ogg files"):
        load_speech_dir(empty)
    with pytest.raises(PpxError, match="audio directory not found"):
        load_speech_dir(tmp_path / "missing")


def test_manifest_that_does_not_match_its_files_is_refused(tiny_build: Path, tmp_path: Path) -> None:
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    data = build / "depformer.onnx.data"
    data.write_bytes(data.read_bytes()[:-64] + bytes(64))
    with pytest.raises(PpxError, match=r"depformer\.onnx\.data: sha256 differs from the manifest"):
        quantize_build(build, "int8", None, tmp_path / "out", options=FAST, quiet=True)
    assert not (tmp_path / "out").exists()


def test_bad_requests_are_refused_before_any_work(quantized, tiny_build: Path, tmp_path: Path) -> None:
    with pytest.raises(PpxError, match="--precision: 'int3' is not one of int8, int8-sq, fp8, int4-awq"):
        quantize_build(tiny_build, "int3", None, tmp_path / "a", quiet=True)
    with pytest.raises(PpxError, match="--network: 'vocoder' is not a network"):
        quantize_build(tiny_build, "int8", None, tmp_path / "b", networks={"vocoder": "int8"}, quiet=True)
    with pytest.raises(PpxError, match="already a quantized build"):
        quantize_build(quantized("int8"), "int8", None, tmp_path / "c", quiet=True)
    with pytest.raises(PpxError, match="is the --build directory"):
        quantize_build(tiny_build, "int8", None, tiny_build, quiet=True, force=True)
    assert not any(tmp_path.iterdir())


def test_network_map_quantizes_only_what_it_names(tiny_build: Path, tmp_path: Path) -> None:
    out = quantize_build(tiny_build, "int8", None, tmp_path / "dep", quiet=True, options=FAST,
                         networks={"temporal": "none"})
    manifest = load_manifest(out)
    assert manifest.data["quantization"]["networks"]["temporal"] == "none"
    source = load_manifest(tiny_build)
    assert manifest.files["temporal.onnx.data"] == source.files["temporal.onnx.data"]
    assert manifest.files["depformer.onnx.data"] != source.files["depformer.onnx.data"]
    assert json.loads((out / "manifest.json").read_text())["producer"] == "ppx-export quantize"


@pytest.fixture(scope="module")
def other_voice_build(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny build with its one voice named OTHER: the default persona's NATF2 is missing."""
    from personaplex_edge.export.export_onnx import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("other-voice")
    ckpt = root / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "voices" / "NATF2.wav").rename(ckpt / "voices" / "OTHER.wav")
    return export_onnx(ckpt, root / "build", ExportOptions(prefill_steps=64), quiet=True)


def test_quantize_falls_back_to_a_voice_of_the_build(other_voice_build: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = quantize_build(other_voice_build, "int8", None, tmp_path / "q", options=FAST, quiet=True,
                         networks={"temporal": "none"})
    assert capsys.readouterr().err.strip().splitlines() == [
        "ppx-export: note: calibration: the build has no voice NATF2 (persona copilot's); "
        "calibrating with copilot's prompt and the build's voice OTHER"]
    calibration = load_manifest(out).data["quantization"]["calibration"]
    assert (calibration["persona"], calibration["voice"]) == ("copilot", "OTHER")


def test_quantize_persona_option(other_voice_build: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from personaplex_edge.export.cli import main as export_main

    persona = tmp_path / "calm.yaml"
    persona.write_text("name: calm\nvoice: OTHER\nprompt: You are a calm co-pilot.\n")
    assert export_main(["quantize", "--build", str(other_voice_build), "--precision", "int8",
                        "--network", "temporal=none", "--persona", str(persona), "--out",
                        str(tmp_path / "q"), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
    calibration = load_manifest(tmp_path / "q").data["quantization"]["calibration"]
    assert (calibration["persona"], calibration["voice"]) == ("calm", "OTHER")
    # A named persona is used as given: a voice the build lacks is its file:line error, at once.
    with pytest.raises(PpxError, match=r"voice: 'NATF2' is not a voice of this build"):
        quantize_build(other_voice_build, "int8", None, tmp_path / "r", quiet=True,
                       options=QuantizeOptions(persona="focus"))
    assert not (tmp_path / "r").exists()


def test_verify_uses_the_persona_and_voice_the_quantized_build_records(
        other_voice_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: verify always started the default persona, so a build without its voice NATF2 failed
    with `copilot.yaml:7: voice: 'NATF2' is not a voice of this build` though quantize had
    calibrated it fine (with copilot's prompt and the build's voice OTHER)."""
    from personaplex_edge.export.cli import main as export_main

    out = quantize_build(other_voice_build, "int8", None, tmp_path / "q", options=FAST, quiet=True,
                         networks={"temporal": "none"})
    capsys.readouterr()
    verify = ["verify", "--build", str(out), "--reference", str(other_voice_build), "--frames", "20",
              "--e2e-frames", "5", "--quiet"]
    assert export_main(verify) == 0
    captured = capsys.readouterr()
    assert "not a voice of this build" not in captured.err
    assert "persona copilot, voice OTHER (as quantize calibrated)" in captured.out
    # --persona picks another one; a voice the build lacks is still its one line, exit 78.
    persona = tmp_path / "calm.yaml"
    persona.write_text("name: calm\nvoice: OTHER\nprompt: You are a calm co-pilot.\n")
    assert export_main([*verify, "--persona", str(persona)]) == 0
    assert "persona calm, voice OTHER" in capsys.readouterr().out
    assert export_main([*verify, "--persona", "focus"]) == 78
    assert capsys.readouterr().err.strip().endswith("voice: 'NATF2' is not a voice of this build "
                                                    "(build voices: OTHER)")


def test_inspect_names_each_networks_precision(tiny_build: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `inspect` labelled a quantized build with its graphs' dtype alone (an int4-awq build
    read `fp16`) and listed no precision per network."""
    from personaplex_edge.export.cli import main as export_main

    out = quantize_build(tiny_build, "int8", None, tmp_path / "q", options=FAST, quiet=True,
                         networks={"temporal": "none"})
    capsys.readouterr()
    assert export_main(["inspect", "--build", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"build {out}: int8 (nvidia-modelopt ") and "on fp32 graphs" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in NETWORK_GRAPHS}
    assert lines[1].split()[:2] == ["graph", "precision"]
    assert {key: row[1] for key, row in rows.items()} == {
        "mimi_encoder": "fp32", "mimi_decoder": "fp32", "temporal_step": "fp32",
        "temporal_prefill": "fp32", "depformer": "int8"}
    assert export_main(["inspect", "--build", str(tiny_build)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"build {tiny_build}: fp32, opset")


NETWORK_GRAPHS = ("mimi_encoder", "mimi_decoder", "temporal_step", "temporal_prefill", "depformer")
