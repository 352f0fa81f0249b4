"""Issue 11, every bad input one line: the daemon survives a bad persona file, idle control
clients cannot lock `ctl` out, fatal lines carry a journal priority, a missing CUDA provider is
refused, and transcripts are one line per utterance. Real daemon, real sockets, real alsa-lib
virtual devices (personaplex_edge.sim.devices)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personaplex_edge.sim.daemon import NotifyListener, reap, serve_config, start_serve

ROOT = Path(__file__).parents[1]
CLI = [sys.executable, "-m", "personaplex_edge.runtime.cli"]

BROKEN = "# a typo in the name\nname: Road Trip!\nvoice: NATF2\nprompt: Be brief.\n"
LATIN1 = "name: café\nvoice: NATF2\nprompt: Be brief.\n".encode("latin-1")  # not UTF-8
CALM = "name: calm\nvoice: NATF2\nprompt: Speak calmly and briefly.\n"
NO_VOICE = "name: novoice\nvoice: NOPE\nprompt: Be brief.\n"  # parses; fails at compile


def _personas(dir: Path) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "broken.yaml").write_text(BROKEN)
    (dir / "latin1.yaml").write_bytes(LATIN1)
    (dir / "calm.yaml").write_text(CALM)
    (dir / "novoice.yaml").write_text(NO_VOICE)
    return dir


def _names_latin1(text: str, personas: Path) -> bool:
    """The error names the file (with or without a line) and says what is wrong with it."""
    return re.search(re.escape(str(personas / "latin1.yaml")) + r"(:\d+)?: .*UTF-8", text) is not None


def _config(tmp_path: Path, build: Path, *, persona: str = "default: copilot",
            backend: str = "ort-cpu", extra: str = "") -> Path:
    return serve_config(tmp_path, build, persona=persona, backend=backend, extra=extra,
                        control="max_clients: 2, idle_timeout_s: 3.0")


def _cabin(tmp_path: Path):
    pytest.importorskip("alsaaudio")
    from personaplex_edge.sim.devices import VirtualCabin
    from personaplex_edge.sim.shipped import speech

    return VirtualCabin.create(tmp_path / "alsa", mic_audio=speech(48000), mic_pad_s=30.0,
                               mic_rate=48000, mic_channels=2, spk_rate=48000, spk_channels=2)


def _ctl(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "ctl", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=30)


def _wait_ready(proc: subprocess.Popen, notify, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("READY=1" in m.splitlines() for _, m in notify.messages):
            return
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.communicate()[0]}")
        time.sleep(0.05)
    raise AssertionError(f"no READY=1 within {timeout} s")


# -- the daemon ------------------------------------------------------------------------------

def test_bad_persona_files_are_skipped_idle_clients_time_out_transcripts_are_lines(
        tiny_build: Path, tmp_path: Path) -> None:
    cabin = _cabin(tmp_path)
    personas = _personas(tmp_path / "personas")
    config = _config(tmp_path, tiny_build,
                     persona=f"default: copilot, persona_dirs: [{personas}]",
                     extra="logging: {level: info, transcripts: true}")
    notify = NotifyListener(tmp_path / "notify.sock")
    proc = start_serve(config, {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path)})
    try:
        _wait_ready(proc, notify, timeout=120)

        # The skipped files are counted, and switching to one names its file and field.
        metrics = _ctl(config, "metrics")
        assert re.search(r"^ppx_personas_skipped 3\.0$", metrics.stdout, re.M), metrics.stdout
        broken = _ctl(config, "persona", "broken")
        assert broken.returncode == 1
        assert f"{personas / 'broken.yaml'}:2: name: " in broken.stderr, broken.stderr
        latin1 = _ctl(config, "persona", "latin1")
        assert latin1.returncode == 1 and "internal error" not in latin1.stderr, latin1.stderr
        assert _names_latin1(latin1.stderr, personas), latin1.stderr
        # A persona skipped at start-up (a voice the build lacks): the switch is refused in the
        # reply, and the running conversation goes on (its age keeps growing: no restart).
        age = json.loads(_ctl(config, "--json", "status").stdout)["conversation_age_s"]
        novoice = _ctl(config, "persona", "novoice")
        assert novoice.returncode == 1 and "voice: 'NOPE'" in novoice.stderr, novoice.stderr
        time.sleep(0.5)
        after = json.loads(_ctl(config, "--json", "status").stdout)
        assert after["persona"] == "copilot" and after["conversation_age_s"] > age, (age, after)
        assert _ctl(config, "persona", "calm").returncode == 0  # the good file in the same dir

        # Two idle connections hold both slots, until the idle timeout (3 s) frees them.
        idle, opened = [], time.monotonic()
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(tmp_path / "control.sock"))
            idle.append(s)
        locked = _ctl(config, "status")
        assert time.monotonic() - opened < 3.0  # else the check below proves nothing
        assert locked.returncode == 1 and "too many clients" in locked.stderr, locked.stderr
        time.sleep(max(0.0, opened + 3.5 - time.monotonic()))
        status = _ctl(config, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert all(s.recv(10) == b"" for s in idle)
        for s in idle:
            s.close()

        time.sleep(4.0)  # some conversation for the transcript
        frames = int(re.search(r'"frames": (\d+)', _ctl(config, "--json", "status").stdout)[1])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    finally:
        output = reap(proc, notify)
    assert rc == 0, output
    lines = output.splitlines()
    assert "Traceback" not in output
    skipped = [line for line in lines if "persona file skipped" in line]
    assert len(skipped) == 3 and all(line.startswith("<3>") for line in skipped), skipped
    assert any(re.search(r"novoice\.yaml(:\d+)?: voice: 'NOPE'", line) for line in skipped)
    assert any("broken.yaml:2: name:" in line for line in skipped)
    assert any(_names_latin1(line, personas) for line in skipped)

    said = [line for line in lines if "personaplex.transcript:" in line]
    assert said, output  # random weights talk all the time
    assert len(said) <= max(2, frames // 8), (len(said), frames, said[:5])
    assert not any("<s>" in line or "</s>" in line for line in said), said
    assert all(line.split("personaplex.transcript: ", 1)[1].strip() for line in said)


def test_a_bad_default_persona_is_a_config_error(tiny_build: Path, tmp_path: Path) -> None:
    personas = _personas(tmp_path / "personas")
    for default in (f"default: broken, persona_dirs: [{personas}]",
                    f"default: {personas / 'latin1.yaml'}"):
        config = _config(tmp_path, tiny_build, persona=default)
        proc = subprocess.run([*CLI, "serve", "--config", str(config)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 78, (default, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("ppx-runtime: error: "), proc.stderr
        assert "broken.yaml:2: name:" in proc.stderr or _names_latin1(proc.stderr, personas)


def test_fatal_line_has_an_error_priority_when_stderr_is_the_journal(tmp_path: Path) -> None:
    config = tmp_path / "runtime.yaml"
    config.write_text("audio:\n  capture_rate: 44100\n")
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    # What systemd does: $JOURNAL_STREAM names the device and inode of the journal stream.
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    try:
        proc = subprocess.run([*CLI, "serve", "--config", str(config)], stderr=write_end,
                              stdout=subprocess.DEVNULL, env=env, timeout=60)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            err = f.read()
    finally:
        for fd in (read_end, write_end):
            try:
                os.close(fd)
            except OSError:
                pass
    assert proc.returncode == 78
    assert err.startswith("<3>ppx-runtime: error: ") and err.count("\n") == 1, err
    assert "runtime.yaml:2: audio.capture_rate" in err
    # Not the journal (a terminal, a pipe, a file): no prefix.
    plain = subprocess.run([*CLI, "serve", "--config", str(config)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "JOURNAL_STREAM": "1:2"})
    assert plain.stderr.startswith("ppx-runtime: error: "), plain.stderr


@pytest.mark.parametrize("backend, provider", [("ort-cuda", "CUDAExecutionProvider"),
                                               ("ort-tensorrt", "TensorrtExecutionProvider")])
def test_serve_refuses_a_gpu_backend_whose_provider_is_missing(tiny_build: Path, tmp_path: Path,
                                                               backend: str, provider: str) -> None:
    import onnxruntime

    if provider in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    cabin = _cabin(tmp_path)
    config = _config(tmp_path, tiny_build, backend=backend)
    proc = subprocess.run([*CLI, "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **cabin.env})
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("ppx-runtime: error: ") and provider in proc.stderr
    assert backend in proc.stderr


@pytest.mark.filterwarnings("ignore:Specified provider")  # the fallback under test
def test_ort_network_refuses_a_silent_cpu_fallback(tiny_build: Path) -> None:
    import onnxruntime

    from personaplex_edge.runtime.backends.base import graphs_of
    from personaplex_edge.runtime.backends.ort import OrtNetwork
    from personaplex_edge.runtime.core.manifest import load_manifest
    from personaplex_edge.runtime.errors import PpxError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    manifest = load_manifest(tiny_build)
    with pytest.raises(PpxError, match="CUDAExecutionProvider"):
        OrtNetwork("mimi_decoder", graphs_of(manifest, "mimi_decoder"), manifest,
                   ["CUDAExecutionProvider", "CPUExecutionProvider"], threads=1)


# -- transcripts -------------------------------------------------------------------------------

def _feed(lines, pieces: list[str]) -> list[str]:
    return [line for piece in pieces if (line := lines.add(piece)) is not None]


def test_transcript_is_one_line_per_utterance() -> None:
    from personaplex_edge.runtime.service.transcript import TranscriptLines

    lines = TranscriptLines(quiet_frames=3, max_chars=200)
    hello = [" Hello", "", " there", ",", "", "", " how", " are", " you", "?"]
    out = _feed(lines, [*hello, "", "", "", "", " Fine", "."])
    assert out == ["Hello there, how are you?"]  # the pause ended the first utterance
    assert lines.flush() == "Fine."
    assert lines.flush() is None


def test_transcript_lines_are_capped_at_a_word_boundary() -> None:
    from personaplex_edge.runtime.service.transcript import TranscriptLines

    lines = TranscriptLines(quiet_frames=12, max_chars=20)
    out = _feed(lines, [" one", " two", " three", " four", "teen", " five", " six"])
    assert out == ["one two three fourteen"]  # cut where a word starts: "fourteen" stays whole
    assert lines.flush() == "five six"
    runaway = _feed(lines, ["x"] * 100)  # no word boundary at all: cut hard
    assert runaway and all(len(line) <= 40 for line in runaway)


def test_session_piece_drops_control_tokens(tiny_build: Path, tmp_path: Path) -> None:
    from personaplex_edge.runtime.backends.ort import OrtBackend
    from personaplex_edge.runtime.core.manifest import load_manifest
    from personaplex_edge.runtime.core.session import Session

    session = Session(load_manifest(tiny_build), OrtBackend(threads=1), tmp_path / "snaps")
    tok = session.tokenizer
    for token in (tok.bos_id(), tok.eos_id(), tok.unk_id()):
        assert session.piece(token) == "", token
    word = tok.piece_to_id("\u2581the") if tok.piece_to_id("\u2581the") != tok.unk_id() else 10
    assert session.piece(word) != ""


# -- the unit file -----------------------------------------------------------------------------

def test_unit_comment_matches_how_inference_waits_for_the_gpu() -> None:
    unit = (ROOT / "systemd" / "personaplex-edge.service").read_text()
    cuda = (ROOT / "src" / "personaplex_edge" / "runtime" / "backends" / "tensorrt" / "cuda.py").read_text()
    assert "cudaDeviceScheduleBlockingSync" in cuda  # the backend sleeps while the GPU works
    comments = " ".join(line.lstrip("# ") for line in unit.splitlines() if line.startswith("#"))
    assert "spins on CUDA" not in comments
    assert "blocking sync" in comments.lower()


def test_check_reports_every_bad_persona_file_in_one_line_each(tmp_path: Path) -> None:
    from personaplex_edge.runtime.service.check import check_personas
    from personaplex_edge.runtime.service.config import PersonaConfig

    personas = _personas(tmp_path / "personas")
    loaded, problems = check_personas(PersonaConfig("copilot", (personas,)), None)
    assert {p.name for p in loaded} == {"copilot", "calm", "novoice"}  # no build: voices unchecked
    assert len(problems) == 2 and all("\n" not in p for p in problems), problems
    assert any(p.startswith(f"{personas / 'broken.yaml'}:2: name: ") for p in problems)
    assert any(_names_latin1(p, personas) for p in problems)


@pytest.mark.parametrize("setting, field, smallest", [
    ("preroll_ms: 0", "audio.preroll_ms: 0 ms cannot hold the frame loop's measured jitter",
     r"the smallest that works is (\d+), or auto \(follows the jitter live\)$"),
    # (On a machine so loaded that no depth up to 32 would hold its wake-ups, the period is named.)
    ("period_frames: 32, buffer_periods: 2", "audio.",
     r"audio\.(?:buffer_periods: 2 periods of 0\.67 ms|period_frames: 32 x 2 periods) leave .*"
     r"the smallest that works is (\d+)$")])
def test_a_buffer_or_preroll_that_cannot_hold_the_measured_jitter_is_refused(
        tiny_build: Path, tmp_path: Path, setting: str, field: str, smallest: str) -> None:
    """A fixed pre-roll below the warm-up's p99 - p50, or ALSA buffers that leave the audio
    threads less time than they were measured to need to wake (GIL included, the model running
    beside them), would underrun all drive long: `check` and `serve` refuse them in one line
    naming the field and the smallest value that works; serve exits 78 (no restart loop)."""
    cabin = _cabin(tmp_path)
    config = _config(tmp_path, tiny_build)
    text = config.read_text()
    config.write_text(text.replace("period_frames: 960, buffer_periods: 4", setting)
                      if "period_frames" in setting
                      else text.replace("clockless: true}", f"clockless: true, {setting}}}"))
    env = {**os.environ, **cabin.env}
    checked = subprocess.run([*CLI, "check", "--config", str(config)], capture_output=True,
                             text=True, timeout=120, env=env)
    served = subprocess.run([*CLI, "serve", "--config", str(config)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    said = [line for line in checked.stdout.splitlines()
            if line.startswith(field) and re.search(smallest, line)]
    assert len(said) == 1, checked.stdout
    assert served.returncode == 78, served.stderr[-3000:]
    last = served.stderr.strip().splitlines()[-1]
    assert "Traceback" not in served.stderr
    assert last.startswith(f"ppx-runtime: error: {field}") and re.search(smallest, last), last
    # More than what was refused (a buffer needs 1 ms of work past the wake-up: 3 periods at least).
    assert int(re.search(smallest, last).group(1)) >= (1 if "preroll" in setting else 3)


