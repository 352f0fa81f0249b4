"""Soak: `ppx-runtime serve` in real time on clocked virtual ALSA devices, with faults injected.

    python tests/soak.py --minutes 60 [--build DIR] [--sample-every 300] [--out soak.json]

The daemon runs as in a car: a clocked microphone and speaker (sim.devices' ppx_clock
under alsa-lib's file plugins), speech and silence on the microphone, the control socket and
the metrics endpoint open. A schedule, repeated every `cycle_s`, injects:

- an xrun burst: the daemon stopped (SIGSTOP) for a few ALSA buffers, then continued;
- capture device loss and return: the process the file plugin pipes captured audio to is
  killed, so the next flush fails with EIO mid-stream, as when a USB microphone is unplugged;
- playback device loss and return, the same way on the speaker;
- a persona switch to a new persona and a reset, with the snapshot directory read-only,
  then with it full (a tmpfs in the daemon's own mount namespace);
- a long SIGSTOP/SIGCONT (a frozen process: seconds, not milliseconds);
- all along: control-socket fuzz from several clients (valid and invalid requests, garbage,
  over-long lines, idle connections that never send).

Every `sample_every` seconds it records RSS, open fds, threads, frame p50/p99, deadline misses,
xruns and the speaker stream's length against the wall clock, and at the end asserts: the daemon
never exited, RSS grew less than 5% after warm-up, no fd or thread growth, the speaker stream
kept up with the wall clock, and every injected fault shows in the metrics. Exit 0 when all
hold; the table goes to stdout (`--out` also writes it as JSON).

Needs root for the mount namespace (the full and read-only snapshot directory); without it those
two faults are skipped and said so. Runs from a source checkout (its speech is tests/data's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.sim.builds import tiny_build
from personaplex_edge.sim.daemon import free_port, samples, scrape
from personaplex_edge.sim.devices import VirtualCabin, build_clock_plugin
from personaplex_edge.sim.shipped import speech

RATE = 48000  # device rate and channels, as a cabin codec runs
CHANNELS = 2
MIC_RATE = 24000  # the microphone file is mono 24 kHz so an hour of it stays ~170 MB
PERIOD = AudioSettings().period_frames  # the shipped defaults: the soak runs what ships
BUFFER_PERIODS = AudioSettings().buffer_periods
SNAPSHOT_TMPFS = "8m"
FAULTS = ("xrun_burst", "capture_loss", "playback_loss", "snapshot_readonly", "snapshot_full",
          "sigstop", "persona_switch", "reset", "control_fuzz")


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    threads: int
    frame_p50_ms: float
    frame_p99_ms: float
    frames: int
    deadline_misses: int
    xruns: int
    speaker_s: float
    speaker_lag_s: float  # wall time minus speaker stream, net of known stopped/lost time


@dataclass
class SoakResult:
    minutes: float
    samples: list[Sample] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    steady_drift_s: list[float] = field(default_factory=list)  # speaker - wall, quiet windows
    failures: list[str] = field(default_factory=list)
    exit_code: int | None = None


# -- the process under test ------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[float, int, int]:
    """(RSS MB, open fds, threads) of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kb / 1024, fds, threads


def _quiet_handles(pid: int, settle_s: float = 5.0) -> tuple[int, int]:
    """The fewest (open fds, threads) a process shows over `settle_s` seconds of polling.

    A metrics scrape or a control reply leaves its handler's thread and socket alive for a
    moment after the client has read the answer; the fewest seen over a few seconds is the
    process's own count, and a leak keeps it up."""
    fewest = _proc_stat(pid)[1:]
    end = time.monotonic() + settle_s
    while time.monotonic() < end:
        time.sleep(0.1)
        _, fds, threads = _proc_stat(pid)
        fewest = (min(fewest[0], fds), min(fewest[1], threads))
    return fewest


def _children(pid: int, comm: str) -> list[int]:
    """Child processes of `pid` named `comm` (the file plugin's pipe commands)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name == comm:
            found.append(int(entry.name))
    return found


def _metric(values: dict[str, float], prefix: str) -> float:
    """Sum of every sample whose name (with labels) starts with `prefix`."""
    return sum(v for k, v in values.items() if k == prefix or k.startswith(prefix + "{"))


def _quantile_ms(values: dict[str, float], q: float, before: dict[str, float] | None) -> float:
    """A quantile of the frame-time histogram over an interval (bucket differences)."""
    buckets = []
    for key, v in values.items():
        if key.startswith('ppx_stage_duration_seconds_bucket{') and 'stage="frame"' in key:
            le = key.split('le="')[1].split('"')[0]
            base = before.get(key, 0.0) if before else 0.0
            buckets.append((float("inf") if le == "+Inf" else float(le), v - base))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return float("nan")
    for le, count in buckets:
        if count >= q * total:
            return le * 1e3
    return float("inf")


class Control:
    """Requests to the daemon's control socket, one connection each."""

    def __init__(self, path: Path):
        self.path = path

    def request(self, payload: bytes, timeout: float = 5.0) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf.splitlines()[0]) if buf else {}

    def cmd(self, cmd: str, **args) -> dict:
        return self.request(json.dumps({"cmd": cmd, **args}).encode() + b"\n")


class Fuzzer:
    """Several clients sending random valid and invalid requests, plus idle connections."""

    REQUESTS = (b'{"cmd": "status"}\n', b'{"cmd": "metrics"}\n', b'{"cmd": "mute"}\n',
                b'{"cmd": "unmute"}\n', b'{"cmd": "pause"}\n', b'{"cmd": "resume"}\n',
                b'{"cmd": "busy", "on": true}\n', b'{"cmd": "busy", "on": false}\n',
                b"{not json\n", b'{"cmd": "explode"}\n', b'{"cmd": "persona", "name": "../etc"}\n',
                b'{"cmd": "busy", "on": "maybe"}\n', b"[]\n", b"\xff\xfe\n", b"x" * 9000 + b"\n",
                b'{"cmd": "status", "id": 7}\n')

    def __init__(self, control: Control, clients: int = 3, idle: int = 4, seed: int = 0):
        self.control, self.clients, self.idle = control, clients, idle
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.sent = self.errors = self.refused = 0
        self._threads: list[threading.Thread] = []
        self._idle_socks: list[socket.socket] = []

    def start(self) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(random.Random(self.rng.random()),),
                                 name=f"fuzz-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for _ in range(self.idle):  # connections that never say a word
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.control.path))
            self._idle_socks.append(s)

    def _run(self, rng: random.Random) -> None:
        while not self.stop.wait(rng.uniform(0.05, 0.4)):
            try:
                reply = self.control.request(rng.choice(self.REQUESTS))
                self.sent += 1
                self.errors += reply.get("ok") is False
            except (OSError, ValueError):
                self.refused += 1  # connection refused or dropped (too many clients, timeouts)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=10)
        for s in self._idle_socks:
            s.close()


# -- the soak ---------------------------------------------------------------------------------

class Soak:
    def __init__(self, build: Path, work: Path, minutes: float, sample_every: float,
                 cycle_s: float, log=print):
        self.build, self.work, self.minutes = build, work, minutes
        self.sample_every, self.cycle_s, self.log = sample_every, cycle_s, log
        self.result = SoakResult(minutes=minutes)
        self.result.faults = dict.fromkeys(FAULTS, 0)
        self.lost_s = 0.0  # wall time the speaker was knowingly not fed (stopped, device lost)
        self.namespaced = os.geteuid() == 0 and shutil.which("unshare") is not None \
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0

    # -- set-up -----------------------------------------------------------------------------
    def _setup(self) -> None:
        clock = build_clock_plugin(self.work / "plugin")
        if clock is None:
            raise SystemExit("soak: needs a C compiler and the ALSA headers (scripts/system_deps.sh test)")
        seconds = self.minutes * 60 + 30
        talk = speech(MIC_RATE)
        pattern = np.concatenate([talk, np.zeros(int(6 * MIC_RATE), np.float32)])
        mic = np.tile(pattern, int(np.ceil(seconds * MIC_RATE / len(pattern))))
        self.speaker = self.work / "speaker.raw"
        self.cabin = VirtualCabin.create(
            self.work / "alsa", mic_audio=mic, mic_pad_s=5.0, mic_rate=MIC_RATE, mic_channels=1,
            spk_rate=RATE, spk_channels=CHANNELS, clock_lib=clock,
            mic_sink="|exec dd of=/dev/null status=none",
            speaker_file=f"|exec cat >>{self.speaker}")
        self.snapshots = self.work / "snapshots"
        self.snapshots.mkdir()
        self.personas = self.work / "personas"
        self.personas.mkdir()
        self.sock = self.work / "control.sock"
        self.port = free_port()
        self.config = self.work / "runtime.yaml"
        self.config.write_text(f"""
build: {{path: {self.build}, backend: ort-cpu, threads: 1}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: {MIC_RATE},
        playback_rate: {RATE}, channels: 1, playback_channels: {CHANNELS},
        period_frames: {PERIOD}, buffer_periods: {BUFFER_PERIODS}, clockless: false}}
persona: {{default: copilot, persona_dirs: [{self.personas}]}}
snapshots: {{dir: {self.snapshots}}}
control: {{socket: {self.sock}, group: null}}
metrics: {{enabled: true, host: 127.0.0.1, port: {self.port}}}
logging: {{level: info, transcripts: false}}
watchdog: {{retry_min_s: 0.5, retry_max_s: 2.0, stall_s: 2.0}}
""")

    def _start_daemon(self) -> None:
        serve = [sys.executable, "-m", "personaplex_edge.runtime.cli", "serve", "--config",
                 str(self.config)]
        if self.namespaced:  # a private tmpfs for the snapshots: it can be made full or read-only
            script = (f"mount -t tmpfs -o size={SNAPSHOT_TMPFS} ppx-soak {self.snapshots} && "
                      f"exec {' '.join(serve)}")
            serve = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        else:
            self.result.skipped += ["snapshot_readonly", "snapshot_full"]
        self.daemon_log = open(self.work / "daemon.log", "w")  # noqa: SIM115 - closed in run()
        self.proc = subprocess.Popen(serve, env={**os.environ, **self.cabin.env},
                                     stdout=self.daemon_log, stderr=subprocess.STDOUT)
        self.control = Control(self.sock)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: the daemon exited at start-up ({self.proc.returncode}); "
                                 f"see {self.work / 'daemon.log'}")
            try:
                if self.control.cmd("status").get("frames", 0) > 10:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("soak: the daemon did not start within 180 s")

    # -- faults -----------------------------------------------------------------------------
    def _stop_for(self, seconds: float) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(self.proc.pid, signal.SIGCONT)
        self.lost_s += seconds

    def xrun_burst(self) -> None:
        self._stop_for(3 * BUFFER_PERIODS * PERIOD / RATE)  # three buffers late

    def sigstop(self) -> None:
        self._stop_for(3.0)

    def _kill_pipe(self, comm: str, speaker: bool) -> bool:
        t0 = time.monotonic()
        pids = _children(self.proc.pid, comm)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # Back when the daemon has reopened the device (status says both are open again).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.25)
            audio = self.control.cmd("status").get("audio", {})
            if audio.get("capture_open") and audio.get("playback_open") and _children(self.proc.pid, comm):
                break
        if speaker:  # a lost microphone does not stop the speaker: silence keeps playing
            self.lost_s += time.monotonic() - t0
        return bool(pids)

    def capture_loss(self) -> None:
        if not self._kill_pipe("dd", speaker=False):
            self.result.failures.append("capture_loss: no capture pipe process found")

    def playback_loss(self) -> None:
        if not self._kill_pipe("cat", speaker=True):
            self.result.failures.append("playback_loss: no playback pipe process found")

    def _new_persona(self, tag: str) -> str:
        name = f"soak-{tag}"
        (self.personas / f"{name}.yaml").write_text(
            f"name: {name}\nvoice: NATF2\nprompt: You are a calm co-pilot. Soak run {tag} at "
            f"{time.monotonic():.0f}.\n")
        return name

    def persona_switch(self, tag: str) -> None:
        self.control.cmd("persona", name=self._new_persona(tag))
        time.sleep(2.5)  # the compile runs on the frame loop
        self.control.cmd("persona", name="copilot")
        time.sleep(0.5)

    def reset(self) -> None:
        self.control.cmd("reset")

    def _in_namespace(self, *cmd: str) -> None:
        subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *cmd], check=True,
                       capture_output=True, timeout=10)

    def _clear_soak_snapshots(self) -> None:
        root = Path(f"/proc/{self.proc.pid}/root") / str(self.snapshots).lstrip("/")
        for f in root.glob("soak-*"):
            f.unlink(missing_ok=True)

    def snapshot_readonly(self) -> None:
        self._in_namespace("mount", "-o", "remount,ro", str(self.snapshots))
        try:
            self.persona_switch("ro")
            self.reset()
        finally:
            self._in_namespace("mount", "-o", "remount,rw", str(self.snapshots))
            self._clear_soak_snapshots()

    def snapshot_full(self) -> None:
        root = Path(f"/proc/{self.proc.pid}/root") / str(self.snapshots).lstrip("/")
        filler = root / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass  # ENOSPC: full
        try:
            self.persona_switch("full")
            self.reset()
        finally:
            filler.unlink(missing_ok=True)
            self._clear_soak_snapshots()

    # -- sampling ---------------------------------------------------------------------------
    def _sample(self, t0: float, before: dict[str, float] | None) -> dict[str, float]:
        values = samples(scrape(self.port))
        rss, fds, threads = _proc_stat(self.proc.pid)
        spk_s = self.speaker.stat().st_size / (2 * CHANNELS * RATE) if self.speaker.exists() else 0.0
        wall = time.monotonic() - t0
        sample = Sample(
            t_s=round(wall, 1), rss_mb=round(rss, 1), fds=fds, threads=threads,
            frame_p50_ms=round(_quantile_ms(values, 0.5, before), 1),
            frame_p99_ms=round(_quantile_ms(values, 0.99, before), 1),
            frames=int(_metric(values, "ppx_frames_total")),
            deadline_misses=int(_metric(values, "ppx_deadline_misses_total")),
            xruns=int(_metric(values, "ppx_xruns_total")), speaker_s=round(spk_s, 2),
            speaker_lag_s=round(wall - self.lost_s - spk_s, 3))
        self.result.samples.append(sample)
        self.log(_row(sample))
        return values

    # -- the run ----------------------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str]]:
        """(offset within a cycle, fault) pairs, spaced so each settles before the next; the
        last fifth of each cycle is quiet, and the speaker's pace is probed across it."""
        step = 0.8 * self.cycle_s / 8
        plan = ["xrun_burst", "capture_loss", "playback_loss", "persona_switch", "reset",
                "snapshot_readonly", "snapshot_full", "sigstop"]
        return [(step * (i + 0.5), f) for i, f in enumerate(plan)] + [
            (0.8 * self.cycle_s + 2.0, "probe_start"), (self.cycle_s - 0.5, "probe_end")]

    def _speaker_now(self) -> tuple[float, float]:
        size = self.speaker.stat().st_size if self.speaker.exists() else 0
        return time.monotonic(), size / (2 * CHANNELS * RATE)

    def probe_start(self) -> None:
        self._probe = self._speaker_now()

    def probe_end(self) -> None:
        """With no fault in between, the speaker stream keeps pace with the wall clock."""
        t1, s1 = self._speaker_now()
        t0, s0 = self._probe
        self.result.steady_drift_s.append(round((s1 - s0) - (t1 - t0), 3))

    def run(self) -> SoakResult:
        self._setup()
        self._start_daemon()
        first = samples(scrape(self.port))
        quiet_before = _quiet_handles(self.proc.pid)
        fuzzer = Fuzzer(self.control)
        fuzzer.start()
        t0 = time.monotonic()
        # Speaker time is counted from now: what the file holds already is start-up audio.
        self.lost_s = -(self.speaker.stat().st_size / (2 * CHANNELS * RATE)
                        if self.speaker.exists() else 0.0)
        end = t0 + self.minutes * 60
        next_sample = t0 + self.sample_every
        previous = first
        plan = self.schedule()
        cycle = 0
        self.log(_header())
        try:
            while time.monotonic() < end:
                cycle_start = t0 + cycle * self.cycle_s
                for offset, fault in plan:
                    at = cycle_start + offset
                    while time.monotonic() < min(at, end):
                        if self.proc.poll() is not None:
                            raise _DaemonExited()
                        if time.monotonic() >= next_sample:
                            previous = self._sample(t0, previous)
                            next_sample += self.sample_every
                        time.sleep(0.2)
                    if time.monotonic() >= end:
                        break
                    if fault in self.result.skipped:
                        continue
                    method = getattr(self, fault)
                    method(f"c{cycle}") if fault == "persona_switch" else method()
                    if fault.startswith("probe_"):
                        continue
                    self.result.faults[fault] += 1
                    if fault in ("snapshot_readonly", "snapshot_full"):
                        self.result.faults["persona_switch"] += 1
                        self.result.faults["reset"] += 1
                cycle += 1
            if self.proc.poll() is not None:
                raise _DaemonExited()
            self._sample(t0, previous)
        except _DaemonExited:
            self.result.failures.append(f"the daemon exited ({self.proc.returncode}) during the soak")
        finally:
            fuzzer.finish()
            self.result.faults["control_fuzz"] = fuzzer.sent
        final = samples(scrape(self.port)) if self.proc.poll() is None else {}
        if self.proc.poll() is None:
            self._check_handles(quiet_before, _quiet_handles(self.proc.pid))
        self._check(first, final, fuzzer)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.result.exit_code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.result.failures.append("the daemon did not stop within 30 s of SIGTERM")
        self.daemon_log.close()
        if self.result.exit_code not in (0, None):
            self.result.failures.append(f"the daemon exited {self.result.exit_code} on SIGTERM")
        return self.result

    def _check_handles(self, before: tuple[int, int], after: tuple[int, int]) -> None:
        """No fd and no thread is left behind by the faults: counted with the fuzzer stopped,
        before and after (the samples' counts include requests in flight)."""
        for what, was, now in zip(("open fds", "threads"), before, after, strict=True):
            if now > was:
                self.result.failures.append(f"{what} grew from {was} to {now}")

    def _check(self, first: dict[str, float], final: dict[str, float], fuzzer: Fuzzer) -> None:
        fail = self.result.failures.append
        samples = self.result.samples
        if len(samples) < 2 or not final:
            fail("too few samples to judge")
            return
        warm = samples[0]
        peak_rss = max(s.rss_mb for s in samples[1:])
        if peak_rss > warm.rss_mb * 1.05:
            fail(f"RSS grew {100 * (peak_rss / warm.rss_mb - 1):.1f}% after warm-up "
                 f"({warm.rss_mb} -> {peak_rss} MB)")
        # The speaker stream keeps pace with the clock: across each cycle's quiet window it
        # gains or loses less than one frame, plus one ALSA buffer (the file plugin writes a
        # buffer at a time, so the file's length moves in those steps).
        slack = 0.08 + BUFFER_PERIODS * PERIOD / RATE
        if not self.result.steady_drift_s:
            fail("no quiet window to measure the speaker's pace in")
        for drift in self.result.steady_drift_s:
            if abs(drift) > slack:
                fail(f"speaker stream drifted {drift:+.3f} s against the wall clock in a quiet "
                     f"window (allowed {slack:.2f})")

        def grew(prefix: str) -> float:
            return _metric(final, prefix) - _metric(first, prefix)

        f = self.result.faults
        visible = {
            "xrun_burst": grew('ppx_xruns_total{direction="capture"}') > 0,
            "sigstop": grew('ppx_xruns_total{direction="playback"}') > 0,
            "capture_loss": grew('ppx_audio_reopens_total{direction="capture"}') >= f["capture_loss"],
            "playback_loss": grew('ppx_audio_reopens_total{direction="playback"}') >= f["playback_loss"],
            "persona_switch": grew("ppx_conversation_starts_total") >= f["persona_switch"] + f["reset"],
            "reset": grew('ppx_conversation_starts_total{reason="reset"}') >= f["reset"],
            "snapshot_readonly": grew("ppx_snapshot_save_errors_total") >= 1,
            "snapshot_full": grew("ppx_snapshot_save_errors_total") >= 1,
            "control_fuzz": grew('ppx_control_requests_total{result="error"}') > 0
            and grew('ppx_control_requests_total{result="ok"}') > 0,
        }
        for fault, seen in visible.items():
            if f.get(fault) and not seen:
                fail(f"fault {fault} (injected {f[fault]}x) is not visible in the metrics")
        if fuzzer.sent == 0:
            fail("the control fuzzer got no reply at all")


class _DaemonExited(Exception):
    pass


def _header() -> str:
    return (f"{'t s':>7} {'RSS MB':>7} {'fds':>4} {'thr':>4} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'frames':>7} {'misses':>6} {'xruns':>6} {'speaker s':>9} {'lag s':>7}")


def _row(s: Sample) -> str:
    return (f"{s.t_s:7.1f} {s.rss_mb:7.1f} {s.fds:4d} {s.threads:4d} {s.frame_p50_ms:7.1f} "
            f"{s.frame_p99_ms:7.1f} {s.frames:7d} {s.deadline_misses:6d} {s.xruns:6d} "
            f"{s.speaker_s:9.2f} {s.speaker_lag_s:7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 60)))
    parser.add_argument("--build", type=Path, help="a build (default: a fresh tiny one)")
    parser.add_argument("--sample-every", type=float, help="seconds (default: 300, or minutes*60/6)")
    parser.add_argument("--cycle", type=float, help="seconds per fault cycle (default: 300 or less)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    total = args.minutes * 60
    sample_every = args.sample_every or min(300.0, total / 6)
    cycle = args.cycle or min(300.0, total)
    with tempfile.TemporaryDirectory(prefix="ppx-soak-") as tmp:
        work = Path(tmp)
        build = args.build or tiny_build(work)
        print(f"soak: {args.minutes:g} min, sample every {sample_every:g} s, fault cycle {cycle:g} s, "
              f"work {work}", flush=True)
        soak = Soak(build, work, args.minutes, sample_every, cycle,
                    log=lambda line: print(line, flush=True))
        result = soak.run()
        if result.failures:
            print((work / "daemon.log").read_text()[-4000:], file=sys.stderr)
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in result.faults.items()))
    print("speaker minus wall clock across each quiet window (s): "
          + ", ".join(f"{d:+.3f}" for d in result.steady_drift_s))
    if result.skipped:
        print("skipped (needs root and mount namespaces): " + ", ".join(result.skipped))
    for failure in result.failures:
        print(f"FAIL: {failure}")
    print("soak: " + ("passed" if not result.failures else f"{len(result.failures)} failed"))
    if args.out:
        args.out.write_text(json.dumps(asdict(result), indent=2))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
