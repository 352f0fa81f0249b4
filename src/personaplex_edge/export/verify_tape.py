"""Taping the reference conversation and replaying a tape into a tested network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from personaplex_edge.runtime.core.manifest import Manifest
from personaplex_edge.runtime.core.network import Backend, Network

Tape = list[tuple[str, str, dict[str, np.ndarray], dict[str, np.ndarray]]]


class TapedNetwork:
    """A Network that passes everything through and tapes calls, resets and restores."""

    def __init__(self, inner: Network,
                 tape: Tape,
                 order: list[tuple[str, int]]):
        self._inner = inner
        self._tape = tape
        self._order = order
        self.name = inner.name

    @property
    def run_ms(self) -> float:
        return self._inner.run_ms

    @run_ms.setter
    def run_ms(self, value: float) -> None:
        self._inner.run_ms = value

    @property
    def offset(self) -> int:
        return self._inner.offset

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._inner.run(graph, inputs)
        self._tape.append(("run", graph, {k: np.array(v, copy=True) for k, v in inputs.items()},
                           {k: np.array(v, copy=True) for k, v in out.items()}))
        self._order.append((self.name, len(self._tape) - 1))
        return out

    def reset(self) -> None:
        self._tape.append(("reset", "", {}, {}))
        self._inner.reset()

    def snapshot(self, slots: int | None = None) -> dict[str, np.ndarray]:
        return self._inner.snapshot(slots)

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self._tape.append(("restore", "", {}, {}))
        self._inner.restore(state)


def untaped(net: Any) -> Network:
    return net._inner if isinstance(net, TapedNetwork) else net  # noqa: SLF001


class TapingBackend:
    def __init__(self, inner: Backend):
        self._inner = inner
        self.name = inner.name
        self.tapes: dict[str, Tape] = {}
        # (network, tape index) of every run, in call order (the encoder runs on a worker
        # thread, so only the LM's entries are ordered among the networks).
        self.order: list[tuple[str, int]] = []

    def open(self, manifest: Manifest, network: str) -> TapedNetwork:
        tape = self.tapes.setdefault(network, [])
        return TapedNetwork(self._inner.open(manifest, network), tape, self.order)


def conform(manifest: Manifest, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-call inputs in the dtypes the tested graph declares (an fp16 build takes fp16)."""
    dtypes = {t.name: t.dtype for t in manifest.graph(graph).inputs}
    return {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False) for k, v in inputs.items()}


def replay(tape: list, tested: Network, manifest: Manifest) -> list[tuple[str, dict, dict]]:
    """Feed the tested network the taped inputs in order; (graph, reference out, tested out)."""
    pairs = []
    for kind, graph, inputs, ref_out in tape:
        if kind == "reset":
            tested.reset()
        elif kind == "run":
            out = tested.run(graph, conform(manifest, graph, inputs))
            pairs.append((graph, ref_out, {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                                           else v for k, v in out.items()}))
        # "restore": after compiling, the session restores the state it just made: a no-op
    return pairs

