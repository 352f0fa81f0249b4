"""`ppx-runtime play --report`: the one-page HTML picture of a run, and how it fails."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import play

CHROMIUM = shutil.which("chromium")
INSTALL_HINT = "pip install 'personaplex-edge[report]'"


def _play_with_report(build: Path, tmp: Path, report: Path, *extra: str) -> int:
    """support.play with a transcript and the HTML report `report`, seed 5."""
    return play(build, tmp / "reply.wav", "--transcript", str(tmp / "reply.txt"), "--seed", "5",
                "--report", str(report), *extra)


@pytest.fixture(scope="module")
def played(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One play with a report, shared by the checks of the page."""
    pytest.importorskip("matplotlib", reason=f"the report extra: {INSTALL_HINT}")
    tmp = tmp_path_factory.mktemp("report")
    assert _play_with_report(tiny_build, tmp, tmp / "run.html") == 0
    return tmp


def test_report_is_one_self_contained_page(played: Path) -> None:
    page = (played / "run.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not list(played.glob(".*partial*"))  # renamed into place, nothing left over
    # Self-contained and static: nothing fetched, no script at all.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"<script|<link\b|<iframe|<img\b|@import|url\(\s*['\"]?https?:", page, re.I)
    assert page.count("<svg") == 3  # latency per frame, histogram, conversation
    # The transcript as written to --transcript, and its pieces as text in the figure.
    transcript = (played / "reply.txt").read_text().strip()
    assert transcript and html.escape(transcript) in page
    # The 80 ms budget: in the header and as the labelled line in both latency figures.
    assert "80 ms budget" in page and "Budget: 80 ms per frame" in page
    for stage in ("encode", "lm", "decode", "engine", "host", "frame"):
        assert f"<th>{stage}</th>" in page
    assert "ort-cpu" in page and "copilot" in page
    assert "time in the conversation (s)" in page and "latency (ms, log scale)" in page


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # A private profile and no sandbox: runs as root in containers and leaves $HOME alone.
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={cwd / 'profile'}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
def test_report_renders_in_a_browser(played: Path) -> None:
    from matplotlib.image import imread

    url = (played / "run.html").as_uri()
    shot = played / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", url, cwd=played)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # the page has no script, so the console must stay silent
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    colours = np.unique((pixels[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100  # figures drawn: lines, fills and anti-aliased text

    dom = _chromium("--dump-dom", url, cwd=played)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 3 and "<h1>ppx-runtime play: copilot on tiny</h1>" in dom.stdout
    assert "80 ms budget" in dom.stdout


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_unwritable_report_is_one_line_and_the_audio_is_still_written(
        tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    pytest.importorskip("matplotlib", reason=f"the report extra: {INSTALL_HINT}")
    report = tmp_path / "nowhere" / "run.html" if where == "missing-dir" else tmp_path / "run.html"
    if where == "a-directory":
        report.mkdir()
    rc = _play_with_report(tiny_build, tmp_path, report)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"ppx-runtime: error: {report}: report not written (")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (tmp_path / "reply.wav").stat().st_size > 100_000  # the play's own outputs are kept
    assert (tmp_path / "reply.txt").is_file()
    assert not list(tmp_path.rglob("*.partial"))  # no half-written page


# A meta-path finder that makes matplotlib unimportable, as on a lean device install.
_NO_MATPLOTLIB = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
from personaplex_edge.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_report_without_matplotlib_names_the_extra_before_playing(tmp_path: Path) -> None:
    # Neither the input nor the build exists: the check must come first, before any of the play.
    out = tmp_path / "reply.wav"
    proc = subprocess.run([sys.executable, "-c", _NO_MATPLOTLIB, "play", str(tmp_path / "missing.wav"),
                           "--build", str(tmp_path / "no-build"), "--out", str(out),
                           "--report", str(tmp_path / "run.html")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("ppx-runtime: error: --report needs matplotlib")
    assert INSTALL_HINT in proc.stderr
    assert not out.exists() and not (tmp_path / "run.html").exists()
