"""ONNX operators and dtypes that the TensorRT 10.3 ONNX parser accepts (JetPack 6 ships TRT 10.3).

Source: onnx-tensorrt docs/operators.md ("Operator Support Matrix") at tag release/10.1-GA,
commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c (TensorRT 10.1 GA; the page's header still
reads "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20").
The 10.3 parser is onnx-tensorrt commit 62bdde2a04fcd53c2409cb895ee18db445b7e755 (the
parsers/onnx submodule of NVIDIA/TensorRT v10.3.0), but its docs/operators.md could not be read
here, so this is the nearest 10.x matrix at or below 10.3. Per docs/Changelog.md, 10.2 changed
only the GRU and Squeeze importers and 10.3 added tensor `axes` for Slice and moved
ScatterElements to a new plugin; none of these adds an op or a dtype.

Values are the matrix's "Supported Types" strings, copied verbatim. Only ops the matrix marks
supported are listed: MatMulInteger (asked about as a likely future op) is "N" there and is
left out on purpose.
"""

from __future__ import annotations

TRT_10_3_SOURCE = "onnx-tensorrt docs/operators.md @ release/10.1-GA (96e7811), for TensorRT 10.3"

# op_type -> "Supported Types" column of the matrix.
TRT_10_3_OPS: dict[str, str] = {
    "Abs": "FP32, FP16, BF16, INT32, INT64",
    "Add": "FP32, FP16, BF16, INT32, INT64",
    "And": "BOOL",
    "ArgMax": "FP32, FP16, BF16, INT32, INT64",
    "ArgMin": "FP32, FP16, BF16, INT32, INT64",
    "Cast": "FP32, FP16, BF16, INT32, INT64, UINT8, BOOL",
    "Clip": "FP32, FP16, BF16",
    "Concat": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Conv": "FP32, FP16, BF16",
    "ConvTranspose": "FP32, FP16, BF16",
    "Cos": "FP32, FP16, BF16",
    "DequantizeLinear": "INT8, FP8, INT4",
    "Div": "FP32, FP16, BF16, INT32, INT64",
    "Elu": "FP32, FP16, BF16",
    "Equal": "FP32, FP16, BF16, INT32, INT64",
    "Erf": "FP32, FP16, BF16",
    "Exp": "FP32, FP16, BF16",
    "Expand": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Gather": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "GatherElements": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Gemm": "FP32, FP16, BF16",
    "GreaterOrEqual": "FP32, FP16, BF16, INT32, INT64",
    "Identity": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "LayerNormalization": "FP32, FP16, BF16",
    "Less": "FP32, FP16, BF16, INT32, INT64",
    "LessOrEqual": "FP32, FP16, BF16, INT32, INT64",
    "Log": "FP32, FP16, BF16",
    "MatMul": "FP32, FP16, BF16",
    "Max": "FP32, FP16, BF16, INT32, INT64",
    "Min": "FP32, FP16, BF16, INT32, INT64",
    "Mod": "FP32, FP16, BF16, INT32, INT64",
    "Mul": "FP32, FP16, BF16, INT32, INT64",
    "Neg": "FP32, FP16, BF16, INT32, INT64",
    "Or": "BOOL",
    "Pad": "FP32, FP16, BF16, INT32, INT64",
    "Pow": "FP32, FP16, BF16",
    "QuantizeLinear": "FP32, FP16, BF16",
    "Range": "FP32, FP16, BF16, INT32, INT64",
    "Reciprocal": "FP32, FP16, BF16",
    "ReduceMax": "FP32, FP16, BF16, INT32, INT64",
    "ReduceMean": "FP32, FP16, BF16, INT32, INT64",
    "ReduceSum": "FP32, FP16, BF16, INT32, INT64",
    "Relu": "FP32, FP16, BF16, INT32, INT64",
    "Reshape": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "ScatterElements": "FP32, FP16, BF16, INT32, INT64",
    "Shape": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Sigmoid": "FP32, FP16, BF16",
    "Sin": "FP32, FP16, BF16",
    "Slice": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Softmax": "FP32, FP16, BF16",
    "Split": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Sqrt": "FP32, FP16, BF16",
    "Squeeze": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Sub": "FP32, FP16, BF16, INT32, INT64",
    "Tanh": "FP32, FP16, BF16",
    "Tile": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "TopK": "FP32, FP16, BF16, INT32, INT64",
    "Transpose": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Unsqueeze": "FP32, FP16, BF16, INT32, INT64, BOOL",
    "Where": "FP32, FP16, BF16, INT32, INT64, BOOL",
}

# Restrictions from the same matrix (plus its notes) that bear on our graphs, and a few facts
# from the onnx-tensorrt 10.1 importer source (onnxOpImporters.cpp), marked "importer".
TRT_10_3_RESTRICTIONS: list[str] = [
    "Opsets 9 to 20 only (our graphs are opset 17).",
    "INT8, INT4 and FP8 only through Q/DQ from a higher-precision float type.",
    "UINT8 only as a network input or output; DOUBLE is cast down to FLOAT.",
    "And, Or (and Not, Xor) take BOOL only; arithmetic and comparisons do not list BOOL.",
    "TopK: `sorted` must be 1; `K` must be less than 3840 (ours: min(k_max, vocab) = 250).",
    "Slice: `axes` must be an initializer (the 10.3 changelog adds tensor axes).",
    "Squeeze: `axes` must be an initializer.",
    "Unsqueeze: `axes` must be a constant tensor.",
    "ReduceMean/ReduceSum/ReduceMax: `axes` must be an initializer when given as an input.",
    "Pad: `axes` must be an initializer.",
    "LayerNormalization: only the first output `Y` is supported.",
    "QuantizeLinear: `y_zero_point` must be 0.",
    "DequantizeLinear: `x_zero_point` must be zero; input INT8, FP8 or INT4.",
    "ScatterND: `reduction` is not supported.",
    "MatMulInteger: not supported.",
    "importer: Mod with fmod=0 needs INT32/INT64 inputs; float Mod needs fmod=1.",
    "importer: Range needs start, limit and delta of one type: INT32, INT64 or FP32.",
    "importer: 1D Conv/ConvTranspose are run as 2D; ConvTranspose input rank 3 to 5.",
    "importer: ArgMax/ArgMin/TopK indices come back INT64.",
]
