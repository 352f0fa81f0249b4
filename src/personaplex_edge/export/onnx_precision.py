"""What precision an ONNX graph is in: its float dtype and its explicit quantization.

`ppx-export engines` builds each graph the way its types say (a strongly typed
network for Q/DQ and 16-bit graphs) and refuses a target whose precision the
graph does not carry (an INT8 target on an unquantized build). Reads the graph
proto only; external weight data stays on disk.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from personaplex_edge.runtime.errors import PpxError

_FLOATS = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
# Quantized element types (DequantizeLinear inputs / zero points) -> precision family.
_QUANT: dict[int, str] = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8",
                          TensorProto.FLOAT8E4M3FN: "fp8"}
for _name, _family in (("INT4", "int4-awq"), ("UINT4", "int4-awq"), ("FLOAT4E2M1", "nvfp4")):
    if hasattr(TensorProto, _name):  # onnx >= 1.16 (int4), >= 1.18 (fp4)
        _QUANT[getattr(TensorProto, _name)] = _family
_PRIORITY = ("nvfp4", "int4-awq", "fp8", "int8")  # the narrowest names a mixed graph


@dataclass(frozen=True)
class GraphPrecision:
    float_dtype: str  # fp32, fp16 or bf16: the dtype most float weights are stored in
    quant: str | None  # int8, int8-sq, fp8, int4-awq, nvfp4, or None (no Q/DQ)

    @property
    def name(self) -> str:
        return self.quant or self.float_dtype


def graph_precision(path: Path) -> GraphPrecision:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise PpxError(f"{path}: not a readable ONNX graph ({type(exc).__name__})") from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # tensors held by Constant nodes count as initializers
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    inits[node.output[0]] = attr.t
    floats: Counter[str] = Counter()
    for t in inits.values():
        if t.data_type in _FLOATS:
            n = 1
            for d in t.dims:
                n *= d
            floats[_FLOATS[t.data_type]] += n
    families: set[str] = set()
    activation_quant = False
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            for name in node.input[:1] + node.input[2:3]:
                if name in inits and inits[name].data_type in _QUANT:
                    families.add(_QUANT[inits[name].data_type])
        elif node.op_type == "QuantizeLinear":
            if node.input[0] not in inits:
                activation_quant = True  # activations quantized: W8A8 rather than weight-only
            if len(node.input) > 2 and node.input[2] in inits and inits[node.input[2]].data_type in _QUANT:
                families.add(_QUANT[inits[node.input[2]].data_type])
    quant = next((f for f in _PRIORITY if f in families), None)
    if quant == "int8" and activation_quant:
        quant = "int8-sq"
    float_dtype = floats.most_common(1)[0][0] if floats else "fp32"
    return GraphPrecision(float_dtype, quant)
