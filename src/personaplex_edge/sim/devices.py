"""Virtual cabin audio devices: real alsa-lib and pyalsaaudio, no sound card.

    cabin = VirtualCabin.create(tmp_path, mic_audio=speech(48000), mic_rate=48000, mic_channels=2)
                                                   # (speech: personaplex_edge.sim.shipped)
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)      # in-process tests
    subprocess.run([...], env={**os.environ, **cabin.env})        # a daemon under test
    ... open "ppx_mic" / "ppx_spk" / "ppx_duplex" ...
    cabin.read_speaker()                                           # [n, channels] float32

The config file (cabin.conf) defines, from alsa-lib's own userspace plugins:

    pcm.ppx_mic_raw  type file, slave null, file "/dev/null", infile <mic.raw>, format raw
                     (the file plugin's `infile` feeds capture: a virtual microphone)
    pcm.ppx_spk_raw  type file, slave null, file <speaker.raw>, format raw (a virtual speaker)
    pcm.ppx_mic      type plug over ppx_mic_raw, slave pinned to mic_rate/mic_channels/S16_LE
    pcm.ppx_spk      type plug over ppx_spk_raw, slave pinned to spk_rate/spk_channels/S16_LE
    pcm.ppx_duplex   type asym: capture ppx_mic, playback ppx_spk

The `plug` slaves are pinned because file and null accept any format: pinning makes the raw
files' layout fixed, and a client that opens another rate or channel count gets alsa-lib's
own conversion (rate, route, linear plugins).

How alsa-lib finds it: ALSA_CONFIG_PATH is a colon-separated list of top-level files that
*replaces* the default (<datadir>/alsa.conf), re-read by every snd_pcm_open(). We list the
system alsa.conf first (pcm.null, defaults, the usual hooks) and our file second. alsa-lib
notices a changed file by (device, inode, mtime in whole seconds), so `rewrite()` writes a new
file and renames it into place: a new inode, seen at once by the next open.

Quirks worth knowing (alsa-lib 1.2.8, pyalsaaudio 0.11):
- null has no clock: reads and writes complete at once. Either pace the client (CabinAudio's
  `clockless=True`) or read/write at your own pace.
- past the infile's end the null slave leaves the capture buffer untouched, and pyalsaaudio
  does not clear it: the data is undefined. `mic_pad_s` appends silence to cover a run.
- the file plugin buffers one ALSA buffer of speaker output and flushes it on drain/drop,
  which pyalsaaudio's close() does: read the speaker file after the client closed the PCM.
- null never enters the XRUN state, so no xrun can be provoked through it. For that, and to
  test a client the way a sound card drives it (poll() wakes once a period, reads and writes
  block), `build_clock_plugin()` compiles `ppx_clock`: a tiny alsa-lib ioplug that is null
  with a CLOCK_MONOTONIC clock (silence in, discard out, EPIPE when the client falls more
  than a buffer behind). `VirtualCabin.create(..., clock_lib=build_clock_plugin(d))` puts it
  under the file plugins instead of null; clients then run with `clockless=False`.
  `clock_stamp=path` makes it append `capture|playback <ns>` to that file each time a stream
  starts (CLOCK_MONOTONIC): sample k of the stream then passed the virtual converter at
  ns + k / rate, the ground truth bench/bench_latency.py measures latency against.
- a converting plugin between the client and a `file` capture PCM breaks the virtual mic: the
  file plugin reads `infile` for the whole area the converter maps, not for what it commits,
  so audio is skipped. Open the mic with the pinned rate and channels. Playback converts fine.
- `speaker_file` / `mic_sink` may be a pipe ("|cmd"): when the command exits, the next flush
  fails and the PCM returns EIO, a real mid-stream device failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


def to_s16(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 the way CabinAudio and most drivers round (x * 32767, rint)."""
    return np.rint(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def system_alsa_conf() -> Path:
    """The top-level config alsa-lib would load by default (honours ALSA_CONFIG_DIR)."""
    top = os.environ.get("ALSA_CONFIG_DIR", "/usr/share/alsa")
    return Path(top) / "alsa.conf"


def _quote(s: str) -> str:
    if '"' in s or "\n" in s:
        raise ValueError(f"cannot put {s!r} in an ALSA config string")
    return f'"{s}"'


@dataclass(frozen=True)
class VirtualCabin:
    dir: Path
    mic_rate: int = 48000
    mic_channels: int = 2
    spk_rate: int = 48000
    spk_channels: int = 2
    mic_infile: Path | None = None  # None: dir/mic.raw
    mic_sink: str = "/dev/null"  # where the file plugin copies captured audio (or "|cmd")
    speaker_file: str | None = None  # None: dir/speaker.raw (or "|cmd")
    extra: str = ""  # appended verbatim (more PCM definitions)
    clock_lib: Path | None = None  # build_clock_plugin()'s library: clocked slaves, not null
    clock_stamp: Path | None = None  # with clock_lib: each stream start's time goes here
    names: dict = field(default_factory=lambda: {
        "mic": "ppx_mic", "spk": "ppx_spk", "duplex": "ppx_duplex"})

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, dir: Path, mic_audio: np.ndarray | None = None, mic_pad_s: float = 2.0,
               **options) -> VirtualCabin:
        """Write the config (and, given mic_audio [n] or [n, ch] float, the mic infile)."""
        cabin = cls(Path(dir), **options)
        cabin.dir.mkdir(parents=True, exist_ok=True)
        if mic_audio is not None:
            cabin.write_mic(mic_audio, pad_s=mic_pad_s)
        cabin._write_config()
        return cabin

    def rewrite(self, **changes) -> VirtualCabin:
        """The same cabin with some fields changed; the config is replaced atomically."""
        cabin = replace(self, **changes)
        cabin._write_config()
        return cabin

    # -- paths and environment ------------------------------------------------------------

    @property
    def config_path(self) -> str:
        """The ALSA_CONFIG_PATH value: system alsa.conf, then ours."""
        parts = [str(system_alsa_conf())] if system_alsa_conf().is_file() else []
        return ":".join(parts + [str(self.conf)])

    @property
    def env(self) -> dict[str, str]:
        return {"ALSA_CONFIG_PATH": self.config_path}

    @property
    def conf(self) -> Path:
        return self.dir / "cabin.conf"

    @property
    def mic_raw(self) -> Path:
        return self.mic_infile if self.mic_infile is not None else self.dir / "mic.raw"

    @property
    def speaker_raw(self) -> Path:
        return self.dir / "speaker.raw"

    # -- audio files ------------------------------------------------------------------------

    def write_mic(self, audio: np.ndarray, pad_s: float = 2.0) -> None:
        """The virtual mic's content: float [n] (copied to every channel) or [n, mic_channels]."""
        a = np.asarray(audio, np.float32)
        if a.ndim == 1:
            a = np.repeat(a[:, None], self.mic_channels, axis=1)
        if a.shape[1] != self.mic_channels:
            raise ValueError(f"mic audio has {a.shape[1]} channels, the mic {self.mic_channels}")
        pad = np.zeros((int(pad_s * self.mic_rate), self.mic_channels), np.float32)
        tmp = self.mic_raw.with_name(self.mic_raw.name + ".partial")
        to_s16(np.concatenate([a, pad])).tofile(tmp)
        os.replace(tmp, self.mic_raw)

    def read_speaker(self, path: Path | None = None) -> np.ndarray:
        """What reached the virtual speaker: float32 [n, spk_channels] (x / 32768)."""
        raw = np.fromfile(path or self.speaker_raw, "<i2")
        return (raw.reshape(-1, self.spk_channels).astype(np.float32) / 32768.0)

    # -- the config -------------------------------------------------------------------------

    def text(self) -> str:
        n = self.names
        spk = self.speaker_file if self.speaker_file is not None else str(self.speaker_raw)
        slave = "null"
        clock = ""
        if self.clock_lib is not None:
            slave = "ppx_clock"
            if self.clock_stamp is not None:
                slave += f" stamp {_quote(str(self.clock_stamp))}"
            clock = (f"pcm_type.ppx_clock {{ lib {_quote(str(self.clock_lib))} }}\n"
                     "pcm.ppx_clock { type ppx_clock }\n")
        return f"""# Virtual cabin devices, written by personaplex_edge.sim.devices
{clock}pcm.{n['mic']}_raw {{
    type file
    slave.pcm {{ type {slave} }}
    file {_quote(self.mic_sink)}
    infile {_quote(str(self.mic_raw))}
    format "raw"
}}
pcm.{n['mic']} {{
    type plug
    slave {{ pcm "{n['mic']}_raw" format S16_LE rate {self.mic_rate} channels {self.mic_channels} }}
}}
pcm.{n['spk']}_raw {{
    type file
    slave.pcm {{ type {slave} }}
    file {_quote(spk)}
    format "raw"
}}
pcm.{n['spk']} {{
    type plug
    slave {{ pcm "{n['spk']}_raw" format S16_LE rate {self.spk_rate} channels {self.spk_channels} }}
}}
pcm.{n['duplex']} {{
    type asym
    capture.pcm "{n['mic']}"
    playback.pcm "{n['spk']}"
}}
{self.extra}
"""

    def _write_config(self) -> None:
        tmp = self.conf.with_name(self.conf.name + ".partial")
        tmp.write_text(self.text())
        os.replace(tmp, self.conf)  # a new inode: the next snd_pcm_open() re-reads


# -- a clocked null device ------------------------------------------------------------------

CLOCK_PLUGIN_C = r"""/* ppx_clock: alsa-lib's null device with a clock. Capture delivers silence, playback discards,
 * both at the configured rate measured on CLOCK_MONOTONIC; poll() wakes once a period through
 * a timerfd. A client that falls behind by more than the buffer gets a real xrun (EPIPE),
 * as from a sound card. With `stamp "<file>"`, each start appends "capture|playback <ns>" to
 * the file: when sample 0 of the stream met the clock. Built by personaplex_edge.sim.devices. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <alsa/asoundlib.h>
#include <alsa/pcm_external.h>

typedef struct {
    snd_pcm_ioplug_t io;
    int fd;
    int running;
    struct timespec t0;
    char *stamp;
} clk_t;

static uint64_t elapsed_frames(clk_t *c)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t ns = (int64_t)(now.tv_sec - c->t0.tv_sec) * 1000000000LL + (now.tv_nsec - c->t0.tv_nsec);
    return (uint64_t)((__int128)ns * c->io.rate / 1000000000LL);
}

static void arm(clk_t *c, long first_ns, long interval_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = first_ns / 1000000000L;
    its.it_value.tv_nsec = first_ns % 1000000000L;
    its.it_interval.tv_sec = interval_ns / 1000000000L;
    its.it_interval.tv_nsec = interval_ns % 1000000000L;
    timerfd_settime(c->fd, 0, &its, NULL);
}

static long period_ns(clk_t *c)
{
    return (long)((int64_t)c->io.period_size * 1000000000LL / c->io.rate);
}

static int clk_start(snd_pcm_ioplug_t *io)
{
    clk_t *c = io->private_data;
    clock_gettime(CLOCK_MONOTONIC, &c->t0);
    c->running = 1;
    arm(c, period_ns(c), period_ns(c));
    if (c->stamp) {
        int fd = open(c->stamp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            dprintf(fd, "%s %lld\n", io->stream == SND_PCM_STREAM_CAPTURE ? "capture" : "playback",
                    (long long)c->t0.tv_sec * 1000000000LL + c->t0.tv_nsec);
            close(fd);
        }
    }
    return 0;
}

static int clk_stop(snd_pcm_ioplug_t *io)
{
    clk_t *c = io->private_data;
    c->running = 0;
    /* keep ticking: whoever polls a stopped stream wakes and sees the state change */
    arm(c, period_ns(c), period_ns(c));
    return 0;
}

static int clk_prepare(snd_pcm_ioplug_t *io)
{
    clk_t *c = io->private_data;
    c->running = 0;
    arm(c, 1, 0); /* wake pollers once: a prepared playback stream has room */
    return 0;
}

static snd_pcm_sframes_t clk_pointer(snd_pcm_ioplug_t *io)
{
    clk_t *c = io->private_data;
    if (!c->running)
        return 0;
    uint64_t pos = elapsed_frames(c);
    if (io->stream == SND_PCM_STREAM_CAPTURE) {
        if (pos > (uint64_t)io->appl_ptr + io->buffer_size)
            return -EPIPE; /* overrun: the buffer filled up */
    } else if (pos > (uint64_t)io->appl_ptr) {
        return -EPIPE; /* underrun: played past what was written */
    }
    return (snd_pcm_sframes_t)(pos % io->buffer_size);
}

static snd_pcm_sframes_t clk_transfer(snd_pcm_ioplug_t *io, const snd_pcm_channel_area_t *areas,
                      snd_pcm_uframes_t offset, snd_pcm_uframes_t size)
{
    if (io->stream == SND_PCM_STREAM_CAPTURE)
        snd_pcm_areas_silence(areas, offset, io->channels, size, io->format);
    return size;
}

static int clk_poll_revents(snd_pcm_ioplug_t *io, struct pollfd *pfd, unsigned int nfds,
                unsigned short *revents)
{
    clk_t *c = io->private_data;
    uint64_t expirations;
    (void)pfd; (void)nfds;
    while (read(c->fd, &expirations, sizeof(expirations)) > 0)
        ;
    snd_pcm_sframes_t avail = snd_pcm_avail_update(io->pcm);
    if (avail < 0)
        *revents = POLLERR;
    else if ((snd_pcm_uframes_t)avail >= io->period_size)
        *revents = io->stream == SND_PCM_STREAM_CAPTURE ? POLLIN : POLLOUT;
    else
        *revents = 0;
    if (*revents == 0)
        arm(c, period_ns(c) / 4 + 1, period_ns(c)); /* not yet: look again soon */
    return 0;
}

static int clk_close(snd_pcm_ioplug_t *io)
{
    clk_t *c = io->private_data;
    close(c->fd);
    free(c->stamp);
    free(c);
    return 0;
}

static const snd_pcm_ioplug_callback_t clk_callback = {
    .start = clk_start,
    .stop = clk_stop,
    .prepare = clk_prepare,
    .pointer = clk_pointer,
    .transfer = clk_transfer,
    .poll_revents = clk_poll_revents,
    .close = clk_close,
};

SND_PCM_PLUGIN_DEFINE_FUNC(ppx_clock)
{
    snd_config_iterator_t i, next;
    const char *stamp = NULL;
    snd_config_for_each(i, next, conf) {
        snd_config_t *n = snd_config_iterator_entry(i);
        const char *id;
        if (snd_config_get_id(n, &id) < 0)
            continue;
        if (strcmp(id, "comment") == 0 || strcmp(id, "type") == 0 || strcmp(id, "hint") == 0)
            continue;
        if (strcmp(id, "stamp") == 0 && snd_config_get_string(n, &stamp) == 0)
            continue;
        SNDERR("ppx_clock: unknown field %s", id);
        return -EINVAL;
    }
    clk_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (c->fd < 0) {
        free(c);
        return -errno;
    }
    if (stamp && !(c->stamp = strdup(stamp))) {
        close(c->fd);
        free(c);
        return -ENOMEM;
    }
    c->io.version = SND_PCM_IOPLUG_VERSION;
    c->io.name = "ppx_clock: a null device with a clock";
    c->io.callback = &clk_callback;
    c->io.private_data = c;
    c->io.poll_fd = c->fd;
    c->io.poll_events = POLLIN; /* a timerfd only ever reads; poll_revents translates */
    c->io.flags = SND_PCM_IOPLUG_FLAG_MONOTONIC;
    int err = snd_pcm_ioplug_create(&c->io, name, stream, mode);
    if (err < 0) {
        close(c->fd);
        free(c->stamp);
        free(c);
        return err;
    }
    static const unsigned int access[] = { SND_PCM_ACCESS_RW_INTERLEAVED };
    static const unsigned int formats[] = { SND_PCM_FORMAT_S16_LE };
    if ((err = snd_pcm_ioplug_set_param_list(&c->io, SND_PCM_IOPLUG_HW_ACCESS, 1, access)) < 0 ||
        (err = snd_pcm_ioplug_set_param_list(&c->io, SND_PCM_IOPLUG_HW_FORMAT, 1, formats)) < 0 ||
        (err = snd_pcm_ioplug_set_param_minmax(&c->io, SND_PCM_IOPLUG_HW_CHANNELS, 1, 8)) < 0 ||
        (err = snd_pcm_ioplug_set_param_minmax(&c->io, SND_PCM_IOPLUG_HW_RATE, 8000, 192000)) < 0 ||
        (err = snd_pcm_ioplug_set_param_minmax(&c->io, SND_PCM_IOPLUG_HW_PERIOD_BYTES, 64, 1 << 20)) < 0 ||
        (err = snd_pcm_ioplug_set_param_minmax(&c->io, SND_PCM_IOPLUG_HW_PERIODS, 2, 64)) < 0) {
        snd_pcm_ioplug_delete(&c->io);
        return err;
    }
    *pcmp = c->io.pcm;
    return 0;
}

SND_PCM_PLUGIN_SYMBOL(ppx_clock);
"""


def build_clock_plugin(cache_dir: Path | None = None) -> Path | None:
    """Compile ppx_clock (once per source version); None without a C compiler or ALSA headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/alsa/pcm_external.h").is_file():
        return None
    tag = hashlib.sha256(CLOCK_PLUGIN_C.encode()).hexdigest()[:12]
    out_dir = Path(cache_dir or tempfile.gettempdir()) / f"ppx-alsa-clock-{tag}"
    lib = out_dir / "libasound_module_pcm_ppx_clock.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "ppx_clock.c"
    src.write_text(CLOCK_PLUGIN_C)
    tmp = out_dir / f".{lib.name}.{os.getpid()}"
    # -DPIC: alsa's plugin macros register the entry point for dlopen(), not a static table.
    proc = subprocess.run([cc, "-shared", "-fPIC", "-DPIC", "-O2", "-o", str(tmp), str(src),
                           "-lasound"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    os.replace(tmp, lib)
    return lib
