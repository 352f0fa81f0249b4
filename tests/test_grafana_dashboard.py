"""The shipped Grafana dashboard (systemd/grafana/): its structure, its provider file, the scrape
job in systemd/README.md, and - against the real daemon - that every metric a panel queries is
one the daemon exports.

The daemon runs once, as in test_serve.py: `ppx-runtime serve` on the tiny build with virtual
ALSA devices. $PPX_SYSFS_ROOT points its device collector at a fake Jetson tree, so the
thermal, GPU load and GPU memory series exist here too and their names are checked like the
rest. The check is on sample names (what PromQL sees: ppx_frames_total, the histogram's
_bucket, the Info's _info), with each name's family type from the scrape.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from personaplex_edge.runtime.service.config import MetricsConfig
from personaplex_edge.runtime.service.metrics import SYSFS_ROOT_ENV

ROOT = Path(__file__).parents[1]
GRAFANA = ROOT / "systemd" / "grafana"
DASHBOARD = GRAFANA / "personaplex-edge.json"
PROVIDER = GRAFANA / "provisioning.yaml"
SYSTEMD_README = ROOT / "systemd" / "README.md"

DS_VARIABLE = "datasource"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                    "__range_ms", "__dashboard", "__from", "__to"}
QUOTED = re.compile(r'"(?:\\.|[^"\\])*"')
METRIC = re.compile(r"(?<![\w:])ppx_[A-Za-z0-9_:]*")
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
RATE_ARG = re.compile(r"\b(?:rate|irate|increase)\(\s*(ppx_\w+)")
QUANTILE_ARG = re.compile(r"histogram_quantile\(\s*[\d.]+\s*,.*?\b(ppx_\w+)")
LABEL_MATCHER = re.compile(r'\b(\w+)\s*(=~|=|!=|!~)\s*"((?:\\.|[^"\\])*)"')
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _dashboard() -> dict:
    with DASHBOARD.open() as f:
        return json.load(f)


def _targets(dash: dict) -> list[tuple[dict, dict]]:
    return [(panel, t) for panel in dash["panels"] for t in panel.get("targets", [])]


def _queries(dash: dict) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    out = [t["expr"] for _, t in _targets(dash)]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def _metric_names(expr: str) -> set[str]:
    """The ppx_ series an expression selects (label values in quotes are not names)."""
    return set(METRIC.findall(QUOTED.sub('""', expr)))


# -- structure ---------------------------------------------------------------------------------

def test_dashboard_is_provisioning_ready_json() -> None:
    dash = _dashboard()
    assert dash["uid"] == "personaplex-edge" and dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash.get("id") is None  # provisioning assigns the database id

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables[DS_VARIABLE]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert set(variables) - {DS_VARIABLE} == {"instance"}

    panels = dash["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["title"], panel
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert 0 <= pos["x"] and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for source in (panel, *panel["targets"]):
            assert source["datasource"] == {"type": "prometheus", "uid": f"${{{DS_VARIABLE}}}"}

    defined = set(variables) | GRAFANA_BUILTINS
    for panel, target in _targets(dash):
        expr = target["expr"]
        assert expr.strip() and _metric_names(expr), (panel["title"], expr)
        bare = QUOTED.sub('""', expr)
        for open_, close in ("()", "[]", "{}"):
            assert bare.count(open_) == bare.count(close), (panel["title"], expr)
        for braced, plain in VARIABLE.findall(expr):
            assert (braced or plain) in defined, (panel["title"], expr)


def test_latency_panels_are_quantiles_of_the_stage_histogram() -> None:
    quantiles: dict[str, set[str]] = {}
    for panel, target in _targets(_dashboard()):
        expr = target["expr"]
        if "histogram_quantile" not in expr:
            continue
        histogram = QUANTILE_ARG.search(expr).group(1)
        if histogram == "ppx_reanchor_duration_seconds_bucket":  # context rebuilds, by kind
            assert re.search(r"\bby\s*\(\s*le\s*,\s*kind\s*\)", expr), expr
            continue
        assert histogram == "ppx_stage_duration_seconds_bucket", expr
        assert re.search(r"\bby\s*\(\s*le\s*,\s*stage\s*\)", expr), expr
        q = re.match(r"histogram_quantile\(\s*([\d.]+)", expr).group(1)
        quantiles.setdefault(panel["title"], set()).add(str(float(q)))
    assert len(quantiles) >= 2
    assert all(qs == {"0.5", "0.95", "0.99"} for qs in quantiles.values()), quantiles


def test_provider_file_and_install_note() -> None:
    provider = yaml.safe_load(PROVIDER.read_text())
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["name"]
    path = entry["options"]["path"]
    assert path.startswith("/")

    readme = SYSTEMD_README.read_text()
    # The install commands put the JSON where the provider looks, the provider where Grafana reads.
    assert f"systemd/grafana/{DASHBOARD.name} {path}/" in readme
    assert re.search(r"systemd/grafana/provisioning\.yaml /etc/grafana/provisioning/dashboards/\S+\.yaml",
                     readme)


def test_readme_scrape_job_targets_the_default_metrics_endpoint() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", SYSTEMD_README.read_text(), re.S)
    jobs = [job for b in blocks if "scrape_configs" in b for job in yaml.safe_load(b)["scrape_configs"]]
    assert jobs, "no Prometheus scrape_configs example in systemd/README.md"
    targets = [t for job in jobs for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{MetricsConfig.host}:{MetricsConfig.port}"]
    assert "/metrics" == jobs[0].get("metrics_path", "/metrics")


# -- against the running daemon ------------------------------------------------------------------

def _fake_jetson(root: Path) -> Path:
    """The files DeviceCollector reads on an AGX Orin: thermal zones, GPU load, memory."""
    for i, (kind, milli) in enumerate((("cpu-thermal", 41500), ("gpu-thermal", 45250),
                                        ("cv0-thermal", -256000))):  # a powered-down sensor
        zone = root / f"sys/devices/virtual/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    load = root / "sys/devices/platform/bus@0/17000000.gpu/load"
    load.parent.mkdir(parents=True)
    load.write_text("412\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    (root / "proc/meminfo").write_text("MemTotal:       64335784 kB\nMemAvailable:   60123456 kB\n")
    return root


def _frames(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ppx_frames_total":
                return s.value
    return 0.0


def test_every_dashboard_metric_is_exported_by_the_daemon(tiny_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("alsaaudio")
    from personaplex_edge.sim.daemon import (
        NotifyListener,
        free_port,
        reap,
        scrape,
        serve_config,
        start_serve,
    )
    from personaplex_edge.sim.devices import VirtualCabin
    from personaplex_edge.sim.shipped import speech

    cabin = VirtualCabin.create(tmp_path / "alsa", mic_audio=speech(48000), mic_pad_s=30.0,
                                mic_rate=48000, mic_channels=2, spk_rate=48000, spk_channels=2)
    port = free_port()
    config = serve_config(tmp_path, tiny_build, port=port)
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path),
           SYSFS_ROOT_ENV: str(_fake_jetson(tmp_path / "jetson"))}
    proc = start_serve(config, env)
    try:
        notify.wait_for("READY=1", timeout=120)
        deadline = time.monotonic() + 30
        text = scrape(port)
        while _frames(text) < 25 and time.monotonic() < deadline:  # two seconds of frames
            time.sleep(0.25)
            text = scrape(port)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    finally:
        output = reap(proc, notify)
    assert rc == 0, output
    assert _frames(text) >= 25, output

    kind: dict[str, str] = {}  # sample name -> its family's type
    family_of: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}  # label name -> values seen
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            kind[s.name] = family.type
            family_of[s.name] = family.name
            labels.setdefault(s.name, set()).update(s.labels)
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
    typed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert {family_of[n] for n in kind} <= typed | {n.removesuffix("_total") for n in typed}

    dash = _dashboard()
    used: set[str] = set()
    for expr in _queries(dash):
        names = _metric_names(expr)
        missing = names - set(kind)
        assert not missing, f"{sorted(missing)} in {expr!r} are not exported; the daemon has {sorted(kind)}"
        used |= names
        for name in RATE_ARG.findall(expr):  # rate() of a gauge is a silent mistake
            assert kind[name] in ("counter", "histogram"), (name, kind[name], expr)
            assert name.endswith("_total") or name.endswith("_bucket"), expr
        for name in QUANTILE_ARG.findall(expr):
            assert kind[name] == "histogram" and name.endswith("_bucket"), expr
        for label, op, value in LABEL_MATCHER.findall(expr):  # stage="frame", stage=~"encode|lm"
            if label in values:
                wanted = value.split("|") if op == "=~" else [value]
                assert set(wanted) <= values[label], (label, wanted, values[label], expr)
    for _, target in _targets(dash):
        offered = {"instance", "job"}.union(*(labels[n] for n in _metric_names(target["expr"])))
        assert set(LEGEND_LABEL.findall(target["legendFormat"])) <= offered, target

    # Both ways: every family the daemon exports has a panel (the _created gauges aside).
    families = {family_of[n] for n in kind if not family_of[n].endswith("_created")}
    unshown = families - {family_of[n] for n in used}
    assert not unshown, f"exported but on no panel: {sorted(unshown)}"
    # The Jetson-only families came from the fake tree, not from this machine.
    for name in ("ppx_thermal_zone_temperature_celsius", "ppx_gpu_load_ratio",
                 "ppx_gpu_memory_total_bytes", "ppx_gpu_memory_available_bytes"):
        assert name in used and name in kind
    assert values["type"] == {"cpu-thermal", "gpu-thermal"}
    assert values["persona"] == {"copilot"}
