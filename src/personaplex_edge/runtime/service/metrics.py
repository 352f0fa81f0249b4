"""Prometheus metrics for the daemon, served as text on a loopback HTTP endpoint.

One `Metrics` object per daemon, with its own registry (nothing global, so
tests and a restarted server never collide). The frame loop calls the
`observe_*` / `count_*` methods; they are cheap and thread-safe. Device
figures (temperatures, GPU load, unified memory) are read from sysfs/procfs
at scrape time by `DeviceCollector`, only where the device exposes them: on a
Jetson the thermal zones, the GPU load file and /proc/meminfo (CPU and GPU
share that memory); on a discrete GPU without NVML nothing GPU-specific.
`$PPX_SYSFS_ROOT` makes the daemon read them under another root than / (the
tests point it at a fake Jetson tree).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from personaplex_edge.runtime.audio.latency import PARTS as LATENCY_PARTS
from personaplex_edge.runtime.errors import ConfigError, PpxError

STAGES = ("encode", "lm", "decode", "frame")
XRUN_DIRECTIONS = ("capture", "playback")
LIFECYCLE_EVENTS = ("reanchor", "idle_reset", "context")
START_REASONS = ("startup", "switch", "reset", "recovery", "network", "network_end")
NETWORK_DIRECTIONS = ("in", "out")
NETWORK_ENDS = ("clean", "error", "refused")
REANCHOR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
# Seconds, dense around the 80 ms frame budget so p95 near the deadline is resolvable.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.075, 0.08,
                 0.085, 0.09, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0)
SYSFS_ROOT_ENV = "PPX_SYSFS_ROOT"  # where DeviceCollector looks instead of / when set


class Metrics:
    def __init__(self, sysfs_root: Path | str | None = None, device_metrics: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_seconds = Histogram(
            "ppx_stage_duration_seconds", "Time per 80 ms frame spent in each pipeline stage "
            "(frame: the whole step).", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.frames = Counter("ppx_frames", "Frames processed (80 ms each).", registry=r)
        self.deadline_misses = Counter(
            "ppx_deadline_misses", "Frames whose model step took longer than the 80 ms frame.", registry=r)
        self.xruns = Counter("ppx_xruns", "ALSA overruns (capture) and underruns (playback), recovered.",
                             ["direction"], registry=r)
        self.model_underruns = Counter(
            "ppx_model_underruns", "Playback periods filled with silence because no model audio was ready.",
            registry=r)
        self.rebuild_silence = Counter(
            "ppx_rebuild_silence_seconds", "Silence the speaker played while the context was "
            "rebuilt in a pause (re-anchor, idle reset, live context): the agent was quiet anyway, "
            "so this is not a model underrun.", registry=r)
        self.playback_trims = Counter(
            "ppx_playback_trims", "Times the playback FIFO was trimmed to its target in silence "
            "(latency the driver would otherwise hear for the rest of the drive).", registry=r)
        self.frame_errors = Counter(
            "ppx_frame_errors", "Frames that failed (the conversation restarted from its snapshot).",
            registry=r)
        self.persona = Info("ppx_persona", "The active persona.", registry=r)
        self.degraded = Gauge("ppx_degraded", "1 while the daemon reports itself degraded.", registry=r)
        self.up = Gauge("ppx_up", "1 while audio frames flow through the model.", registry=r)
        self.muted = Gauge("ppx_muted", "1 while the microphone is muted.", registry=r)
        self.paused = Gauge("ppx_paused", "1 while the agent's speech is paused.", registry=r)
        self.busy = Gauge("ppx_driver_busy", "1 while the head unit reports the driver busy.", registry=r)
        self.personas_skipped = Gauge(
            "ppx_personas_skipped", "Personas left out at start-up because their file (persona_dirs) "
            "or snapshot failed; the journal names each.", registry=r)
        # The conversation over a drive (core/conversation.py, core/lifecycle.py).
        self.context_fill = Gauge("ppx_context_fill_frames", "Steps in the model's context (persona "
                                  "prefix + conversation); re-anchoring keeps it under the capacity.",
                                  registry=r)
        self.conversation_age = Gauge("ppx_conversation_age_seconds",
                                      "Time since the conversation started (persona start, switch, "
                                      "reset).", registry=r)
        self.lifecycle_events = Counter("ppx_lifecycle_events", "Re-anchors, idle resets and live "
                                        "context updates.", ["kind"], registry=r)
        self.lifecycle_failures = Counter("ppx_lifecycle_failures", "Re-anchors or context updates "
                                          "that failed (fell back to an idle reset).", registry=r)
        self.last_lifecycle_event = Gauge("ppx_lifecycle_last_event_timestamp_seconds",
                                          "Unix time of the last event of each kind.", ["kind"],
                                          registry=r)
        self.reanchor_seconds = Histogram("ppx_reanchor_duration_seconds", "Time to rebuild the "
                                          "context (prefix restore + replay).", ["kind"],
                                          buckets=REANCHOR_BUCKETS, registry=r)
        self.conversation_starts = Counter("ppx_conversation_starts", "Conversations started, by "
                                           "reason.", ["reason"], registry=r)
        # Faults the daemon rides out (what the soak injects).
        self.audio_reopens = Counter("ppx_audio_reopens", "ALSA devices reopened after a loss.",
                                     ["direction"], registry=r)
        self.echo_reference_drops = Counter(
            "ppx_echo_reference_drops", "Times the echo canceller's playback reference was "
            "silenced because the speaker device dropped or lost its buffer (underrun, loss).",
            registry=r)
        self.snapshot_save_errors = Counter("ppx_snapshot_save_errors", "Persona snapshots that "
                                            "could not be written (read-only or full directory); "
                                            "they stay in memory.", registry=r)
        self.control_requests = Counter("ppx_control_requests", "Control socket requests by "
                                        "result (error: refused or malformed).", ["result"],
                                        registry=r)
        # The audio path's own estimate (runtime/audio/latency.py); NaN until the first reply.
        self.latency = Gauge("ppx_mic_to_speaker_latency_seconds", "Time from a sound at the "
                             "microphone to the reply to it at the speaker, model response time "
                             "aside: the sum of the parts (mean of the last 5 s of frames).",
                             registry=r)
        self.latency_parts = Gauge("ppx_mic_to_speaker_latency_part_seconds", "The "
                                   "mic-to-speaker latency's parts: frame, capture, reframing, "
                                   "resampling, echo_cancel, compute, preroll, playback.", ["part"],
                                   registry=r)
        # Which build runs (slot "" is build.path), whether it is on trial, and how many
        # installed slots failed their health check (state.json: `ppx-runtime update status`).
        self.build = Info("ppx_build", "The build being served: slot (empty: build.path) and "
                          "version.", registry=r)
        self.build_trial = Gauge("ppx_build_trial", "1 while the build is an activated slot on "
                                 "trial (not yet committed by its health check).", registry=r)
        self.failed_slots = Gauge("ppx_update_failed_slots", "Installed slots that failed their "
                                  "health check (the daemon fell back from them).", registry=r)
        # The network endpoint (runtime/network/; docs/network.md).
        self.network_active = Gauge("ppx_network_session_active", "1 while a network session "
                                    "has the model.", registry=r)
        self.network_sessions = Counter("ppx_network_sessions", "Network sessions by how they "
                                        "ended: clean (the client closed), error (timeouts, bad "
                                        "input, the cabin took the model back), refused (never "
                                        "started).", ["end"], registry=r)
        self.network_bytes = Counter("ppx_network_bytes", "Websocket payload bytes of network "
                                     "sessions.", ["direction"], registry=r)
        self.network_decode_errors = Counter("ppx_network_decode_errors", "Incoming audio that "
                                             "was not Ogg/Opus (the session ended).", registry=r)
        self.network_jitter_depth = Gauge("ppx_network_jitter_depth_seconds", "Audio in the "
                                          "network session's jitter buffer.", registry=r)
        self.network_jitter_wait = Gauge("ppx_network_jitter_wait_seconds", "Mean time incoming "
                                         "audio waits in the jitter buffer (last 10 s).",
                                         registry=r)
        self.network_underruns = Counter("ppx_network_underruns", "Frames the model heard "
                                         "silence because the client's audio was late.",
                                         registry=r)
        self.network_jitter_drops = Counter("ppx_network_jitter_drops", "Times the jitter "
                                            "buffer dropped the client's oldest audio: above "
                                            "jitter_max_ms, or a standing excess latency.",
                                            registry=r)
        self.network_rtt = Gauge("ppx_network_round_trip_seconds", "Websocket ping round trip "
                                 "of the network session.", registry=r)
        for direction in NETWORK_DIRECTIONS:
            self.network_bytes.labels(direction)
        for end in NETWORK_ENDS:
            self.network_sessions.labels(end)
        self.network_rtt.set(float("nan"))
        self.latency.set(float("nan"))
        for part in LATENCY_PARTS:
            self.latency_parts.labels(part).set(float("nan"))
        for kind in LIFECYCLE_EVENTS:
            self.lifecycle_events.labels(kind)
            self.reanchor_seconds.labels(kind)
            self.last_lifecycle_event.labels(kind).set(0)  # 0: not yet
        for reason in START_REASONS:
            self.conversation_starts.labels(reason)
        for direction in XRUN_DIRECTIONS:
            self.audio_reopens.labels(direction)
        for result in ("ok", "error"):
            self.control_requests.labels(result)
        for stage in STAGES:  # every series exists from the first scrape, at zero
            self.stage_seconds.labels(stage)
        for direction in XRUN_DIRECTIONS:
            self.xruns.labels(direction)
        if device_metrics:
            if sysfs_root is None:
                sysfs_root = os.environ.get(SYSFS_ROOT_ENV) or "/"
            r.register(DeviceCollector(sysfs_root))
        self._server = None
        self._thread: threading.Thread | None = None

    # -- the frame loop's side ------------------------------------------------------------
    def observe_stages(self, stage_ms: Mapping[str, float]) -> None:
        """One frame's stage times in milliseconds, e.g. {"encode": 3.1, "lm": 40.2, ...};
        stages outside STAGES (such as the session's `engine`) are ignored."""
        for stage, ms in stage_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(ms / 1e3)

    def count_frame(self, frame_ms: float | None = None, missed: bool = False) -> None:
        self.frames.inc()
        if frame_ms is not None:
            self.stage_seconds.labels("frame").observe(frame_ms / 1e3)
        if missed:
            self.deadline_misses.inc()

    def count_xrun(self, direction: str) -> None:
        if direction not in XRUN_DIRECTIONS:
            raise ValueError(f"xrun direction {direction!r} is not one of {XRUN_DIRECTIONS}")
        self.xruns.labels(direction).inc()

    def count_frame_error(self) -> None:
        self.frame_errors.inc()

    def count_model_underrun(self) -> None:
        self.model_underruns.inc()

    def add_rebuild_silence(self, seconds: float) -> None:
        if seconds > 0:
            self.rebuild_silence.inc(seconds)

    def count_playback_trim(self) -> None:
        self.playback_trims.inc()

    def set_personas_skipped(self, count: int) -> None:
        self.personas_skipped.set(count)

    def set_conversation(self, fill_frames: int, age_s: float) -> None:
        self.context_fill.set(fill_frames)
        self.conversation_age.set(age_s)

    def count_lifecycle(self, kind: str, ms: float) -> None:
        """A lifecycle event ("reanchor", "idle_reset", "context"; "failure" counts apart)."""
        if kind == "failure":
            self.lifecycle_failures.inc()
            return
        self.lifecycle_events.labels(kind).inc()
        self.last_lifecycle_event.labels(kind).set(time.time())
        self.reanchor_seconds.labels(kind).observe(ms / 1e3)

    def count_conversation_start(self, reason: str) -> None:
        self.conversation_starts.labels(reason).inc()

    def count_reopen(self, direction: str) -> None:
        self.audio_reopens.labels(direction).inc()

    def count_echo_reference_drop(self) -> None:
        self.echo_reference_drops.inc()

    def count_snapshot_save_error(self) -> None:
        self.snapshot_save_errors.inc()

    def set_latency(self, parts_ms: Mapping[str, float] | None) -> None:
        """The audio path's latency estimate ({"total": ms, part: ms, ...}; None: not yet)."""
        if parts_ms is None:
            return
        self.latency.set(parts_ms["total"] / 1e3)
        for part in LATENCY_PARTS:
            self.latency_parts.labels(part).set(parts_ms[part] / 1e3)

    # -- the network endpoint ------------------------------------------------------------
    def set_network_active(self, active: bool) -> None:
        self.network_active.set(1 if active else 0)

    def count_network_session(self, end: str) -> None:
        self.network_sessions.labels(end).inc()

    def count_network_bytes(self, direction: str, count: int) -> None:
        self.network_bytes.labels(direction).inc(count)

    def count_network_decode_error(self) -> None:
        self.network_decode_errors.inc()

    def set_network_jitter(self, depth_ms: float, wait_ms: float | None, underruns: int,
                           drops: int = 0) -> None:
        """The jitter buffer's depth and wait; `underruns`, `drops`: new ones since the last call."""
        self.network_jitter_depth.set(depth_ms / 1e3)
        if wait_ms is not None:
            self.network_jitter_wait.set(wait_ms / 1e3)
        if underruns > 0:
            self.network_underruns.inc(underruns)
        if drops > 0:
            self.network_jitter_drops.inc(drops)

    def set_network_rtt(self, seconds: float | None) -> None:
        self.network_rtt.set(float("nan") if seconds is None else seconds)

    def count_control_request(self, ok: bool) -> None:
        self.control_requests.labels("ok" if ok else "error").inc()

    def set_build(self, slot: str | None, version: str, trial: bool, failed_slots: int) -> None:
        self.build.info({"slot": slot or "", "version": version})
        self.build_trial.set(1 if trial else 0)
        self.failed_slots.set(failed_slots)

    def set_persona(self, name: str) -> None:
        self.persona.info({"persona": name})

    def set_state(self, up: bool | None = None, degraded: bool | None = None, muted: bool | None = None,
                  paused: bool | None = None, busy: bool | None = None) -> None:
        for gauge, value in ((self.up, up), (self.degraded, degraded), (self.muted, muted),
                             (self.paused, paused), (self.busy, busy)):
            if value is not None:
                gauge.set(1 if value else 0)

    def text(self) -> str:
        """The exposition text (what the endpoint serves; also the `metrics` control command)."""
        return generate_latest(self.registry).decode()

    # -- HTTP endpoint ------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Start the endpoint on a loopback address; returns the bound port (port 0: any free)."""
        from prometheus_client import start_http_server

        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"metrics.host: {host} is not a loopback address")
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise PpxError(f"metrics: cannot listen on {host}:{port}: {exc.strerror}") from None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=2.0)
            self._server = self._thread = None


class DeviceCollector(Collector):
    """Temperatures, GPU load and unified memory from a (possibly fake) sysfs/procfs root.

    Read at scrape time; a file that is missing or unreadable just leaves its
    series out, so the same code runs on a Jetson, a dGPU box and a CI runner."""

    GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
    # Orin (JetPack 5/6) exposes the GPU under its bus address instead.
    GPU_LOAD_GLOBS = ("sys/devices/platform/*.gpu/load", "sys/devices/platform/bus@0/*.gpu/load",
                      "sys/devices/*.ga10b/load", "sys/devices/platform/*.ga10b/load")

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: which series exist depends on the device

    def collect(self) -> Iterator[Metric]:
        temps = GaugeMetricFamily("ppx_thermal_zone_temperature_celsius",
                                  "Temperature of each kernel thermal zone.", labels=["zone", "type"])
        for zone, kind, celsius in self.thermal_zones():
            temps.add_metric([zone, kind], celsius)
        if temps.samples:
            yield temps
        load = self.gpu_load()
        if load is not None:
            yield GaugeMetricFamily("ppx_gpu_load_ratio", "Integrated GPU busy fraction (0..1).",
                                    value=load)
        memory = self.unified_memory() if load is not None or self.is_tegra() else None
        if memory is not None:
            total, available = memory
            yield GaugeMetricFamily("ppx_gpu_memory_total_bytes",
                                    "Unified memory shared by CPU and GPU (MemTotal).", value=total)
            yield GaugeMetricFamily("ppx_gpu_memory_available_bytes",
                                    "Unified memory available to new allocations (MemAvailable).",
                                    value=available)

    def thermal_zones(self) -> list[tuple[str, str, float]]:
        out = []
        base = self.root / "sys/devices/virtual/thermal"
        for zone in sorted(base.glob("thermal_zone*"), key=lambda p: _zone_index(p.name)):
            kind = _read(zone / "type")
            raw = _read(zone / "temp")
            if kind is None or raw is None:
                continue
            try:
                celsius = int(raw) / 1000.0
            except ValueError:
                continue
            if celsius <= -40.0:  # Jetson reports -256 C for a powered-down sensor
                continue
            out.append((zone.name, kind, celsius))
        return out

    def gpu_load(self) -> float | None:
        candidates = [self.root / p for p in self.GPU_LOAD_FILES]
        for pattern in self.GPU_LOAD_GLOBS:
            candidates += sorted(self.root.glob(pattern))
        for path in candidates:
            raw = _read(path)
            if raw is not None:
                try:
                    return min(max(int(raw) / 1000.0, 0.0), 1.0)  # the file counts per mille
                except ValueError:
                    continue
        return None

    def is_tegra(self) -> bool:
        compatible = _read(self.root / "proc/device-tree/compatible", binary=True)
        return compatible is not None and "nvidia,tegra" in compatible

    def unified_memory(self) -> tuple[float, float] | None:
        text = _read(self.root / "proc/meminfo")
        if text is None:
            return None
        fields = {}
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        if "MemTotal" not in fields or "MemAvailable" not in fields:
            return None
        return float(fields["MemTotal"]), float(fields["MemAvailable"])


def _zone_index(name: str) -> int:
    digits = name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def _read(path: Path, binary: bool = False) -> str | None:
    try:
        if binary:
            return path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
