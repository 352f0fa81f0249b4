"""Writing a quantized build: graphs sharing one deduplicated data file, checks on the result, the manifest."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, sha256_file
from personaplex_edge.runtime.errors import PpxError

from .calibration import CalibrationSet

EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx
ALIGN = 64


class DedupStore:
    """One external-data file for a network's graphs; identical tensors are stored once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._index: dict[tuple[int, tuple[int, ...], bytes], tuple[int, int]] = {}

    def put(self, tensor: onnx.TensorProto) -> None:
        data = tensor.raw_data
        key = (tensor.data_type, tuple(tensor.dims), _digest(data))
        if key not in self._index:
            offset = self._file.tell()
            pad = (-offset) % ALIGN
            self._file.write(b"\0" * pad)
            self._file.write(data)
            self._index[key] = (offset + pad, len(data))
        offset, length = self._index[key]
        onnx.external_data_helper.set_external_data(tensor, self.path.name, offset, length)
        tensor.ClearField("raw_data")

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def save_graph(model: onnx.ModelProto, path: Path, store: DedupStore) -> int:
    """Write `model` with its large tensors in `store`; returns its weight bytes."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
            if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                store.put(tensor)
        else:
            total += numpy_helper.to_array(tensor).nbytes
    onnx.save(model, str(path))
    return total


def signature(model: onnx.ModelProto) -> list[tuple[str, int, tuple[Any, ...]]]:
    def one(v: onnx.ValueInfoProto) -> tuple[str, int, tuple[Any, ...]]:
        t = v.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
        return v.name, t.elem_type, dims
    return [one(v) for v in model.graph.input] + [("->", 0, ())] + [one(v) for v in model.graph.output]


def transplant(primary: onnx.ModelProto, secondary: onnx.ModelProto, weights: set[str]) -> int:
    """Give `secondary` the primary's quantized weight tensors (same name, dtype and shape):
    the weight itself and what modelopt derives from its name (`<w>_i4`, `<w>_scale`, ...)."""
    source = {t.name: t for t in primary.graph.initializer}
    moved = 0
    for tensor in secondary.graph.initializer:
        other = source.get(tensor.name)
        if other is None or not any(tensor.name == w or tensor.name.startswith(w + "_") for w in weights):
            continue
        if other.data_type != tensor.data_type or list(other.dims) != list(tensor.dims):
            raise PpxError(f"quantize: shared weight {tensor.name} was quantized differently in the "
                           "graphs of one network")
        tensor.CopyFrom(other)
        moved += 1
    return moved


def opset_of(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def smoke_run(path: Path, sample: Mapping[str, np.ndarray] | None) -> None:
    """The quantized graph loads in ONNX Runtime CPU and gives finite outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        if sample is None:
            return
        for meta, value in zip(session.get_outputs(), session.run(None, dict(sample)), strict=True):
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise PpxError(f"{path.name}: output {meta.name} is not finite after quantization")
    except PpxError:
        raise
    except Exception as exc:
        raise PpxError(f"{path.name}: the quantized graph does not run on ONNX Runtime CPU "
                       f"({str(exc).splitlines()[0]})") from None


def copy_files(manifest: Manifest, tmp: Path, skip: set[str]) -> None:
    for name in manifest.files:
        if name in skip:
            continue
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.root / name, dst)


def quantized_manifest(manifest: Manifest, precision: str, plan: Mapping[str, str], updates: Mapping[str, dict[str, Any]],
                  calib: CalibrationSet, version: str, device: str, tmp: Path) -> dict[str, Any]:
    data = json.loads(json.dumps(manifest.data))  # deep copy
    opsets = [int(data.get("opset", 17))]
    for key, update in updates.items():
        graph = data["graphs"][key]
        graph["data_file"] = update["data_file"]
        graph["meta"]["weight_bytes"] = update["weight_bytes"]
        graph["meta"]["opset"] = update["opset"]
        opsets.append(update["opset"])
    data["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["producer"] = "ppx-export quantize"
    data["opset"] = max(opsets)
    data["quantization"] = {
        "precision": precision,
        "networks": dict(plan),
        "tool": "nvidia-modelopt",
        "modelopt_version": version,
        "recipes": {key: update["recipe"] for key, update in updates.items()},
        "calibration": {**calib.summary(), "device": device},
        "source_build": {"path": str(manifest.root.resolve()),
                         "manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME)},
    }
    data["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                     if p.is_file() and p.name != MANIFEST_NAME}
    return data
