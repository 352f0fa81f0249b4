"""The systemd files: `systemd-analyze verify` with no warnings, the security exposure score,
sysusers.d and tmpfiles.d applied to a temporary root, and what the daemon relies on.

`verify` checks that every ExecStart= binary exists. Rather than editing the unit, the tests
build a temporary root laid out as on the device (`--root`): systemd's own units, ours in
/etc/systemd/system, and the console-script wrapper pip installed for `ppx-runtime` (this
venv's) copied to the install path /opt/personaplex-edge/venv/bin/ppx-runtime. The unit file
is checked byte for byte as shipped, and a root without the wrapper makes verify fail.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from personaplex_edge.runtime.cli import EX_CONFIG

SYSTEMD_DIR = Path(__file__).parents[1] / "systemd"
EDGE = "personaplex-edge.service"
CLOCKS = "personaplex-clocks.service"
INSTALL_EXEC = "/opt/personaplex-edge/venv/bin/ppx-runtime"
ANALYZE = shutil.which("systemd-analyze")
SYSUSERS = shutil.which("systemd-sysusers")
TMPFILES = shutil.which("systemd-tmpfiles")

pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")

# Exposure thresholds (0 = locked down, 10 = unprotected), `systemd-analyze security --offline`.
# personaplex-edge scores 1.6 with systemd 252. What is left is the job itself: Internet
# sockets for the 127.0.0.1 metrics endpoint (PrivateNetwork= would hide it from the host),
# ALSA and GPU device nodes (no PrivateDevices=), the supplementary groups that open them
# (and no PrivateUsers=, which would unmap those groups), real-time scheduling and the
# @resources syscalls that grant it, W+X memory for CUDA's JIT (no MemoryDenyWriteExecute=),
# chown for the control socket's group (@privileged), /proc/meminfo for Jetson GPU memory
# (no ProcSubset=pid). With 252 the threshold is the score itself, a ratchet: removing any
# one hardening option raises it to 1.7-3.7 (measured; KeyringMode=private alone is the
# default), so the test fails; lower it when the unit improves. Other systemd versions
# weigh the checks differently, so they get a bound with room for that instead.
# personaplex-clocks scores 2.6 with 252: it runs as root and writes /sys and debugfs
# (nvpmodel, jetson_clocks), so no ProtectKernelTunables=, no device list and no capability
# allow-list; the rest is locked. Its ratchet catches most removals (UMask=, LockPersonality=,
# ProtectHostname= or MemoryDenyWriteExecute= alone round to the same 2.6).
MAX_EXPOSURE = {  # unit: (threshold with systemd 252, threshold with other versions)
    "personaplex-edge.service": (1.6, 2.0),
    "personaplex-clocks.service": (2.6, 3.0),
}


def _env() -> dict[str, str]:
    return {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def _systemd_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(candidate) / "sysinit.target").exists():
            return Path(candidate)
    pytest.fail("systemd-analyze is installed but systemd's own units (sysinit.target) are not")


def _entry_point() -> Path:
    """The `ppx-runtime` console script pip installed into this venv."""
    script = Path(sys.executable).parent / "ppx-runtime"
    assert script.is_file(), f"{script}: missing; install the package (`make venv`)"
    return script


def _make_root(root: Path, *, with_entry_point: bool = True) -> Path:
    shutil.copytree(_systemd_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (EDGE, CLOCKS):
        shutil.copy2(SYSTEMD_DIR / unit, units / unit)
    if with_entry_point:
        target = root / INSTALL_EXEC.lstrip("/")
        target.parent.mkdir(parents=True)
        shutil.copy2(_entry_point(), target)
        target.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def device_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_root(tmp_path_factory.mktemp("device-root"))


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "--no-pager", *args], capture_output=True, text=True,
                          env=_env(), timeout=120)


def _verify(root: Path, *units: str) -> list[str]:
    """Every message `systemd-analyze verify` printed (any message is a failure)."""
    proc = _analyze("verify", f"--root={root}", *units)
    messages = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not messages:
        messages = [f"exit status {proc.returncode}"]
    return messages


def test_units_verify_without_any_warning(device_root: Path) -> None:
    assert _verify(device_root, EDGE, CLOCKS) == []


def test_verify_really_checks_the_entry_point(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "root", with_entry_point=False)
    messages = _verify(root, EDGE)
    assert any(INSTALL_EXEC in m and "not executable" in m for m in messages), messages


def test_verify_reports_a_misspelt_option(tmp_path: Path) -> None:
    """The no-warning check above is not vacuous: one typo produces a message."""
    root = _make_root(tmp_path / "root")
    unit = root / "etc/systemd/system" / EDGE
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    messages = _verify(root, EDGE)
    assert any("ProtectHomes" in m for m in messages), messages


def _exposure(root: Path, unit: str) -> float:
    proc = _analyze("security", "--offline=true", f"--root={root}", unit)
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    # Anything on stderr (e.g. a unit that failed to load) would make the score meaningless.
    assert proc.stderr.strip() == "", proc.stderr
    return float(match.group(1))


def _systemd_version() -> int:
    out = _analyze("--version").stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


@pytest.mark.parametrize("unit", [EDGE, CLOCKS])
def test_exposure_is_within_threshold(device_root: Path, unit: str) -> None:
    version = _systemd_version()
    measured_with, other = MAX_EXPOSURE[unit]
    threshold = measured_with if version == 252 else other
    score = _exposure(device_root, unit)
    print(f"{unit}: exposure {score} with systemd {version} (threshold {threshold})")
    assert score <= threshold


# -- what the daemon relies on (hardening must not take it away) ----------------------------
def _unit(name: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in order; a unit file may repeat a key."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in (SYSTEMD_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def _one(unit: dict[tuple[str, str], list[str]], key: str, section: str = "Service") -> str:
    values = unit.get((section, key), [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_daemon_unit_keeps_what_the_daemon_needs() -> None:
    u = _unit(EDGE)
    assert _one(u, "ExecStart") == f"{INSTALL_EXEC} serve --config /etc/personaplex/runtime.yaml"
    assert _one(u, "Type") == "notify" and _one(u, "NotifyAccess") == "main"
    assert _one(u, "WatchdogSec") == "5s"
    assert _one(u, "Restart") == "on-failure"
    assert str(EX_CONFIG) in _one(u, "RestartPreventExitStatus").split()
    assert _one(u, "TimeoutStopSec") == "5s"  # the daemon stops in 2 s; SIGKILL after 5
    assert _one(u, "User") == "personaplex" and _one(u, "Group") == "personaplex"
    assert set(_one(u, "SupplementaryGroups").split()) == {"audio", "video", "render"}
    # Real time: the audio threads raise themselves within RLIMIT_RTPRIO.
    assert int(_one(u, "LimitRTPRIO")) > 0 and _one(u, "RestrictRealtime") == "no"
    assert not {"CPUSchedulingPolicy", "CPUSchedulingPriority"} & {k for _, k in u}
    # CUDA JIT and TensorRT need W+X memory; devices must stay visible.
    for forbidden in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers",
                      "PrivateNetwork", "ProcSubset"):
        assert ("Service", forbidden) not in u, forbidden
    assert _one(u, "DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in u[("Service", "DeviceAllow")]}
    assert {"char-alsa", "/dev/nvmap", "/dev/nvhost-ctrl-gpu", "char-nvidia*"} <= allowed
    assert all(v.split()[1] == "rw" for v in u[("Service", "DeviceAllow")])
    # @resources carries sched_setscheduler: an allow-list that includes it, no deny of it.
    filters = u[("Service", "SystemCallFilter")]
    assert filters == ["@system-service"]
    assert _one(u, "StateDirectory").split() == ["personaplex", "personaplex/snapshots",
                                                 "personaplex/slots"]
    assert _one(u, "RuntimeDirectory") == "personaplex"
    assert _one(u, "ConfigurationDirectory") == "personaplex"
    assert _one(u, "EnvironmentFile") == "-/etc/personaplex/runtime.env"
    assert _one(u, "After", "Unit").split() == ["sound.target", CLOCKS]
    assert _one(u, "Wants", "Unit") == CLOCKS


def test_real_time_grant_covers_the_default_priority() -> None:
    """audio.rt_priority's default fits under LimitRTPRIO (the kernel refuses a higher one), which
    stays below the kernel's threaded IRQ handlers (50); the Docker recipe grants the same."""
    from personaplex_edge.runtime.audio.settings import AudioSettings

    u = _unit(EDGE)
    limit, default = int(_one(u, "LimitRTPRIO")), AudioSettings().rt_priority
    assert 0 < default <= limit < 50
    assert _one(u, "CapabilityBoundingSet") == ""
    assert _one(u, "AmbientCapabilities") == ""  # RLIMIT_RTPRIO alone; no CAP_SYS_NICE
    docker = (SYSTEMD_DIR.parent / "docker" / "README.md").read_text()
    assert re.findall(r"--ulimit rtprio=(\d+)", docker) == [str(limit), str(limit)]


def test_clocks_unit_is_a_tolerant_oneshot_before_the_daemon() -> None:
    u = _unit(CLOCKS)
    assert _one(u, "Type") == "oneshot" and _one(u, "RemainAfterExit") == "yes"
    assert u[("Service", "ExecStart")] == ["-/usr/sbin/nvpmodel -m 0", "-/usr/bin/jetson_clocks"]
    assert EDGE in _one(u, "Before", "Unit").split()
    assert ("Service", "User") not in u  # root: it writes clocks in /sys


def test_environment_file_is_plain_assignments() -> None:
    for n, line in enumerate((SYSTEMD_DIR / "runtime.env").read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"runtime.env:{n}: {line!r}"


# -- sysusers.d and tmpfiles.d, applied to a temporary root ---------------------------------
@pytest.fixture
def users_root(tmp_path: Path) -> Path:
    if SYSUSERS is None:
        pytest.fail("systemd-analyze is installed but systemd-sysusers is not")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    shutil.copy2(SYSTEMD_DIR / "personaplex-edge.sysusers",
                 root / "usr/lib/sysusers.d/personaplex-edge.conf")
    shutil.copy2(SYSTEMD_DIR / "personaplex-edge.tmpfiles",
                 root / "usr/lib/tmpfiles.d/personaplex-edge.conf")
    proc = subprocess.run([SYSUSERS, f"--root={root}", "personaplex-edge.conf"],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    # It reports each account it creates; anything else is a warning about the file.
    others = [m for m in proc.stderr.splitlines() if m.strip() and not m.startswith("Creating ")]
    assert others == []
    return root


def _passwd(root: Path) -> dict[str, list[str]]:
    return {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}


def _groups(root: Path) -> dict[str, list[str]]:
    return {f[0]: f for f in (line.split(":") for line in (root / "etc/group").read_text().splitlines())}


def test_sysusers_creates_the_daemon_user(users_root: Path) -> None:
    user = _passwd(users_root)["personaplex"]
    assert user[5] == "/var/lib/personaplex" and user[6].endswith("nologin")
    groups = _groups(users_root)
    assert user[3] == groups["personaplex"][2]  # primary group: the control socket's group
    for name in ("audio", "video", "render"):
        assert "personaplex" in groups[name][3].split(","), name


EXPECTED_DIRS = {  # path: (mode, user, group)
    "etc/personaplex": (0o750, "root", "personaplex"),
    "etc/personaplex/personas": (0o750, "root", "personaplex"),
    "etc/personaplex/trusted-keys": (0o755, "root", "root"),
    "var/lib/personaplex": (0o750, "personaplex", "personaplex"),
    "var/lib/personaplex/snapshots": (0o750, "personaplex", "personaplex"),
    "var/lib/personaplex/slots": (0o750, "personaplex", "personaplex"),
    "var/cache/personaplex": (0o750, "personaplex", "personaplex"),
    "var/cache/personaplex/cuda": (0o750, "personaplex", "personaplex"),
}


def test_tmpfiles_creates_the_directories(users_root: Path) -> None:
    if TMPFILES is None:
        pytest.fail("systemd-analyze is installed but systemd-tmpfiles is not")
    if os.geteuid() != 0:
        # Owners other than ourselves need root: check the syntax (no line applies under
        # the prefix) and that every owner exists in the root's generated accounts.
        proc = subprocess.run([TMPFILES, f"--root={users_root}", "--create",
                               "--prefix=/nonexistent", "personaplex-edge.conf"],
                              capture_output=True, text=True, env=_env(), timeout=60)
        assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
        users, groups = _passwd(users_root), _groups(users_root)
        for _, owner, group in EXPECTED_DIRS.values():
            assert owner == "root" or owner in users
            assert group in groups
        return
    proc = subprocess.run([TMPFILES, f"--root={users_root}", "--create", "personaplex-edge.conf"],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    users, groups = _passwd(users_root), _groups(users_root)
    uid = {"root": 0, **{name: int(f[2]) for name, f in users.items()}}
    gid = {"root": 0, **{name: int(f[2]) for name, f in groups.items()}}
    for rel, (mode, owner, group) in EXPECTED_DIRS.items():
        st = (users_root / rel).stat()
        assert stat.S_ISDIR(st.st_mode), rel
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid[owner], gid[group]), rel


def test_tmpfiles_and_unit_agree_on_the_directories() -> None:
    """tmpfiles.d pre-creates exactly the unit's state, cache and configuration directories."""
    u = _unit(EDGE)
    from_unit = {f"etc/{d}" for d in _one(u, "ConfigurationDirectory").split()}
    from_unit |= {f"var/lib/{d}" for d in _one(u, "StateDirectory").split()}
    from_unit |= {f"var/cache/{d}" for d in _one(u, "CacheDirectory").split()}
    assert from_unit <= set(EXPECTED_DIRS)
    assert _one(u, "UMask") == "0027"
    for key in ("ConfigurationDirectoryMode", "StateDirectoryMode", "CacheDirectoryMode",
                "RuntimeDirectoryMode"):
        assert _one(u, key) == "0750", key



def test_exec_start_arguments_are_accepted_by_the_cli() -> None:
    proc = subprocess.run([str(_entry_point()), "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout
