"""`ppx-export onnx`: a checkpoint directory -> a build directory of streaming ONNX graphs.

The build holds one graph per network (weights as ONNX external data), the
tokenizer, the voices (torch presets converted to .npz) and `manifest.json`.
It is assembled in a temporary directory and renamed into place at the end,
so an interrupted or failed export leaves nothing half-written.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from personaplex_edge.runtime.constants import SILENCE_TOKENS, SINE_TOKENS
from personaplex_edge.runtime.core.manifest import (
    FORMAT,
    FORMAT_VERSION,
    graph_info_to_dict,
    sha256_file,
    write_manifest,
)
from personaplex_edge.runtime.errors import PpxError

from .atomic import atomic_output_dir, refuse_overlap
from .checkpoint import Checkpoint
from .config import LMConfig
from .graphs import depformer, mimi, temporal
from .graphs.builder import OPSET, GraphBuilder, WeightStore
from .progress import bar, note
from .voices import builtin_voice_gaps, bundle_voices

TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    prefill_steps: int = 512
    k_max: int = 250  # largest top-k the in-graph samplers support (upstream audio default)
    # "agent": the depformer predicts only the agent's codebooks. Its later depth steps
    # predict the user's audio, which the runtime always provides (the user's own Mimi
    # codes) and no earlier step can see, so they change nothing but cost half the
    # depformer's weight reads. "all" keeps every step (upstream's full depformer).
    depformer_steps: str = "agent"


class _Ticking(Mapping[str, np.ndarray]):
    """Checkpoint weights that call `tick(name)` after each tensor read. The graph builders
    read the checkpoint lazily, one tensor at a time, so this is the export's progress."""

    def __init__(self, source: Mapping[str, np.ndarray], tick: Callable[[str], None]):
        self.source = source
        self.tick = tick

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.source[name]
        self.tick(name)
        return array

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def _graph_plan(ckpt: Checkpoint, opts: ExportOptions, tick: Callable[[str], None] = lambda name: None
                ) -> list[tuple[str, str, Callable[[GraphBuilder], None]]]:
    """(graph key, external-data file, builder). Graphs naming the same data file share
    their weights: the temporal step and prefill graphs are stored once. `tick(name)` is
    called at every tensor read from the checkpoint."""
    cfg = ckpt.config
    lm, mimi_weights = _Ticking(ckpt.lm, tick), _Ticking(ckpt.mimi, tick)
    return [
        ("mimi_encoder", "mimi_encoder.onnx.data", lambda g: mimi.build_encoder(g, mimi_weights, cfg.mimi)),
        ("mimi_decoder", "mimi_decoder.onnx.data", lambda g: mimi.build_decoder(g, mimi_weights, cfg.mimi)),
        ("temporal_step", "temporal.onnx.data",
         lambda g: temporal.build_step(g, lm, cfg.lm, k_max=opts.k_max)),
        ("temporal_prefill", "temporal.onnx.data",
         lambda g: temporal.build_prefill(g, lm, cfg.lm, max_steps=opts.prefill_steps)),
        ("depformer", "depformer.onnx.data",
         lambda g: depformer.build_depformer(g, lm, cfg.lm, k_max=opts.k_max,
                                             steps=_depformer_steps(opts, cfg.lm))),
    ]


def _depformer_steps(opts: ExportOptions, lm: LMConfig) -> int:
    if opts.depformer_steps == "all":
        return lm.dep_q
    return min(lm.dep_q, lm.n_q // 2)  # the agent's codebooks come first in depth order


def _build_graph(key: str, build: Callable[[GraphBuilder], None], out: Path, dtype: Any,
                 store: WeightStore) -> dict[str, Any]:
    g = GraphBuilder(key, weight_dtype=dtype, store=store)
    build(g)
    g.save(out / f"{key}.onnx")
    input_names = [i.name for i in g.inputs]
    meta = dict(g.meta)
    meta["weight_bytes"] = g.weight_bytes
    specs = [s.to_dict() for s in g.specs]
    for spec in specs:  # the runtime starts every state at zeros unless told otherwise
        if spec["name"] in mimi.NONZERO_INITIAL:
            spec["init"] = mimi.NONZERO_INITIAL[spec["name"]]
    return graph_info_to_dict(key, f"{key}.onnx", store.path.name, specs, input_names, meta)


def export_onnx(checkpoint_dir: Path, out: Path, opts: ExportOptions, force: bool = False,
                quiet: bool = False) -> Path:
    if opts.dtype not in DTYPES:
        raise PpxError(f"--dtype: {opts.dtype!r} is not one of {', '.join(DTYPES)}")
    if opts.depformer_steps not in ("agent", "all"):
        raise PpxError(f"--depformer-steps: {opts.depformer_steps!r} is not one of agent, all")
    refuse_overlap(out, {"--checkpoint": checkpoint_dir})
    ckpt = Checkpoint.open(checkpoint_dir)
    if (gaps := builtin_voice_gaps(ckpt.voice_sources())) is not None:  # before minutes of work
        note(f"ppx-export: warning: {checkpoint_dir}: {gaps}")
    if not 1 <= opts.prefill_steps <= ckpt.config.lm.context:
        raise PpxError(f"--prefill-steps: {opts.prefill_steps} must be within 1..{ckpt.config.lm.context} "
                       "(the temporal context)")
    reading: list[tqdm] = []  # the bar of the graph being built: one tick per tensor read

    def tick(name: str) -> None:
        reading[-1].set_postfix_str(name, refresh=False)
        reading[-1].update(1)

    plan = _graph_plan(ckpt, opts, tick)
    with bar("onnx", len(plan) + 2, quiet=quiet, unit=" steps") as progress, \
            atomic_output_dir(out, force=force) as tmp:
        progress.set_postfix_str("hashing the checkpoint")
        source_hashes = ckpt.file_hashes()
        progress.update(1)
        graphs: dict[str, Any] = {}
        stores: dict[str, WeightStore] = {}
        try:
            for key, data_file, build in plan:
                progress.set_postfix_str(f"building {key}")
                if data_file not in stores:
                    stores[data_file] = WeightStore(tmp / data_file)
                store = stores[data_file]
                with bar(f"onnx {key}", quiet=quiet, unit=" tensors", nested=True) as graph_bar:
                    reading.append(graph_bar)
                    graphs[key] = _build_graph(key, build, tmp, DTYPES[opts.dtype], store)
                progress.update(1)
        finally:
            for store in stores.values():
                store.close()
        progress.set_postfix_str("checking and hashing the build")
        for key in graphs:
            onnx.checker.check_model(str(tmp / f"{key}.onnx"))
        shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER_FILE)
        voices = bundle_voices(ckpt.voice_sources(), tmp / "voices", ckpt.config.lm.dim,
                               ckpt.config.lm.num_streams)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "producer": "ppx-export onnx",
            "opset": OPSET,
            "dtype": opts.dtype,
            "model": ckpt.config.to_dict(),
            "prompt_tokens": {"silence": list(SILENCE_TOKENS), "sine": list(SINE_TOKENS)},
            "sampling": {"k_max": opts.k_max},
            "source": {"checkpoint": str(Path(checkpoint_dir).resolve()), "sha256": source_hashes},
            "tokenizer": TOKENIZER_FILE,
            "voices": voices,
            "graphs": graphs,
            "files": files,
        }
        write_manifest(tmp, manifest)
        progress.update(1)
    return out
