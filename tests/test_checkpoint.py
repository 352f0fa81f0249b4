"""The checkpoint reader and the synthetic checkpoint, checked against upstream moshi."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.export.checkpoint import Checkpoint
from personaplex_edge.export.cli import main as export_main
from personaplex_edge.export.config import ModelConfig, load_model_config
from personaplex_edge.export.safetensors_io import SafetensorsFile, write_safetensors
from personaplex_edge.export.synth import mimi_config_json
from personaplex_edge.runtime.errors import PpxError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_lm(ckpt: Path, edit) -> None:
    """Rewrite model.safetensors through `edit(dict) -> dict` (float32 stored)."""
    path = ckpt / "model.safetensors"
    src = SafetensorsFile(path)
    tensors = edit({name: src[name] for name in src})
    write_safetensors(path, tensors, bf16=True)


def test_synth_is_deterministic(tmp_path: Path) -> None:
    from personaplex_edge.export.synth import synthesize

    digests = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        synthesize("tiny", seed, tmp_path / name, quiet=True)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_tiny_checkpoint_loads_strictly_into_upstream(tiny_checkpoint: Path) -> None:
    """Upstream's own loaders accept the synthetic files as a released checkpoint, and
    our canonical view yields exactly the tensors upstream ends up with."""
    torch = pytest.importorskip("torch")
    from moshi.models.lm import LMModel
    from moshi.models.loaders import get_mimi
    from safetensors.torch import load_file

    ckpt = Checkpoint.open(tiny_checkpoint)
    cfg = ckpt.config
    mimi = get_mimi(tiny_checkpoint / cfg.mimi_name, mimi_config_json(cfg.mimi), num_codebooks=8)
    for name, value in mimi.state_dict().items():
        np.testing.assert_array_equal(ckpt.mimi[name], value.float().numpy(), err_msg=name)

    kwargs = json.loads((tiny_checkpoint / "config.json").read_text())
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        kwargs.pop(key, None)
    kwargs["demux_second_text_stream"] = kwargs.pop("demux_second_stream")
    lm = LMModel(dtype=torch.float32, **kwargs)
    state = {k: v.float() for k, v in load_file(tiny_checkpoint / cfg.moshi_name).items()}
    result = lm.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in lm.state_dict().items():
        np.testing.assert_array_equal(ckpt.lm[name], value.numpy(), err_msg=name)


def test_reader_is_lazy_and_memory_mapped(tiny_checkpoint: Path) -> None:
    src = SafetensorsFile(tiny_checkpoint / "model.safetensors")
    raw = src.raw("text_emb.weight")
    assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap) or raw.base is not None
    assert not raw.flags.writeable
    assert src.dtype_name("text_emb.weight") == "BF16"
    assert src["text_emb.weight"].dtype == np.float32


def test_config_defaults_are_personaplex_7b(tmp_path: Path) -> None:
    config = load_model_config(tmp_path)  # no config.json
    assert config == ModelConfig()
    assert (config.lm.dim, config.lm.num_layers, config.lm.dep_q, config.lm.context) == (4096, 32, 16, 3000)
    assert config.lm.ffn_hidden == 11264 and config.lm.depformer_ffn_hidden == 2816
    assert config.mimi.num_codebooks == 8


def test_eight_step_depformer_is_extended_like_upstream(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Steps 8..15 take the weights of 0..7 (attention slices, gating, linears, depformer_in, emb)."""
    ckpt_dir = _copy(tiny_checkpoint, tmp_path / "eight")

    def to_eight_steps(t: dict) -> dict:
        out = {}
        for name, value in t.items():
            if name.startswith("depformer.") and ".self_attn." in name:
                out[name] = value[: value.shape[0] // 2]
            elif any(name.startswith(f"{p}.") for p in ("linears", "depformer_in")) and int(name.split(".")[1]) >= 8:
                continue
            elif ".gating." in name and name.startswith("depformer.") and int(name.split(".")[4]) >= 8:
                continue
            elif name.startswith("depformer_emb.") and int(name.split(".")[1]) >= 8:
                continue
            else:
                out[name] = value
        return out

    _rewrite_lm(ckpt_dir, to_eight_steps)
    ckpt = Checkpoint.open(ckpt_dir)
    w = ckpt.lm
    for k in range(8):
        for name in ("depformer.layers.1.self_attn.in_projs.{}.weight", "depformer.layers.0.self_attn.out_projs.{}.weight",
                     "depformer.layers.0.gating.{}.linear_in.weight", "linears.{}.weight", "depformer_in.{}.weight"):
            np.testing.assert_array_equal(w[name.format(k + 8)], w[name.format(k)])
    for j in range(8, 15):
        np.testing.assert_array_equal(w[f"depformer_emb.{j}.weight"], w[f"depformer_emb.{j - 8}.weight"])
    # The stored steps themselves are untouched.
    orig = Checkpoint.open(tiny_checkpoint).lm
    np.testing.assert_array_equal(w["depformer.layers.1.self_attn.in_projs.5.weight"],
                                  orig["depformer.layers.1.self_attn.in_projs.5.weight"])


def test_moshiko_style_depformer_names_the_tensor_upstream_cannot_fill(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt_dir = _copy(tiny_checkpoint, tmp_path / "moshiko")

    def drop(t: dict) -> dict:
        keep = {}
        for name, value in t.items():
            if name.startswith("depformer_emb.") and int(name.split(".")[1]) >= 7:
                continue
            if name.startswith(("linears.", "depformer_in.")) and int(name.split(".")[1]) >= 8:
                continue
            if name.startswith("depformer.") and ".gating." in name and int(name.split(".")[4]) >= 8:
                continue
            keep[name] = value[: value.shape[0] // 2] if name.startswith("depformer.") and ".self_attn." in name else value
        return keep

    _rewrite_lm(ckpt_dir, drop)
    with pytest.raises(PpxError, match=r"model\.safetensors: missing tensor depformer_emb\.7\.weight"):
        Checkpoint.open(ckpt_dir)


# -- bad input: one line naming the file and the tensor/key -------------------------------------

def _expect_error(ckpt_dir: Path, out: Path, pattern: str, capsys: pytest.CaptureFixture) -> None:
    rc = export_main(["onnx", "--checkpoint", str(ckpt_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists(), "nothing may be left in the output directory"
    assert not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())


def test_missing_file(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "tokenizer-e351c8d8-checkpoint125.safetensors").unlink()
    _expect_error(ckpt, tmp_path / "out", r"tokenizer-e351c8d8-checkpoint125\.safetensors: Mimi weights not found",
                  capsys)


def test_truncated_safetensors(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _expect_error(ckpt, tmp_path / "out", r"model\.safetensors: \S+: data past the end of the file", capsys)


def test_corrupt_safetensors_header(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    _expect_error(ckpt, tmp_path / "out", r"model\.safetensors: corrupt safetensors header", capsys)


def test_missing_tensor(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite_lm(ckpt, lambda t: {k: v for k, v in t.items() if k != "out_norm.alpha"})
    _expect_error(ckpt, tmp_path / "out", r"model\.safetensors: missing tensor out_norm\.alpha", capsys)


def test_unexpected_tensor(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite_lm(ckpt, lambda t: {**t, "extra_heads.0.weight": np.zeros((6, 64), np.float32)})
    _expect_error(ckpt, tmp_path / "out", r"model\.safetensors: unexpected tensor extra_heads\.0\.weight", capsys)


def test_shape_mismatch(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite_lm(ckpt, lambda t: {**t, "text_linear.weight": np.zeros((255, 64), np.float32)})
    _expect_error(ckpt, tmp_path / "out",
                  r"model\.safetensors: text_linear\.weight: shape \[255, 64\], the config expects \[256, 64\]", capsys)


def test_unknown_config_key(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["num_layerz"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    _expect_error(ckpt, tmp_path / "out", r"config\.json: unknown key 'num_layerz'", capsys)


def test_invalid_config_json(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "mimi_config.json").write_text('{"seanet": {"dimension": 32,,}}')
    _expect_error(ckpt, tmp_path / "out", r"mimi_config\.json: line 1: invalid JSON", capsys)


def test_existing_output_is_not_touched(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = export_main(["onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet"])
    assert rc != 0 and "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_bad_input_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, end to end, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.export.cli", "onnx", "--checkpoint",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ppx-export: error: {tmp_path / 'nope'}: checkpoint directory not found"


def test_torch_voice_preset_is_converted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from personaplex_edge.export.voices import convert_pt_voice

    emb = torch.randn(5, 1, 1, 64, dtype=torch.bfloat16)
    cache = torch.randint(0, 2048, (1, 17, 4))
    torch.save({"embeddings": emb, "cache": cache}, tmp_path / "NATF2.pt")
    convert_pt_voice(tmp_path / "NATF2.pt", tmp_path / "NATF2.npz", dim=64, streams=17)
    data = np.load(tmp_path / "NATF2.npz")
    np.testing.assert_array_equal(data["embeddings"], emb.float().reshape(5, 64).numpy())
    np.testing.assert_array_equal(data["cache"], cache[0].numpy())

    torch.save({"embeddings": emb}, tmp_path / "bad.pt")
    with pytest.raises(PpxError, match=r"bad\.pt: expected a dict with 'embeddings' and 'cache'"):
        convert_pt_voice(tmp_path / "bad.pt", tmp_path / "bad.npz", dim=64, streams=17)
    assert not (tmp_path / "bad.npz").exists()
