"""ONNX Runtime backend: CPU here; CUDA or TensorRT execution providers on a device.

State lives in host numpy arrays bound to the sessions once; cache updates are
written in place into the ring (only the new entries cross), state_out values
replace their state_in arrays. Sessions are created with all graph
optimisations and a thread count that suits a small CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np

from personaplex_edge.runtime.backends.base import graphs_of, initial_value, ring_slots
from personaplex_edge.runtime.core.manifest import GraphInfo, Manifest, TensorInfo
from personaplex_edge.runtime.core.network import NETWORKS
from personaplex_edge.runtime.errors import PpxError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


SMALL_GRAPH_BYTES = 64 << 20  # below this, one thread beats a thread pool's hand-offs


def session_options(threads: int | None, weight_bytes: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is None:
        threads = 1 if weight_bytes < SMALL_GRAPH_BYTES else min(4, os.cpu_count() or 1)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if threads > 1:
        # Spinning workers steal the CPU from the audio threads between frames.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OrtNetwork:
    """One network (one or more graphs sharing state) on ONNX Runtime."""

    def __init__(self, name: str, graphs: list[GraphInfo], manifest: Manifest, providers: list[str],
                 threads: int | None = None):
        import onnxruntime as ort

        if not graphs:
            raise PpxError(f"{manifest.root}: build has no graph for network {name!r}")
        self.name = name
        self._graphs = {g.key: g for g in graphs}
        self._sessions = {}
        for g in graphs:
            path = manifest.path(g.file)
            try:
                options = session_options(threads, int(g.meta.get("weight_bytes", 0)))
                self._sessions[g.key] = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # ORT raises its own exception types for bad models
                raise PpxError(f"{path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0]})") from None
            active = self._sessions[g.key].get_providers()
            if providers[0] not in active:  # ORT falls back to the CPU with only a warning
                raise PpxError(f"{path}: ONNX Runtime did not start {providers[0]} (the session would "
                               f"run on {', '.join(active)}); check the CUDA libraries it needs")
        # One state dict for the network: the same names across its graphs.
        self._state_specs: dict[str, TensorInfo] = {}
        self._offset_name: str | None = None
        for g in graphs:
            for t in g.inputs:
                if t.role in ("state_in", "cache"):
                    self._state_specs.setdefault(t.name, t)
                elif t.role == "offset":
                    self._offset_name = t.name
        self._out_names = {key: [t.name for t in g.outputs] for key, g in self._graphs.items()}
        self._outputs_by_name = {key: {t.name: t for t in g.outputs} for key, g in self._graphs.items()}
        self.state: dict[str, np.ndarray] = {}
        self._offset = 0
        self.run_ms = 0.0  # time inside ONNX Runtime during the last run() (host work is the rest)
        self.reset()

    @property
    def offset(self) -> int:
        return self._offset

    def reset(self) -> None:
        for name, spec in self._state_specs.items():
            value = initial_value(spec.shape, spec.dtype, spec.init)
            if name in self.state and self.state[name].shape == value.shape:
                self.state[name][...] = value  # keep the buffers: in place
            else:
                self.state[name] = value
        self._offset = 0

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[graph]
        feeds = dict(inputs)
        for spec in self._graphs[graph].inputs:
            if spec.role in ("state_in", "cache"):
                feeds[spec.name] = self.state[spec.name]
        if self._offset_name is not None:
            feeds[self._offset_name] = np.array([self._offset], np.int64)
        t0 = time.perf_counter()
        values = session.run(self._out_names[graph], feeds)
        self.run_ms = (time.perf_counter() - t0) * 1e3
        results: dict[str, np.ndarray] = {}
        steps = 0
        for name, value in zip(self._out_names[graph], values, strict=True):
            spec = self._outputs_by_name[graph][name]
            if spec.role == "state_out":
                self.state[spec.pair] = value
            elif spec.role == "cache_update":
                steps = self._write_ring(spec, value)
            else:
                results[name] = value
        self._offset += steps
        return results

    def _write_ring(self, spec: TensorInfo, update: np.ndarray) -> int:
        cache = self.state[spec.pair]
        axis = spec.slot_axis
        steps = update.shape[axis]
        index = [slice(None)] * cache.ndim
        index[axis] = ring_slots(self._offset, steps, cache.shape[axis])
        cache[tuple(index)] = update
        return steps

    def snapshot(self, slots: int | None = None) -> dict[str, np.ndarray]:
        """Host copy of the state; with `slots`, caches keep only their first `slots` ring slots
        (after a prefill from position 0 nothing else is filled)."""
        snap: dict[str, np.ndarray] = {}
        for name, value in self.state.items():
            spec = self._state_specs[name]
            if slots is not None and spec.role == "cache":
                index = [slice(None)] * value.ndim
                index[spec.slot_axis] = slice(0, slots)
                value = value[tuple(index)]
            snap[name] = value.copy()
        snap["__offset__"] = np.array(self._offset, np.int64)
        return snap

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a snapshot. Caches may be partial (first n slots): the rest is left as is,
        since the slot positions derived from the offset mask every slot not yet written."""
        for name, spec in self._state_specs.items():
            if name not in state:
                raise PpxError(f"snapshot: {self.name}: missing state {name}")
            value = np.asarray(state[name])
            target = self.state[name]
            index = [slice(None)] * target.ndim
            if spec.role == "cache":
                index[spec.slot_axis] = slice(0, value.shape[spec.slot_axis])
            view = target[tuple(index)]
            if value.shape != view.shape or value.dtype != target.dtype:
                raise PpxError(f"snapshot: {self.name}: {name} has shape {value.shape} {value.dtype}, "
                               f"the build needs {view.shape} {target.dtype}")
            view[...] = value
        self._offset = int(state["__offset__"])


class OrtBackend:
    def __init__(self, device: str = "cpu", threads: int | None = None):
        if device not in PROVIDERS:
            raise PpxError(f"backend: unknown ONNX Runtime device {device!r} (cpu, cuda, tensorrt)")
        self.name = f"onnxruntime-{device}"
        self.providers = PROVIDERS[device]
        if device != "cpu":  # refuse up front: a GPU backend must never run on the CPU unnoticed
            import onnxruntime as ort

            have = ort.get_available_providers()
            if self.providers[0] not in have:
                raise PpxError(f"backend ort-{device}: this onnxruntime has no {self.providers[0]} "
                               f"(it has {', '.join(have)}) and will not fall back silently; install "
                               "NVIDIA's onnxruntime-gpu wheel for this JetPack or choose another backend")
        self.threads = threads

    def open(self, manifest: Manifest, network: str) -> OrtNetwork:
        if network not in NETWORKS:
            raise PpxError(f"backend: unknown network {network!r}")
        return OrtNetwork(network, graphs_of(manifest, network), manifest, self.providers, self.threads)
