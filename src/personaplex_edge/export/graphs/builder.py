"""A thin ONNX graph builder that streams weights into an external-data file.

Graphs are written node by node with `GraphBuilder.op`. Weights go through
`GraphBuilder.weight`, which appends their bytes to `<graph>.onnx.data` at
once and keeps only a reference, so a 7B graph never holds more than one
tensor in memory. Every input and output carries a *role* for the manifest
("input", "output", "state"), and state inputs name the output that carries
their next value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ALIGN = 64  # external-data offsets aligned for mmap / DMA friendliness

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype: Any) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output, as recorded in the manifest."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]
    role: str  # see ROLES
    pair: str | None = None  # state/cache input <-> the output carrying its update
    doc: str = ""
    slot_axis: int | None = None  # for "cache"/"cache_update": the ring-slot (time) axis

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                             "role": self.role}
        if self.pair:
            d["pair"] = self.pair
        if self.doc:
            d["doc"] = self.doc
        if self.slot_axis is not None:
            d["slot_axis"] = self.slot_axis
        return d


# Roles of graph inputs/outputs, as the runtime treats them:
#   input / output   per-call data (audio, tokens, logits, sampling settings, noise)
#   state_in / state_out   whole small state replaced by its paired output after each call
#   cache / cache_update   a ring buffer kept by the runtime; the update holds only this
#                          call's new entries, written at slots (offset + t) % capacity
#                          along `slot_axis`
#   offset   int64 [1]: absolute position of the first step of this call
ROLES = ("input", "output", "state_in", "state_out", "cache", "cache_update", "offset")


class WeightStore:
    """One external-data file that several graphs share (the temporal step and prefill
    graphs hold the same 7B weights: stored once, referenced by both)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.entries: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}  # name -> offset, len, dtype, shape
        self.bytes = 0

    def put(self, name: str, arr: np.ndarray) -> tuple[int, int]:
        if name in self.entries:
            offset, length, dtype, shape = self.entries[name]
            if dtype != onnx_dtype(arr.dtype) or shape != arr.shape:
                raise ValueError(f"shared weight {name} differs between graphs")
            return offset, length
        offset = self.file.tell()
        pad = (-offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        self.file.write(arr.tobytes())
        self.bytes += arr.nbytes
        self.entries[name] = (offset, arr.nbytes, onnx_dtype(arr.dtype), arr.shape)
        return offset, arr.nbytes

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class GraphBuilder:
    """Builds one ONNX graph; `save` writes `<path>` (weights go to the store's file)."""

    def __init__(self, name: str, weight_dtype: Any = np.float32, data_path: Path | None = None,
                 store: WeightStore | None = None):
        self.name = name
        self.weight_dtype = np.dtype(weight_dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.specs: list[TensorSpec] = []
        self._counter = 0
        self._names: set[str] = set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        # A private store unless one is shared with other graphs.
        self._own_store = store is None and data_path is not None
        self.store = WeightStore(data_path) if self._own_store else store
        self.weight_bytes = 0
        # Graph-level facts for the manifest (cache capacity, steps per call, ...).
        self.meta: dict[str, Any] = {}

    # -- naming -------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        name = f"{hint}_{self._counter}"
        self._names.add(name)
        return name

    # -- graph interface ----------------------------------------------------
    def input(self, name: str, dtype: Any, shape: tuple[int | str, ...], role: str = "input",
              pair: str | None = None, doc: str = "", slot_axis: int | None = None) -> str:
        assert role in ROLES, role
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        self.specs.append(TensorSpec(name, np.dtype(dtype).name, tuple(shape), role, pair, doc, slot_axis))
        self._names.add(name)
        return name

    def output(self, value: str, name: str, dtype: Any, shape: tuple[int | str, ...],
               role: str = "output", pair: str | None = None, doc: str = "",
               slot_axis: int | None = None) -> None:
        """Expose `value` as graph output `name` (an Identity keeps names stable)."""
        assert role in ROLES, role
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        self.specs.append(TensorSpec(name, np.dtype(dtype).name, tuple(shape), role, pair, doc, slot_axis))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           **attrs: Any) -> Any:
        base = name or op_type.lower()
        outs = [self.fresh(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0] + "_node", **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    # -- constants and weights ----------------------------------------------
    def const(self, value: Any, dtype: Any = None) -> str:
        """A small constant, deduplicated, stored inline."""
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray, dtype: Any = None) -> str:
        """A named weight, cast to the graph's weight dtype (or `dtype`), stored externally."""
        arr = np.ascontiguousarray(array, dtype=np.dtype(dtype) if dtype is not None else self.weight_dtype)
        if name in self._names:
            raise ValueError(f"duplicate weight name {name}")
        self._names.add(name)
        if self.store is None or arr.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(arr, name))
            return name
        offset, length = self.store.put(name, arr)
        self.weight_bytes += length
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx_dtype(arr.dtype)
        tensor.dims.extend(arr.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.store.path.name), ("offset", str(offset)),
                           ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    # -- output -----------------------------------------------------------
    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="personaplex-edge")
        model.ir_version = 8  # readable by TensorRT 10.3's parser and ONNX Runtime >= 1.14
        return model

    def save(self, path: Path) -> None:
        """Write the graph to `path` (its weights are already in the store's file)."""
        self.close()
        onnx.save_model(self.model(), str(path))

    def close(self) -> None:
        if self._own_store and self.store is not None:
            self.store.close()
