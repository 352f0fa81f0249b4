"""`ppx-runtime check` on a tiny build, with ALSA's `null` PCM and a device that does not exist."""

from __future__ import annotations

import grp
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_realtime import run_limited

from personaplex_edge.runtime.audio.realtime import probe_realtime
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.service.check import check, check_engines, main

# Where this process cannot run real-time threads, `check` prints a warning line first.
RT_WARNINGS = 0 if probe_realtime(AudioSettings().rt_priority) is None else 1


def _config(tmp_path: Path, build: Path, audio: str = "", persona: str = "", extra: str = "") -> Path:
    path = tmp_path / "runtime.yaml"
    given = {line.split(":")[0].strip() for line in audio.splitlines() if ":" in line}
    devices = "".join(f'  {key}: "null"\n' for key in ("capture_device", "playback_device")
                      if key not in given)  # a key twice is an error of its own
    path.write_text(f"""
build:
  path: {build}
  backend: ort-cpu
audio:
{devices}{audio}
persona:
  default: copilot
{persona}
snapshots:
  dir: {tmp_path / "snapshots"}
control:
  socket: {tmp_path / "control.sock"}
  group: {grp.getgrgid(os.getgid()).gr_name}
{extra}
""")
    return path


def test_clean_config_has_no_problems(tiny_build: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_build, audio="  capture_rate: 24000\n  channels: 2")
    assert check(config) == []
    out = io.StringIO()
    assert main(config, out) == 0
    line = out.getvalue().splitlines()[-1]
    assert line.startswith(f"ok: {config}: capture 'null' and playback 'null' open; build ")
    assert "personas copilot" in line and out.getvalue().count("\n") == 1 + RT_WARNINGS


def test_missing_audio_device_is_one_line_naming_the_field(tiny_build: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_build, audio='  playback_device: "ppx_no_such_pcm"')
    problems = check(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith("audio.playback_device: cannot open 'ppx_no_such_pcm' for playback "
                                  "at 48000 Hz, 1 channel: ")
    assert "(ALSA: Unknown PCM ppx_no_such_pcm)" in problems[0]


def test_config_error_is_the_only_problem(tiny_build: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_build, extra="metrics:\n  host: 0.0.0.0\n")
    problems = check(config)
    assert len(problems) == 1
    assert problems[0].startswith(f"{config}:") and "metrics.host: 0.0.0.0 is not a loopback" in problems[0]
    assert check(tmp_path / "absent.yaml") == [f"{tmp_path / 'absent.yaml'}: file not found"]


def test_modified_build_file_and_missing_build(tiny_build: Path, tmp_path: Path) -> None:
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    tokenizer = build / "tokenizer.model"
    data = tokenizer.read_bytes()
    tokenizer.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    problems = check(_config(tmp_path, build))
    assert problems == [f"build.path: {tokenizer}: sha256 differs from the manifest (modified or corrupt): re-export or copy the build again"]
    problems = check(_config(tmp_path, tmp_path / "nowhere"))
    assert len(problems) == 1 and problems[0].startswith(f"build.path: {tmp_path / 'nowhere'}/manifest.json")


def test_personas_are_loaded_and_their_voices_checked(tiny_build: Path, tmp_path: Path) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "night.yaml").write_text("name: night\nvoice: NATF2\nprompt: Speak softly.\n")
    (personas / "alien.yaml").write_text("name: alien\nvoice: NATM9\nprompt: Beep.\n")
    (personas / "twin.yaml").write_text("name: night\nvoice: NATF2\nprompt: Again.\n")
    (personas / "typo.yaml").write_text("name: typo\nvoice: NATF2\nprompt: x\nsampling:\n  top_k: 5\n")
    (personas / "notes.txt").write_text("not a persona")
    config = _config(tmp_path, tiny_build,
                     persona=f"  persona_dirs: [{personas}, {tmp_path / 'gone'}]")
    problems = check(config)
    assert sorted(problems) == sorted([
        f"{personas / 'alien.yaml'}: voice: 'NATM9' is not a voice of the build {tiny_build} "
        "(build voices: NATF2)",
        f"{personas / 'twin.yaml'}: name: 'night' is also the name of {personas / 'night.yaml'}",
        f"{personas / 'typo.yaml'}:5: sampling.top_k: unknown field (known: audio_temperature, "
        "audio_top_k, greedy, seed, text_temperature, text_top_k)",
        f"persona.persona_dirs: {tmp_path / 'gone'}: not a directory",
    ])
    (personas / "alien.yaml").unlink()
    (personas / "twin.yaml").unlink()
    (personas / "typo.yaml").unlink()
    config = _config(tmp_path, tiny_build, persona=f"  persona_dirs: [{personas}]")
    config.write_text(config.read_text().replace("default: copilot", "default: nobody"))
    problems = check(config)
    assert len(problems) == 1
    assert problems[0].startswith("persona.default: persona 'nobody': not found (known: ")
    assert "night" in problems[0]


def test_backend_and_control_group_against_this_machine(tiny_build: Path, tmp_path: Path) -> None:
    import onnxruntime

    config = _config(tmp_path, tiny_build)
    config.write_text(config.read_text().replace("backend: ort-cpu", "backend: ort-cuda")
                      .replace(f"group: {grp.getgrgid(os.getgid()).gr_name}", "group: ppx-no-such-group"))
    problems = check(config)
    assert "control.group: group 'ppx-no-such-group' does not exist" in problems[-1]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert problems[0].startswith("build.backend: ort-cuda: this onnxruntime has no "
                                      "CUDAExecutionProvider")
        assert len(problems) == 2
    else:
        assert len(problems) == 1


def test_engines_hook_is_empty_without_engines(tiny_build: Path) -> None:
    assert check_engines(load_manifest(tiny_build)) == []


def test_check_process_exit_status_and_clean_stderr(tiny_build: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_build, audio='  capture_device: "ppx_no_such_pcm"')
    code = ("import sys\nfrom personaplex_edge.runtime.service.check import main\n"
            f"sys.exit(main({str(config)!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    problems = proc.stdout.splitlines()[RT_WARNINGS:]
    assert len(problems) == 1 and problems[0].startswith("audio.capture_device: cannot open "
                                                         "'ppx_no_such_pcm'")
    assert proc.stderr == ""  # alsa-lib's own diagnostics are folded into the problem line


def test_real_time_unavailable_is_a_warning_line_not_a_problem(tiny_build: Path,
                                                               tmp_path: Path) -> None:
    """No rtprio limit, no CAP_SYS_NICE (a shell outside the unit): one warning line naming the
    setting, the limit and where to grant it; the exit status stays 0 (serve runs without)."""
    config = _config(tmp_path, tiny_build)
    code = ("import sys\nfrom personaplex_edge.runtime.service.check import main\n"
            f"sys.exit(main({str(config)!r}))\n")
    proc = run_limited(0, code, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning, ok = proc.stdout.splitlines()
    assert warning == ("warning: audio.rt_priority: 20: the audio threads would run at normal "
                       "priority: SCHED_FIFO 20 refused (Operation not permitted): RLIMIT_RTPRIO is 0 "
                       "and no CAP_SYS_NICE (LimitRTPRIO= in the unit, --ulimit rtprio= in Docker, "
                       "or rtprio in limits.conf)")
    assert ok.startswith(f"ok: {config}: ") and "real-time" not in ok
    assert proc.stderr == ""


def test_real_time_available_or_off_is_in_the_all_clear_line(tiny_build: Path,
                                                             tmp_path: Path) -> None:
    out = io.StringIO()
    assert main(_config(tmp_path, tiny_build, audio="  rt_priority: 0"), out) == 0
    assert out.getvalue().count("\n") == 1
    assert "; audio threads at normal priority (audio.rt_priority 0)" in out.getvalue()
    if RT_WARNINGS:
        pytest.skip("this process cannot run real-time threads")
    out = io.StringIO()
    assert main(_config(tmp_path, tiny_build), out) == 0
    assert "; audio threads real-time (SCHED_FIFO 20)" in out.getvalue()


@pytest.mark.parametrize("rate", [48000, 24000])
def test_null_device_opens_at_both_cabin_rates(tiny_build: Path, tmp_path: Path, rate: int) -> None:
    audio = (f"  capture_rate: {rate}\n  playback_rate: {rate}\n  period_frames: {rate // 50}\n"
             "  playback_channels: 2")
    assert check(_config(tmp_path, tiny_build, audio=audio)) == []


def test_voice_activity_without_onnxruntime_on_a_tensorrt_config(tiny_build: Path, tmp_path: Path) -> None:
    """Was: `check` on a TensorRT config passed the voice activity detector by, though it runs on
    ONNX Runtime whatever the backend: a daemon installed without the `vad` extra could not start
    and `check` did not say so."""
    from support import import_guard

    config = _config(tmp_path, tiny_build)
    config.write_text(config.read_text().replace("backend: ort-cpu", "backend: tensorrt"))
    code = (import_guard(("onnxruntime",)) +
            "from personaplex_edge.runtime.service.check import check\n"
            f"print('\\n'.join(check({str(config)!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vad = [line for line in proc.stdout.splitlines() if line.startswith("voice activity:")]
    assert vad == ["voice activity: onnxruntime is not installed; the ort-* backends and the driver's "
                   "voice activity detector needs it: pip install 'personaplex-edge[onnx]' (a "
                   "TensorRT install: 'personaplex-edge[vad]'; on a Jetson, NVIDIA's onnxruntime-gpu "
                   "wheel for this JetPack)"]
    # With it installed, the all-clear line names the detector.
    out = io.StringIO()
    assert main(_config(tmp_path, tiny_build), out) == 0
    assert "voice activity Silero VAD (onnxruntime " in out.getvalue()


def test_network_endpoint_is_checked(tiny_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("websockets")
    pytest.importorskip("av")
    config = _config(tmp_path, tiny_build, extra="network: {enabled: true, port: 9000}")
    out = io.StringIO()
    assert main(config, out) == 0
    assert "network endpoint ws://127.0.0.1:9000/api/chat (when-cabin-idle)" in out.getvalue()
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    config = _config(tmp_path, tiny_build, extra=(
        f"network: {{enabled: true, tls_cert: {tmp_path / 'cert.pem'}, "
        f"tls_key: {tmp_path / 'key.pem'}}}"))
    problems = check(config)
    assert len(problems) == 1 and problems[0].startswith("network.tls_cert/tls_key: "), problems
