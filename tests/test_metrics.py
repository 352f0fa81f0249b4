"""Metrics (scraped from the real HTTP endpoint), the sysfs device collector, and journald logging."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.service.logs import JournalFormatter, setup_logging
from personaplex_edge.runtime.service.metrics import DeviceCollector, Metrics
from personaplex_edge.sim.daemon import scrape


def _scrape(port: int) -> dict[str, dict[tuple, float]]:
    """The endpoint's samples as {name: {sorted labels: value}} (prometheus_client's parser)."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(scrape(port)):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


@pytest.fixture
def metrics():
    m = Metrics(device_metrics=False)
    yield m
    m.stop()


def test_endpoint_serves_the_daemon_metrics(metrics: Metrics) -> None:
    port = metrics.serve("127.0.0.1", 0)
    before = _scrape(port)
    # Every series exists from the first scrape, at zero.
    assert before["ppx_frames_total"][()] == 0
    assert before["ppx_xruns_total"] == {(("direction", "capture"),): 0, (("direction", "playback"),): 0}
    for stage in ("encode", "lm", "decode", "frame"):
        assert before["ppx_stage_duration_seconds_count"][(("stage", stage),)] == 0

    metrics.set_persona("copilot")
    metrics.set_state(up=True, degraded=False, muted=True)
    for ms in (30.0, 79.0, 95.0):
        metrics.observe_stages({"encode": 4.0, "lm": ms - 10, "decode": 6.0, "engine": 1.0})
        metrics.count_frame(ms, missed=ms > 80)
    metrics.count_xrun("playback")
    metrics.count_model_underrun()
    metrics.set_persona("focus")  # replaces, never two personas at once

    after = _scrape(port)
    assert after["ppx_frames_total"][()] == 3
    assert after["ppx_deadline_misses_total"][()] == 1
    assert after["ppx_xruns_total"][(("direction", "playback"),)] == 1
    assert after["ppx_xruns_total"][(("direction", "capture"),)] == 0
    assert after["ppx_model_underruns_total"][()] == 1
    assert after["ppx_persona_info"] == {(("persona", "focus"),): 1.0}
    assert after["ppx_up"][()] == 1 and after["ppx_degraded"][()] == 0 and after["ppx_muted"][()] == 1
    frame = after["ppx_stage_duration_seconds_bucket"]
    assert frame[(("le", "0.08"), ("stage", "frame"))] == 2  # 30 and 79 ms within the budget
    assert frame[(("le", "0.1"), ("stage", "frame"))] == 3
    assert after["ppx_stage_duration_seconds_sum"][(("stage", "frame"),)] == pytest.approx(0.204)
    assert after["ppx_stage_duration_seconds_count"][(("stage", "encode"),)] == 3
    assert not any("engine" in str(k) for k in after["ppx_stage_duration_seconds_count"])
    assert "ppx_frames_total 3.0" in metrics.text()  # the control socket's `metrics`


def test_endpoint_binds_loopback_only(metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        metrics.serve("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="not a loopback address"):
        metrics.serve("localhost", 0)
    port = metrics.serve("127.0.0.1", 0)
    other = Metrics(device_metrics=False)
    try:
        with pytest.raises(PpxError, match=f"cannot listen on 127.0.0.1:{port}"):
            other.serve("127.0.0.1", port)
    finally:
        other.stop()


def test_unknown_xrun_direction_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError):
        metrics.count_xrun("sideways")


def _jetson_tree(root: Path, gpu_load_path: str = "sys/devices/gpu.0/load") -> Path:
    zones = {0: ("cpu-thermal", "47500"), 1: ("gpu-thermal", "45250"), 2: ("tj-thermal", "48000"),
             3: ("cv0-thermal", "-256000"),  # powered-down sensor
             10: ("soc0-thermal", "46000")}
    for i, (kind, temp) in zones.items():
        zone = root / "sys/devices/virtual/thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    broken = root / "sys/devices/virtual/thermal/thermal_zone4"  # temp unreadable
    broken.mkdir()
    (broken / "type").write_text("pmic-die\n")
    load = root / gpu_load_path
    load.parent.mkdir(parents=True, exist_ok=True)
    load.write_text("537\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    (root / "proc/meminfo").write_text(
        "MemTotal:       64335784 kB\nMemFree:        50000000 kB\nMemAvailable:   60123456 kB\n"
        "HugePages_Total:       0\n")
    return root


def test_device_collector_reads_a_jetson_sysfs_tree(tmp_path: Path) -> None:
    collector = DeviceCollector(_jetson_tree(tmp_path))
    zones = collector.thermal_zones()
    assert [z[:2] for z in zones] == [("thermal_zone0", "cpu-thermal"), ("thermal_zone1", "gpu-thermal"),
                                      ("thermal_zone2", "tj-thermal"), ("thermal_zone10", "soc0-thermal")]
    assert zones[1][2] == 45.25
    assert collector.gpu_load() == pytest.approx(0.537)
    assert collector.unified_memory() == (64335784 * 1024, 60123456 * 1024)


def test_device_metrics_on_the_endpoint(tmp_path: Path) -> None:
    m = Metrics(sysfs_root=_jetson_tree(tmp_path, "sys/devices/platform/bus@0/17000000.gpu/load"))
    try:
        samples = _scrape(m.serve("127.0.0.1", 0))
    finally:
        m.stop()
    temps = samples["ppx_thermal_zone_temperature_celsius"]
    assert temps[(("type", "gpu-thermal"), ("zone", "thermal_zone1"))] == 45.25
    assert len(temps) == 4
    assert samples["ppx_gpu_load_ratio"][()] == pytest.approx(0.537)  # Orin's bus path
    assert samples["ppx_gpu_memory_total_bytes"][()] == 64335784 * 1024
    assert samples["ppx_gpu_memory_available_bytes"][()] == 60123456 * 1024


def test_no_device_series_where_the_device_exposes_nothing(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 500 kB\n")
    m = Metrics(sysfs_root=tmp_path)  # a dGPU box or CI runner: no tegra, no GPU load file
    try:
        samples = _scrape(m.serve("127.0.0.1", 0))
    finally:
        m.stop()
    assert not [name for name in samples if "gpu" in name or "thermal" in name]
    assert "ppx_frames_total" in samples


# -- logs ---------------------------------------------------------------------------------

def _log_lines(level: str = "debug", transcripts: bool = False, prefix: bool = True) -> tuple:
    stream = io.StringIO()
    setup = setup_logging(level, transcripts=transcripts, stream=stream, prefix=prefix)
    return stream, setup


def test_records_carry_journald_priorities_one_line_each() -> None:
    stream, setup = _log_lines()
    log = logging.getLogger("personaplex.daemon")
    log.debug("frame %d", 1)
    log.info("ready:\npersona copilot")
    log.warning("xrun")
    log.error("device lost")
    log.critical("giving up")
    try:
        raise PpxError("/dev/snd: capture device unplugged")
    except PpxError as exc:
        log.error("audio", exc_info=exc)
    try:
        {}["missing"]
    except KeyError:
        log.exception("unexpected")
    setup.stop()
    lines = stream.getvalue().splitlines()
    assert lines[:6] == [
        "<7>personaplex.daemon: frame 1",
        "<6>personaplex.daemon: ready:\\npersona copilot",
        "<4>personaplex.daemon: xrun",
        "<3>personaplex.daemon: device lost",
        "<2>personaplex.daemon: giving up",
        "<3>personaplex.daemon: audio: /dev/snd: capture device unplugged",  # no traceback
    ]
    assert lines[6].startswith("<3>personaplex.daemon: unexpected: KeyError: 'missing' (at test_metrics.py:")
    assert len(lines) == 7


def test_level_filter_plain_prefix_and_transcripts_off_by_default() -> None:
    stream, setup = _log_lines(level="warning", prefix=False)
    logging.getLogger("personaplex.daemon").info("hidden")
    logging.getLogger("personaplex.daemon").warning("shown")
    logging.getLogger("personaplex.transcript").info("agent: turn left at the next light")
    setup.stop()
    assert stream.getvalue() == "warning personaplex.daemon: shown\n"

    stream, setup = _log_lines(level="warning", transcripts=True)
    logging.getLogger("personaplex.transcript").info("agent: turn left")
    setup.stop()
    assert stream.getvalue() == "<6>personaplex.transcript: agent: turn left\n"


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    class Stuck(io.StringIO):
        pass

    stream = Stuck()
    setup = setup_logging("info", stream=stream, prefix=True, queue_size=5)
    setup.listener.stop()  # nothing drains the queue: the writer is "stuck"
    log = logging.getLogger("personaplex.daemon")
    for i in range(50):
        log.info("record %d", i)  # must return at once
    assert setup.handler.dropped == 45
    setup.listener.start()
    log.info("after")
    setup.stop()
    lines = stream.getvalue().splitlines()
    assert lines[:5] == [f"<6>personaplex.daemon: record {i}" for i in range(5)]
    assert lines[5] == "<4>personaplex.logs: 45 log records dropped (stdout too slow)"
    assert lines[6] == "<6>personaplex.daemon: after"
    assert len(lines) == 7

    stream = io.StringIO()
    setup = setup_logging("info", stream=stream, prefix=True, queue_size=2)
    setup.listener.stop()
    for i in range(5):
        log.info("record %d", i)
    setup.listener.start()
    setup.stop()  # drops with no record after them are still reported
    assert stream.getvalue().splitlines()[-1] == "<4>personaplex.logs: 3 log records dropped (stdout too slow)"


def test_stop_restores_the_logger() -> None:
    root = logging.getLogger("personaplex")
    before = (root.level, root.propagate, list(root.handlers))
    _, setup = _log_lines()
    assert root.propagate is False
    setup.stop()
    assert (root.level, root.propagate, list(root.handlers)) == before


def test_formatter_maps_levels() -> None:
    record = logging.LogRecord("personaplex.x", logging.WARNING, __file__, 1, "a\r\nb", None, None)
    assert JournalFormatter().format(record) == "<4>personaplex.x: a\\r\\nb"
