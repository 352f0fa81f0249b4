"""`ppx-export onnx`: the build directory, its manifest and graph hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from trt_ops import TRT_10_3_OPS

from personaplex_edge.export.cli import main as export_main
from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
from personaplex_edge.runtime.core.manifest import GRAPH_KEYS, load_manifest
from personaplex_edge.runtime.errors import PpxError

STEP_GRAPHS = ("mimi_encoder", "mimi_decoder", "temporal_step", "depformer")


def test_build_has_every_graph_and_a_verifiable_manifest(tiny_build: Path) -> None:
    manifest = load_manifest(tiny_build)
    manifest.verify_files()
    assert set(manifest.graphs) == set(GRAPH_KEYS)
    data = manifest.data
    assert data["opset"] == 17 and data["dtype"] == "fp32"
    assert set(data["source"]["sha256"]) == {"model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors",
                                             "tokenizer_spm_32k_3.model"}
    assert data["voices"] == {"NATF2": "voices/NATF2.wav"}
    for graph in manifest.graphs.values():
        assert (tiny_build / graph.file).is_file()
        for t in (*graph.inputs, *graph.outputs):
            assert t.role in ("input", "output", "state_in", "state_out", "cache", "cache_update", "offset")


def test_state_and_cache_pairs_are_consistent(tiny_build: Path) -> None:
    manifest = load_manifest(tiny_build)
    for graph in manifest.graphs.values():
        inputs = {t.name: t for t in graph.inputs}
        outputs = {t.name: t for t in graph.outputs}
        for t in graph.inputs:
            if t.role == "state_in":
                out = outputs[t.pair]
                assert out.role == "state_out" and out.pair == t.name and out.shape == t.shape
            if t.role == "cache":
                upd = outputs[t.pair]
                assert upd.role == "cache_update" and upd.slot_axis == t.slot_axis
                other = [d for i, d in enumerate(t.shape) if i != t.slot_axis]
                assert other == [d for i, d in enumerate(upd.shape) if i != upd.slot_axis]
        for t in graph.outputs:
            if t.role in ("state_out", "cache_update"):
                assert t.pair in inputs
        # One offset input for every graph that has caches.
        assert bool(graph.by_role("cache")) == bool(graph.by_role("offset"))


def test_graphs_pass_the_checker_use_external_data_and_load_in_ort(tiny_build: Path) -> None:
    manifest = load_manifest(tiny_build)
    for key, graph in manifest.graphs.items():
        path = tiny_build / graph.file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, f"{key}: large weights must live in external data"
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {graph.data_file}
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_temporal_step_and_prefill_share_their_weights(tiny_build: Path) -> None:
    manifest = load_manifest(tiny_build)
    step, prefill = manifest.graph("temporal_step"), manifest.graph("temporal_prefill")
    assert step.data_file == prefill.data_file == "temporal.onnx.data"
    size = (tiny_build / "temporal.onnx.data").stat().st_size
    assert step.meta["weight_bytes"] <= size < step.meta["weight_bytes"] * 1.1


def test_ops_are_parsed_by_tensorrt_10_3(tiny_build: Path) -> None:
    for key in GRAPH_KEYS:
        model = onnx.load(str(tiny_build / f"{key}.onnx"), load_external_data=False)
        unsupported = sorted({n.op_type for n in model.graph.node} - set(TRT_10_3_OPS))
        assert not unsupported, f"{key}: ops TensorRT 10.3 does not parse: {unsupported}"
        assert all(op.domain in ("", "ai.onnx") for op in model.opset_import)


def test_step_graphs_have_static_shapes(tiny_build: Path) -> None:
    manifest = load_manifest(tiny_build)
    for key in STEP_GRAPHS:
        model = onnx.load(str(tiny_build / manifest.graph(key).file), load_external_data=False)
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{key}: {value.name} is not static"
    prefill = manifest.graph("temporal_prefill")
    assert prefill.input("tokens").shape[1] == "T"
    assert prefill.meta["max_steps"] == 64


def test_fp16_build_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = export_onnx(tiny_checkpoint, tmp_path / "fp16", ExportOptions(dtype="fp16", prefill_steps=16),
                      quiet=True)
    manifest = load_manifest(out)
    assert manifest.data["dtype"] == "fp16"
    assert manifest.graph("temporal_step").input("k.0").dtype == "float16"
    from personaplex_edge.runtime.backends.ort import OrtBackend

    encoder = OrtBackend().open(manifest, "mimi_encoder")
    t = np.linspace(0, 1, 1920, dtype=np.float32)
    codes = encoder.run("mimi_encoder", {"pcm": (0.1 * np.sin(2 * np.pi * 220 * t))[None, None]})["codes"]
    assert codes.shape == (1, 8) and (0 <= codes).all() and (codes < 2048).all()


def test_bad_options_fail_cleanly(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = export_main(["onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                      "--dtype", "int3", "--quiet"])
    assert rc == 2 and "--dtype: 'int3' is not one of fp32, fp16" in capsys.readouterr().err
    with pytest.raises(PpxError, match=r"--prefill-steps: 5000 must be within 1\.\.3000"):
        export_onnx(tiny_checkpoint, tmp_path / "o", ExportOptions(prefill_steps=5000), quiet=True)
    assert not (tmp_path / "o").exists()


def test_manifest_records_the_model_config(tiny_build: Path, tiny_checkpoint: Path) -> None:
    from personaplex_edge.export.config import ModelConfig, load_model_config

    data = json.loads((tiny_build / "manifest.json").read_text())
    assert ModelConfig.from_dict(data["model"]) == load_model_config(tiny_checkpoint)
