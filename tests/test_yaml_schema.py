"""The YAML loader every persona, config and target profile goes through: bad bytes, alias
bombs, duplicate keys and YAML 1.2 numbers give one `file:line:` line (issue 11)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from personaplex_edge.runtime.core.persona import parse_persona
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.service.config import load_config

# The classic "billion laughs": 342 bytes that expand to 9**9 strings when walked.
BOMB = "".join(
    [f'a: &a [{", ".join(["lol"] * 9)}]\n']
    + [f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi", strict=True)])
PERSONA = "name: x\nvoice: NATF2\nprompt: hi\n"


def _message(path: Path, loader=parse_persona) -> str:
    with pytest.raises(ConfigError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_non_utf8_file_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b'name: x\nvoice: NATF2\nprompt: "Av\xe9"\n')
    message = _message(path)
    assert message.startswith(f"{path}:3: not UTF-8 text: byte 0xe9 at offset 32"), message
    config = tmp_path / "runtime.yaml"
    config.write_bytes(b"logging:\n  level: \xff\xfe\n")
    assert _message(config, load_config).startswith(f"{config}:2: not UTF-8 text: byte 0xff at offset 18")


def test_aliases_and_anchors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PERSONA + "description: &d x\nsampling: {seed: 1}\n")
    assert _message(path).startswith(f"{path}:4: YAML anchors and aliases are not allowed")
    path.write_text("x: 1\n" + "y: *nothing\n")
    assert _message(path).startswith(f"{path}:2: YAML anchors and aliases are not allowed")


@pytest.mark.parametrize("name, args, rc", [
    ("persona", ["play", "{input}", "--build", "{build}", "--out", "{dir}/o.wav", "--persona", "{file}",
                 "--snapshot-dir", "{dir}/snaps"], 78),
    ("config", ["serve", "--config", "{file}"], 78),
    ("config", ["check", "--config", "{file}"], 1),  # check lists problems on stdout, exit 1
])
def test_alias_bomb_is_refused_quickly(tiny_build: Path, tmp_path: Path, name: str, args: list[str],
                                       rc: int) -> None:
    bomb = tmp_path / f"{name}.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500
    speech = Path(__file__).parent / "data" / "speech_24k.wav"
    argv = [a.format(input=speech, build=tiny_build, dir=tmp_path, file=bomb) for a in args]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", *argv],
                          capture_output=True, text=True, timeout=15)
    elapsed = time.monotonic() - t0
    assert proc.returncode == rc, proc.stderr
    line = f"{bomb}:1: YAML anchors and aliases are not allowed (this file needs neither)"
    out = proc.stderr if rc == 78 else proc.stdout
    assert line in out and "Traceback" not in proc.stderr, out
    assert elapsed < 10  # interpreter start-up included; the refusal itself is immediate


def test_alias_bomb_is_refused_by_the_loader_within_2_s(tmp_path: Path) -> None:
    """The loader alone, timed inside a child process (a hang is killed by the timeout)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    child = ("import sys, time\n"
             "from personaplex_edge.runtime.errors import ConfigError\n"
             "from personaplex_edge.runtime.yaml_schema import load_yaml_with_lines\n"
             "t0 = time.perf_counter()\n"
             "try:\n    load_yaml_with_lines(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n"
             "print(time.perf_counter() - t0)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(bomb)], capture_output=True, text=True,
                          timeout=15)
    message, seconds = proc.stdout.splitlines()
    assert "YAML anchors and aliases are not allowed" in message
    assert float(seconds) < 2.0


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PERSONA + "sampling:\n  seed: 1\n  seed: 2\n")
    assert _message(path) == f"{path}:6: sampling.seed: duplicate key (first at line 5)"
    path.write_text(PERSONA + "name: y\n")
    assert _message(path) == f"{path}:4: name: duplicate key (first at line 1)"


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PERSONA + "speech:\n  max_turn_seconds: 3e1\n")
    assert parse_persona(path).speech.max_turn_seconds == 30.0
    path.write_text(PERSONA + "speech:\n  max_turn_seconds: 1e9\n")
    assert _message(path) == f"{path}:5: speech.max_turn_seconds: 1000000000.0 is outside 0.0..600.0"
    path.write_text(PERSONA + "description: '1e9'\n")  # quoted: still a string
    assert parse_persona(path).description == "1e9"


def test_bad_tags_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PERSONA + "description: !!python/name:os.system x\n")
    assert _message(path).startswith(f"{path}:4: invalid YAML: ")
    path.write_text(PERSONA + "sampling:\n  seed: !!int abc\n")
    assert _message(path).startswith(f"{path}:5: invalid YAML: ")
