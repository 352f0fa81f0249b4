"""A small reference driver for streaming graphs, generic over the builder's roles.

It does what the runtime does, in plain numpy: feeds each `state_in` the previous
call's paired `state_out`; keeps every `cache` as a ring buffer and writes the paired
`cache_update` entries at slots (offset + t) % capacity along `slot_axis`; feeds
`offset` inputs the absolute position of the call's first step and advances them by
the number of steps the call appended. Callers pass only the per-call inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from personaplex_edge.export.graphs.builder import TensorSpec

InitialFn = Callable[[TensorSpec], np.ndarray]


def _zeros(spec: TensorSpec) -> np.ndarray:
    return np.zeros(tuple(int(d) for d in spec.shape), dtype=spec.dtype)


class StreamingSession:
    """Runs `session` call after call, carrying states, caches and offsets between calls.

    `specs` are the graph's TensorSpecs (GraphBuilder.specs or a manifest's list);
    `initial` gives each state/cache input its value before the first call (zeros
    by default). `default_steps` advances offsets for graphs without caches.
    """

    def __init__(self, session: Any, specs: Sequence[TensorSpec], initial: InitialFn | None = None,
                 default_steps: int = 1):
        self.session = session
        self.specs = {s.name: s for s in specs}
        self.initial = initial or _zeros
        self.default_steps = default_steps
        ins = [s for s in specs if s.role in ("input", "state_in", "cache", "offset")]
        self.data_inputs = [s.name for s in ins if s.role == "input"]
        self.state_pairs = {s.pair: s.name for s in ins if s.role == "state_in"}  # out -> in
        self.cache_pairs = {s.pair: s.name for s in ins if s.role == "cache"}  # update -> cache
        self.offset_inputs = [s.name for s in ins if s.role == "offset"]
        for table in (self.state_pairs, self.cache_pairs):
            for out in table:
                if out not in self.specs:
                    raise ValueError(f"{table[out]} pairs with {out}, which the graph lacks")
        self.output_names = [s.name for s in specs if s.role in ("output", "state_out", "cache_update")]
        self.reset()

    def reset(self) -> None:
        """Back to the state before the first call."""
        self.values: dict[str, np.ndarray] = {}
        for name in list(self.state_pairs.values()) + list(self.cache_pairs.values()):
            self.values[name] = np.array(self.initial(self.specs[name]), copy=True)
        self.offset = 0
        self.calls = 0

    def step(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """One call: returns the graph's `output`-role values."""
        missing = set(self.data_inputs) - set(inputs)
        if missing:
            raise ValueError(f"missing inputs: {sorted(missing)}")
        feed: dict[str, np.ndarray] = {k: inputs[k] for k in self.data_inputs}
        feed.update(self.values)
        for name in self.offset_inputs:
            feed[name] = np.array([self.offset], dtype=np.int64)
        results = dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        steps = None
        for out, name in self.state_pairs.items():
            self.values[name] = results[out]
        for out, name in self.cache_pairs.items():
            steps = self._write_ring(name, results[out])
        self.offset += steps if steps is not None else self.default_steps
        self.calls += 1
        return {k: v for k, v in results.items() if self.specs[k].role == "output"}

    def _write_ring(self, name: str, update: np.ndarray) -> int:
        spec = self.specs[name]
        axis = spec.slot_axis
        if axis is None:
            raise ValueError(f"cache {name} has no slot_axis")
        cache = self.values[name]
        capacity, steps = cache.shape[axis], update.shape[axis]
        slots = (self.offset + np.arange(steps)) % capacity
        index: list[Any] = [slice(None)] * cache.ndim
        index[axis] = slots
        cache[tuple(index)] = update
        return steps

    def state(self) -> Mapping[str, np.ndarray]:
        """Current state and cache values, by input name (read-only use)."""
        return self.values
