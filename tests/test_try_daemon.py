"""`make try`: the daemon on the virtual cabin devices, and ctl against it from outside, as the
docs tell a new user (before, they had to read tests/alsa_env.py and tests/serve_env.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf


def test_try_serves_on_virtual_devices_and_answers_ctl(tiny_build: Path, tmp_path: Path) -> None:
    work = tmp_path / "try"
    proc = subprocess.Popen([sys.executable, "-m", "personaplex_edge.sim.try_daemon", "--build",
                             str(tiny_build), "--dir", str(work), "--seconds", "25", "--minutes", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "the daemon is listening" in line:
                break
        assert any("the daemon is listening" in line for line in lines), "".join(lines)
        # The warm-up's rehearsal reads as one (was `re-anchor of 30 s of conversation: 56 ms`,
        # as if the conversation had been re-anchored before anyone spoke).
        assert any("warm-up: re-anchoring 30 s of conversation takes" in line for line in lines)
        assert not any("re-anchor of" in line for line in lines)
        listening_at = time.monotonic()
        config = work / "runtime.yaml"
        for args in (["status"], ["persona", "focus"]):
            said = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl",
                                   "--config", str(config), *args], capture_output=True, text=True,
                                  timeout=30)
            assert said.returncode == 0, said.stderr
            assert said.stdout.startswith(("listening: persona copilot, uptime ", "persona focus")), \
                said.stdout
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    wav = work / "speaker.wav"
    assert f"the agent's side: {wav}" in rest
    info = sf.info(str(wav))
    # The speaker ran in real time from start-up to the stop (the clocked devices pace it).
    assert info.samplerate == 48000 and info.channels == 1
    assert time.monotonic() - listening_at - 5 < info.duration < 40, info.duration


def test_try_without_a_build_says_so_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.sim.try_daemon", "--build",
                           str(tmp_path / "nothing"), "--dir", str(tmp_path / "try")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"try: {tmp_path / 'nothing'}: not a build (no manifest.json); "
                                   "`make demo` makes out/tiny-build")
