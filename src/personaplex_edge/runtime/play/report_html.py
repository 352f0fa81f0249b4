"""`ppx-runtime play --report`: one self-contained HTML page picturing a played conversation.

The page shows per-stage latency per frame and as histograms against the 80 ms
frame budget, the input and reply waveforms, and the agent's transcript on the
waveforms' time axis, under a header naming the build, persona and backend.
The figures are inline SVG and the page has no script and no external
reference, so it can be mailed or attached to an issue as a single file.

matplotlib is the optional `report` extra: it is imported only here, and only
when a report is asked for, so the device install stays lean.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.runtime.errors import PpxError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from personaplex_edge.runtime.play.run import PlayResult

BUDGET_MS = 1e3 * FRAME_SAMPLES / SAMPLE_RATE  # one frame of audio: the real-time deadline
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
INSTALL_HINT = "pip install 'personaplex-edge[report]'"
# Drawn stages: the frame total plus its parts. `engine` (time inside the backend) is in the
# table only; as a line it would overlap lm + decode.
STAGE_COLOURS = {"frame": "#222222", "lm": "#1f77b4", "encode": "#2ca02c", "decode": "#ff7f0e",
                 "host": "#9467bd"}
BUDGET_COLOUR = "#d62728"
TRANSCRIPT_ROWS = 4  # pieces are staggered over this many rows so neighbours do not overlap
PAGE_WIDTH_IN = 11.0  # figure width that fits the page; a busy transcript gets a wider, scrolled one
MAX_WIDTH_IN = 120.0


def require_matplotlib() -> None:
    """Fail in one line before a play whose report could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PpxError(f"--report needs matplotlib, the report extra: {INSTALL_HINT}") from None


def write_report(result: PlayResult, path: Path, input_path: Path | None = None) -> None:
    """Render the page and write it under a temporary name, then rename: never half-written."""
    page = render_report(result, input_path)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PpxError(f"{path}: report not written ({exc.strerror or exc})") from None


def stage_table(result: PlayResult) -> dict[str, np.ndarray]:
    """Per-frame milliseconds by stage, with `frame` (the whole step) and `host` (frame - engine)."""
    stages = {"frame": np.asarray(result.frame_ms, float)}
    stages.update({name: np.asarray(v, float) for name, v in result.stage_ms.items()})
    if "engine" in stages:
        stages["host"] = stages["frame"] - stages["engine"]
    return stages


def render_report(result: PlayResult, input_path: Path | None = None) -> str:
    stages = stage_table(result)
    figures = [("Latency per frame", _latency_figure(stages)),
               ("Latency histogram", _histogram_figure(stages)),
               ("Conversation", _conversation_figure(result))]
    body = [_header(result, stages, input_path)]
    for title, fig in figures:
        wide = " wide" if fig.get_figwidth() > PAGE_WIDTH_IN else ""
        body.append(f'<section><h2>{title}</h2><div class="fig{wide}">{_svg(fig)}</div></section>')
    body.append(_transcript_section(result))
    return _PAGE.format(title=html.escape(_title(result)), style=_STYLE, body="\n".join(body))


# -- header and transcript ------------------------------------------------------------------
def _title(result: PlayResult) -> str:
    return f"ppx-runtime play: {result.ready.persona.name} on {result.session.manifest.root.name}"


def _header(result: PlayResult, stages: dict[str, np.ndarray], input_path: Path | None) -> str:
    manifest, ready, frame = result.session.manifest, result.ready, stages["frame"]
    seconds = len(frame) * FRAME_S
    rows = [
        ("build", f"{manifest.root} ({manifest.data.get('dtype', '?')}, manifest "
                  f"{result.session.build_id[:12]})"),
        ("persona", f"{ready.persona.name} ({'compiled' if ready.compiled else 'restored'}, "
                    f"{ready.prompt_steps} prompt steps)"),
        ("backend", result.backend or "?"),
        ("input", f"{input_path.name if input_path else '?'} ({len(result.audio) / SAMPLE_RATE:.2f} s)"),
        ("frames", f"{len(frame)} x {BUDGET_MS:.0f} ms = {seconds:.2f} s; {int((frame > BUDGET_MS).sum())} "
                   f"over the {BUDGET_MS:.0f} ms budget; real-time factor "
                   f"{frame.sum() / 1e3 / max(seconds, 1e-9):.3f}"),
    ]
    info = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    stats = "".join(
        f"<tr><th>{name}</th>" + "".join(f"<td>{x:.2f}</td>" for x in _p50_p95_max(ms))
        + f"<td>{int(np.isfinite(ms).sum())}</td></tr>" for name, ms in stages.items())
    return (f"<header><h1>{html.escape(_title(result))}</h1><table class=info>{info}</table>"
            f"<table class=stats><tr><th>stage</th><th>p50 ms</th><th>p95 ms</th><th>max ms</th>"
            f"<th>frames</th></tr>{stats}</table>"
            f"<p class=note>Budget: {BUDGET_MS:.0f} ms per frame. encode runs beside lm on a worker "
            f"thread; engine is the critical path's time inside the backend, host the rest.</p>"
            f"</header>")


def _transcript_section(result: PlayResult) -> str:
    timed = "".join(f"<tr><td>{i * FRAME_S:.2f}</td><td>{html.escape(p)}</td></tr>"
                    for i, p in enumerate(result.pieces) if p.strip())
    text = html.escape(result.transcript) or "<em>(the agent said nothing)</em>"
    return (f'<section><h2>Transcript</h2><p class="transcript">{text}</p>'
            f"<details><summary>pieces with their frame times</summary><table class=pieces>"
            f"<tr><th>time s</th><th>piece</th></tr>{timed}</table></details></section>")


def _p50_p95_max(ms: np.ndarray) -> tuple[float, float, float]:
    finite = ms[np.isfinite(ms)]
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    return float(np.percentile(finite, 50)), float(np.percentile(finite, 95)), float(finite.max())


# -- figures ------------------------------------------------------------------------------
def _figure(height: float, rows: int = 1, width: float = PAGE_WIDTH_IN, **kwargs: Any) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: no GUI backend and no global figure registry is touched.
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, 1, **kwargs)


def _ms_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    # Log scale: the budget and millisecond-scale stages are both readable on one axis.
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _legend_above(ax: Any) -> None:
    # Above the plot, not beside it: every figure keeps the page's full width, so the
    # time axes of the latency and conversation figures line up.
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=6, frameon=False, borderaxespad=0)


def _latency_figure(stages: dict[str, np.ndarray]) -> Figure:
    fig, ax = _figure(4.2)
    t = np.arange(len(stages["frame"])) * FRAME_S
    for name, colour in STAGE_COLOURS.items():
        if name in stages:
            ax.plot(t, np.clip(stages[name], 1e-2, None), color=colour, lw=1.6 if name == "frame" else 1.0,
                    label=name if name != "frame" else "frame (total)")
    ax.axhline(BUDGET_MS, color=BUDGET_COLOUR, ls="--", lw=1.5, label=f"{BUDGET_MS:.0f} ms budget")
    ax.set_yscale("log")
    _ms_axis(ax.yaxis)
    ax.set_xlabel("time in the conversation (s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_xlim(0, max(t[-1] if len(t) else 0, FRAME_S))
    ax.grid(True, which="both", alpha=0.25)
    _legend_above(ax)
    return fig


def _histogram_figure(stages: dict[str, np.ndarray]) -> Figure:
    fig, ax = _figure(3.6)
    finite = [v[np.isfinite(v) & (v > 0)] for v in stages.values()]
    lo = min((f.min() for f in finite if f.size), default=1.0)
    hi = max([BUDGET_MS * 1.25] + [f.max() for f in finite if f.size])
    bins = np.geomspace(max(lo * 0.9, 1e-2), hi * 1.1, 60)
    for name, colour in STAGE_COLOURS.items():
        if name in stages:
            ms = stages[name][np.isfinite(stages[name])]
            ax.hist(np.clip(ms, bins[0], None), bins=bins, histtype="step", lw=1.6 if name == "frame" else 1.1,
                    color=colour, label=name if name != "frame" else "frame (total)")
    ax.axvline(BUDGET_MS, color=BUDGET_COLOUR, ls="--", lw=1.5, label=f"{BUDGET_MS:.0f} ms budget")
    ax.set_xscale("log")
    _ms_axis(ax.xaxis)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("frames")
    ax.grid(True, which="both", alpha=0.25)
    _legend_above(ax)
    return fig


def _envelope(audio: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max per bucket: the look of the waveform at a fraction of the SVG size."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    n = max(1, math.ceil(audio.size / points))
    padded = np.pad(audio, (0, (-audio.size) % n), mode="edge").reshape(-1, n)
    t = (np.arange(len(padded)) * n + n / 2) / SAMPLE_RATE
    return t, padded.min(axis=1), padded.max(axis=1)


def _conversation_width(spoken: list[tuple[float, str]], duration: float) -> float:
    """Wide enough that each piece ends before the next one on its row starts (up to a cap)."""
    inches_per_s = 0.0
    for (t0, piece), (t1, _) in zip(spoken, spoken[TRANSCRIPT_ROWS:], strict=False):
        text_in = (len(piece) + 1.5) * 8 * 0.62 / 72  # 8 pt text, ~0.62 em per character
        inches_per_s = max(inches_per_s, text_in / max(t1 - t0, FRAME_S))
    return float(np.clip(duration * inches_per_s + 1.6, PAGE_WIDTH_IN, MAX_WIDTH_IN))  # + the labels


def _conversation_figure(result: PlayResult) -> Figure:
    spoken = [(i * FRAME_S, p.strip()) for i, p in enumerate(result.pieces) if p.strip()]
    duration = max(len(result.audio), len(result.reply)) / SAMPLE_RATE
    fig, (user, agent, text) = _figure(6.4, rows=3, width=_conversation_width(spoken, duration), sharex=True,
                                       height_ratios=[2, 2, 1.6])
    for ax, audio, label, colour in ((user, result.audio, "input (user)", "#1f77b4"),
                                     (agent, result.reply, "reply (agent)", "#ff7f0e")):
        t, lo, hi = _envelope(audio, points=int(150 * fig.get_figwidth()))  # ~2 per pixel
        ax.fill_between(t, lo, hi, color=colour, lw=0.4)
        peak = max(float(np.abs(audio).max()) if len(audio) else 0.0, 1e-3)
        ax.set_ylim(-1.05 * peak, 1.05 * peak)
        ax.set_ylabel(f"{label}\namplitude")
        ax.grid(True, alpha=0.25)
    for k, (t, piece) in enumerate(spoken):
        row = TRANSCRIPT_ROWS - 1 - k % TRANSCRIPT_ROWS  # top to bottom, then again
        text.plot([t, t], [row - 0.35, row + 0.35], color="#999999", lw=0.6)
        text.text(t, row, f" {piece}", fontsize=8, va="center", ha="left", clip_on=True)
    text.set_ylim(-0.6, TRANSCRIPT_ROWS - 0.4)
    text.set_yticks([])
    text.set_ylabel("transcript\n(agent text)")
    text.set_xlabel("time in the conversation (s)")
    text.grid(True, axis="x", alpha=0.25)
    text.set_xlim(0, max(duration, FRAME_S))
    return fig


def _svg(fig: Figure) -> str:
    from matplotlib import rc_context

    buf = io.StringIO()
    # Text stays text (searchable, selectable, small); no metadata block with its URLs.
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # inline in HTML: no XML declaration or DOCTYPE


_STYLE = """
body { font: 14px/1.45 'DejaVu Sans', 'Liberation Sans', Arial, sans-serif; color: #222;
       margin: 24px auto; max-width: 1150px; padding: 0 16px; background: #fff; }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 28px 0 6px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
table.stats td { text-align: right; font-variant-numeric: tabular-nums; }
table.stats th, table.stats td { border-bottom: 1px solid #e4e4e4; padding-left: 10px; }
.note { color: #666; font-size: 12px; }
.fig svg { width: 100%; height: auto; display: block; }
.fig.wide { overflow-x: auto; }  /* at its own size, scrolled: squeezed, its transcript would overlap */
.fig.wide svg { width: auto; max-width: none; }
.transcript { white-space: pre-wrap; background: #f6f6f6; padding: 8px 12px; border-radius: 4px; }
table.pieces td:first-child { text-align: right; font-variant-numeric: tabular-nums; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""
