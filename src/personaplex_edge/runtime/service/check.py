"""`ppx-runtime check`: is this device ready to run the daemon with this config?

Validates the config, opens the capture and playback ALSA devices briefly at
the configured rate and channels, checks that the configured echo cancellation
can run (webrtc: its library, named with its version in the all-clear line),
verifies the build's files against its manifest, checks the backend (and
engines, where the build has them) against this device, and loads every persona
(the default and everything in persona_dirs), checking that its voice exists in
the build. Each problem is one line; the exit status is 0 when there are none,
else 1. A warning (real-time scheduling unavailable for audio.rt_priority: the
daemon runs without it) is one line too, and leaves the status alone.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from personaplex_edge.runtime.audio.echo_path import webrtc_library
from personaplex_edge.runtime.audio.headroom import probe_buffer
from personaplex_edge.runtime.audio.realtime import probe_realtime
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from personaplex_edge.runtime.core.persona import Persona
from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.service.config import (
    BuildConfig,
    DaemonConfig,
    PersonaConfig,
    load_config,
)
from personaplex_edge.runtime.service.persona_catalog import read_persona_file, resolve
from personaplex_edge.runtime.update.slots import Slots


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was checked, for the all-clear line
    warnings: list[str] = field(default_factory=list)  # the daemon runs, less well


def check(config_path: Path) -> list[str]:
    """Every problem found with `config_path` and this device, one line each ([] when ready)."""
    return run_checks(config_path).problems


def run_checks(config_path: Path) -> CheckReport:
    report = CheckReport()
    try:
        cfg = load_config(Path(config_path))
    except ConfigError as exc:
        report.problems.append(str(exc))
        return report  # nothing else can be trusted
    report.problems += check_audio(cfg.audio)
    if not report.problems:
        report.notes.append(f"capture {cfg.audio.capture_device!r} and playback "
                            f"{cfg.audio.playback_device!r} open")
    report.warnings, rt_note = check_realtime(cfg.audio)
    echo_problems, echo_note = check_echo(cfg.audio)
    report.problems += echo_problems
    vad_problems, vad_note = check_voice_activity(cfg.build)
    report.problems += vad_problems
    build, slot_problems = running_build(cfg)
    report.problems += slot_problems
    manifest, build_problems = check_build(build)
    report.problems += build_problems
    if manifest is not None:
        report.notes.append(f"build {build.path} verified ({len(manifest.files)} files)")
        report.problems += check_backend(build, manifest)
        report.problems += check_engines(manifest)
    personas, persona_problems = check_personas(cfg.persona, manifest)
    report.problems += persona_problems
    if personas:
        report.notes.append(f"personas {', '.join(p.name for p in personas)}")
    report.problems += check_paths(cfg)
    # The model runs only on a build and personas that check out; else the wake-up probe alone.
    headroom_problems, headroom_note = check_headroom(
        cfg, build, None if report.problems else manifest, personas)
    report.problems += headroom_problems
    report.notes.append(headroom_note)
    network_problems, network_note = check_network(cfg)
    report.problems += network_problems
    if network_note:
        report.notes.append(network_note)
    if echo_note:
        report.notes.append(echo_note)
    if vad_note:
        report.notes.append(vad_note)
    if rt_note:
        report.notes.append(rt_note)
    return report


def main(config_path: Path, out: TextIO | None = None) -> int:
    """Print one line per problem and return 1, or an all-clear line and return 0."""
    out = out or sys.stdout
    report = run_checks(config_path)
    for warning in report.warnings:
        print(f"warning: {warning}", file=out)
    for problem in report.problems:
        print(problem, file=out)
    if report.problems:
        return 1
    print(f"ok: {config_path}: " + "; ".join(report.notes), file=out)
    return 0


# -- audio ------------------------------------------------------------------------------

def check_audio(audio: AudioSettings) -> list[str]:
    try:
        import alsaaudio  # the device extra; only here, so `check` of the rest runs anywhere
    except ImportError:
        return ["audio: pyalsaaudio is not installed (pip install 'personaplex-edge[device]')"]
    problems = []
    for direction, key, device, rate, channels in (
            ("capture", "capture_device", audio.capture_device, audio.capture_rate, audio.channels),
            ("playback", "playback_device", audio.playback_device, audio.playback_rate,
             audio.out_channels)):
        problem = probe_pcm(alsaaudio, direction, device, rate, channels, audio.period_frames,
                            audio.buffer_periods)
        if problem:
            problems.append(f"audio.{key}: {problem}")
    return problems


def check_echo(audio: AudioSettings) -> tuple[list[str], str]:
    """The echo cancellation serve would run (a note), or why it cannot (a problem line)."""
    if audio.echo_cancel == "external":
        return [], "echo cancellation external (the car's DSP or the speakerphone cancels)"
    if audio.echo_cancel == "off":
        return [], "echo cancellation off"
    try:
        library = webrtc_library()
    except ConfigError as exc:  # serve refuses to start (exit 78) with this same line
        return [str(exc)], ""
    return [], f"echo cancellation webrtc ({library})"


def check_voice_activity(build: BuildConfig) -> tuple[list[str], str]:
    """The driver's voice activity detector (Silero VAD on ONNX Runtime's CPU provider) loads:
    it runs whatever the backend, so a TensorRT install needs onnxruntime too (the `vad` extra).
    On an ort-* backend a missing onnxruntime is check_backend's line already."""
    from personaplex_edge.runtime.audio.vad import SileroVad
    from personaplex_edge.runtime.extras import missing_extra

    try:
        SileroVad()
    except ModuleNotFoundError as exc:
        line = missing_extra(exc)
        if line is None:
            raise
        return ([] if build.backend.startswith("ort-") else [f"voice activity: {line}"]), ""
    import onnxruntime

    return [], f"voice activity Silero VAD (onnxruntime {onnxruntime.__version__})"


def check_realtime(audio: AudioSettings) -> tuple[list[str], str]:
    """Can this process's audio threads run SCHED_FIFO at rt_priority (a note), or why not (a
    warning: serve runs them at normal priority). Tried for real, in a short-lived thread."""
    prio = audio.rt_priority
    if prio == 0:
        return [], "audio threads at normal priority (audio.rt_priority 0)"
    why = probe_realtime(prio)
    if why is None:
        return [], f"audio threads real-time (SCHED_FIFO {prio})"
    return [f"audio.rt_priority: {prio}: the audio threads would run at normal priority: {why}"], ""


def probe_pcm(alsaaudio, direction: str, device: str, rate: int, channels: int, period_frames: int,
              buffer_periods: int) -> str | None:
    """Open `device` briefly as the daemon would; the problem, or None when it opens as asked."""
    kind = alsaaudio.PCM_CAPTURE if direction == "capture" else alsaaudio.PCM_PLAYBACK
    asked = f"{rate} Hz, {channels} channel{'s' if channels > 1 else ''}"
    with _alsa_stderr() as alsa_said:
        try:
            # Non-blocking open: a device held by a running daemon answers "busy" at once
            # instead of blocking until it is released.
            pcm = alsaaudio.PCM(kind, alsaaudio.PCM_NONBLOCK, device=device, channels=channels,
                                rate=rate, format=alsaaudio.PCM_FORMAT_S16_LE,
                                periodsize=period_frames, periods=buffer_periods)
        except alsaaudio.ALSAAudioError as exc:
            pcm, error = None, str(exc)
    if pcm is None:
        detail = alsa_said()
        hint = " (in use: is ppx-runtime serve running?)" if "busy" in error.lower() else ""
        return (f"cannot open {device!r} for {direction} at {asked}: {error}{hint}"
                + (f" (ALSA: {detail})" if detail else ""))
    try:
        info = pcm.info()
    finally:
        pcm.close()
    got_rate, got_channels = info.get("rate"), info.get("channels")
    if got_rate != rate or got_channels != channels:
        return (f"{device!r} opens for {direction} at {got_rate} Hz, {got_channels} channel(s), not "
                f"{asked} (use a plug device, e.g. plughw:CARD=..., or change the config)")
    return None


@contextlib.contextmanager
def _alsa_stderr() -> Iterator:
    """alsa-lib prints its diagnostics on fd 2; capture them for the problem line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: captured[-1] if captured else ""
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = [ln.strip() for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip()]
            # "ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM x" -> "Unknown PCM x"
            captured += [ln.split(") ", 1)[-1] for ln in lines]


# -- build, backend, engines ----------------------------------------------------------------

def running_build(cfg: DaemonConfig) -> tuple[BuildConfig, list[str]]:
    """build.path, or the update slot the daemon runs instead (update.slots_dir)."""
    slots = Slots(cfg.update.slots_dir)
    if not slots.state_path.exists():
        return cfg.build, []
    try:
        slot = slots.wanted()
    except PpxError as exc:
        return cfg.build, [str(exc)]
    return (cfg.build if slot is None else replace(cfg.build, path=slots.path(slot))), []


def check_build(build: BuildConfig) -> tuple[Manifest | None, list[str]]:
    """The manifest with its files verified (else None), and the problems found."""
    try:
        manifest = load_manifest(build.path)
    except PpxError as exc:
        return None, [f"build.path: {exc}"]
    try:
        manifest.verify_files()
    except PpxError as exc:
        return manifest, [f"build.path: {exc}"]  # still good enough to check personas against
    return manifest, []


def check_backend(build: BuildConfig, manifest: Manifest) -> list[str]:
    """Can this device run `build.backend`?"""
    if build.backend.startswith("ort-"):
        try:
            import onnxruntime
        except ImportError:
            return [f"build.backend: {build.backend}: onnxruntime is not installed "
                    "(pip install 'personaplex-edge[onnx]', or NVIDIA's onnxruntime-gpu wheel)"]
        from personaplex_edge.runtime.backends.ort import PROVIDERS

        wanted = PROVIDERS[build.backend[4:]][0]
        have = onnxruntime.get_available_providers()
        if wanted not in have:
            return [f"build.backend: {build.backend}: this onnxruntime has no {wanted} (it has "
                    f"{', '.join(have)}); install NVIDIA's onnxruntime-gpu wheel for this JetPack "
                    "or choose another backend"]
        return []
    problems = []
    if importlib.util.find_spec("tensorrt") is None:
        problems.append(f"build.backend: {build.backend}: the tensorrt Python package is not "
                        "installed (JetPack's python3-libnvinfer)")
    if importlib.util.find_spec("personaplex_edge.runtime.backends.tensorrt") is None:
        problems.append(f"build.backend: {build.backend}: this runtime has no TensorRT backend")
    if "engines" not in manifest.data:
        problems.append(f"build.backend: {build.backend}: {manifest.root / MANIFEST_NAME} lists no "
                        "engines (build them on this device first)")
    return problems


def check_engines(manifest: Manifest) -> list[str]:
    """Problems with the build's TensorRT engines on this device (GPU model and compute
    capability, TensorRT version); [] for an ONNX build. File hashes are already verified."""
    if "engines" not in manifest.data:
        return []
    from personaplex_edge.runtime.backends.tensorrt.device import query_device
    from personaplex_edge.runtime.core.engine_manifest import check_engines as engine_problems

    return engine_problems(manifest, query=query_device, hash_files=False)


# -- headroom ---------------------------------------------------------------------------

def check_headroom(cfg: DaemonConfig, build: BuildConfig, manifest: Manifest | None,
                   personas: list[Persona]) -> tuple[list[str], str]:
    """Can the period, buffer depth and pre-roll hold the jitter measured here, as serve
    refuses them? With `audio.preroll_ms` fixed, the build runs serve's warm-up frames on the
    default persona (snapshots in a scratch directory); else the wake-up probe runs alone."""
    audio = cfg.audio
    if audio.preroll_ms is None or manifest is None or not personas:
        wakeups, problem = probe_buffer(audio)
        return ([problem] if problem else []), (
            f"audio threads woke up to {wakeups.late_ms:.1f} ms late with no model beside them "
            "(the buffer holds it; serve measures again beside its warm-up)")
    from personaplex_edge.runtime.backends.registry import make_backend
    from personaplex_edge.runtime.core.conversation import Conversation
    from personaplex_edge.runtime.core.session import Session
    from personaplex_edge.runtime.service.warmup import measure

    with tempfile.TemporaryDirectory(prefix="ppx-check-") as scratch:
        try:
            session = Session(manifest, make_backend(build.backend, build.threads), Path(scratch))
            conversation = Conversation(session)
            conversation.switch_persona(personas[0])
            warm = measure(conversation, audio)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory beside a running serve
            return [f"build: cannot time the frame loop here: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"], ""
    assert warm is not None
    return warm.problems(audio), (f"frame loop p50 {warm.p50_ms:.1f} ms, p99 {warm.p99_ms:.1f} ms "
                                  f"(audio.preroll_ms {audio.preroll_ms:g} holds it); audio "
                                  f"threads woke up to {warm.wakeups.late_ms:.1f} ms late beside "
                                  "it (the buffer holds it)")


# -- personas ---------------------------------------------------------------------------

def check_personas(cfg: PersonaConfig, manifest: Manifest | None) -> tuple[list[Persona], list[str]]:
    """Load the default persona and every YAML in persona_dirs; check voices against the build."""
    k_max = int(manifest.data.get("sampling", {}).get("k_max", 250)) if manifest else 250
    personas: list[Persona] = []
    problems: list[str] = []
    try:
        personas.append(resolve(cfg, cfg.default, k_max))  # the daemon's lookup: same answer
    except ConfigError as exc:
        problems.append(f"persona.default: {exc}")
    seen: dict[str, str] = {}
    for d in cfg.persona_dirs:
        if not d.is_dir():
            problems.append(f"persona.persona_dirs: {d}: not a directory")
            continue
        for path in sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
            try:
                persona = read_persona_file(path, k_max)  # not UTF-8: a problem, not a crash
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if persona.name in seen:
                problems.append(f"{path}: name: {persona.name!r} is also the name of {seen[persona.name]}")
                continue
            seen[persona.name] = str(path)
            if all(p.source != persona.source for p in personas):
                personas.append(persona)
    if manifest is not None:
        voices = manifest.data.get("voices", {})
        for persona in personas:
            if not persona.voice_is_file and persona.voice not in voices:
                problems.append(f"{persona.source}: voice: {persona.voice!r} is not a voice of the build "
                                f"{manifest.root} (build voices: {', '.join(voices) or 'none'})")
    return personas, problems


# -- paths and permissions ------------------------------------------------------------------

def check_paths(cfg: DaemonConfig) -> list[str]:
    problems = []
    snap = cfg.snapshots.dir
    if snap.exists() and not snap.is_dir():
        problems.append(f"snapshots.dir: {snap} exists and is not a directory")
    if cfg.control.group is not None:
        try:
            grp.getgrnam(cfg.control.group)
        except KeyError:
            problems.append(f"control.group: group {cfg.control.group!r} does not exist (the package's "
                            "sysusers.d entry creates it; or set control.group)")
    sock = cfg.control.socket
    if sock.exists() and not sock.is_socket():
        problems.append(f"control.socket: {sock} exists and is not a socket")
    return problems


def check_network(cfg: DaemonConfig) -> tuple[list[str], str]:
    """The network endpoint: its packages, its certificate (the config checked the rest)."""
    n = cfg.network
    if not n.enabled:
        return [], ""
    problems = []
    for module, what in (("websockets", "the network endpoint"), ("av", "its Ogg/Opus audio")):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"network.enabled: {module} is not installed; {what} needs it: "
                            "pip install 'personaplex-edge[network]'")
    if n.tls_cert is not None and n.tls_key is not None:
        from personaplex_edge.runtime.network.access import tls_context

        try:
            tls_context(n.tls_cert, n.tls_key)
        except ConfigError as exc:
            problems.append(str(exc))
    scheme = "wss" if n.tls_cert else "ws"
    return problems, f"network endpoint {scheme}://{n.host}:{n.port}/api/chat ({n.policy})"
