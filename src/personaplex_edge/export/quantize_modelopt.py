"""Calling NVIDIA Model Optimizer's ONNX PTQ: the recipe per precision and one quiet, one-line-failing call."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from personaplex_edge.runtime.errors import PpxError

HEAD_WEIGHT = re.compile(r"^(text_linear|linears\.\d+)\.weight$")  # output heads: INT8 under int4-awq


def load_modelopt() -> tuple[str, Any]:
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise PpxError(f"nvidia-modelopt is not usable ({exc}); install it with the export extras "
                       "(pip install -e '.[export]')") from None
    # modelopt logs to stdout at INFO (and an NVML error on machines without a GPU): keep the
    # CLI's output ours; failures still surface as exceptions.
    logging.getLogger("modelopt").setLevel(logging.CRITICAL)
    return modelopt.__version__, quantize


def _reader(samples: Sequence[Mapping[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        """Recorded feed dicts, one calibration step each (shapes may differ: prefill T)."""

        def __init__(self) -> None:
            self._items = [dict(s) for s in samples]
            self._it = iter(self._items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def get_first(self) -> dict[str, np.ndarray]:
            return self._items[0]

        def rewind(self) -> None:
            self._it = iter(self._items)

    return ListReader()


def linear_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls with a constant 2-D weight: the linear layers (not attention over the cache)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def recipe_for(precision: str, primary: bool, model: onnx.ModelProto, block_size: int) -> dict[str, Any]:
    linears = linear_nodes(model)
    names = [n.name for n in linears]
    if precision == "int8":
        return {"quantize_mode": "int4", "calibration_method": "rtn_dq", "block_size": -1,
                "layers_8bit": ",".join(names)}
    if precision == "int4-awq":
        heads = [n.name for n in linears if HEAD_WEIGHT.match(n.input[1])]
        # The prefill graph gets RTN (same layout); its weights are replaced by the step's AWQ ones.
        recipe: dict[str, Any] = {"quantize_mode": "int4", "block_size": block_size,
                                  "calibration_method": "awq_clip" if primary else "rtn_dq"}
        if heads:
            recipe["layers_8bit"] = ",".join(heads)
        return recipe
    mode = "fp8" if precision == "fp8" else "int8"
    return {"quantize_mode": mode, "calibration_method": "max", "dq_only": True,
            "nodes_to_quantize": [f"^{re.escape(n)}$" for n in names],
            "enable_gemv_detection_for_trt": False}


def run_modelopt(quantize: Any, src: Path, out: Path, recipe: Mapping[str, Any],
                  samples: Sequence[Mapping[str, np.ndarray]], eps: list[str], high_precision: str) -> onnx.ModelProto:
    out.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()  # tqdm bars and graphsurgeon/polygraphy notes: not for our users
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            quantize(str(src), calibration_data_reader=_reader(samples), calibration_eps=eps,
                     high_precision_dtype=high_precision, use_external_data_format=True,
                     output_path=str(out), log_level="CRITICAL", **recipe)
    except PpxError:
        raise
    except Exception as exc:  # modelopt/ORT raise many types; the user needs one line
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = "; calibrating on CUDA needs a working GPU (try --device cpu)" if eps[0].startswith("cuda") else ""
        raise PpxError(f"{src.name}: modelopt {recipe['quantize_mode']}/{recipe['calibration_method']} "
                       f"failed: {type(exc).__name__}: {first}{hint}") from None
    if not out.is_file():
        raise PpxError(f"{src.name}: modelopt wrote no quantized graph")
    return onnx.load(str(out), load_external_data=True)
