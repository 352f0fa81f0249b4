"""One ALSA PCM through pyalsaaudio: nonblocking periods, poll() waits, xruns told from losses;
and the wall-clock pacer for clockless test devices.

alsaaudio is imported when a PCM is opened, so this module imports without pyalsaaudio.
"""

from __future__ import annotations

import errno
import math
import os
import select
import threading
import time

import numpy as np

POLL_S = 0.05  # longest a device thread sleeps in poll(): bounds stop() latency
XRUN_STORM = 50  # xruns in a row with no audio moved: the device is not usable

# -- errors -------------------------------------------------------------------------------

class DeviceError(Exception):
    """The device is gone or unusable: close it and reopen with backoff."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Xrun(Exception):
    """An overrun (capture) or underrun (playback); the stream was or will be re-prepared."""


_TEXT_ERRNO = {os.strerror(e): e for e in (
    errno.EPIPE, errno.ESTRPIPE, errno.ENODEV, errno.EBADFD, errno.EIO, errno.ENOENT,
    errno.EBUSY, errno.EINVAL, errno.EAGAIN, errno.ENXIO, errno.EACCES, errno.EPERM,
    errno.ENOSPC)}


def alsa_errno(exc: BaseException) -> int | None:
    """The errno behind an ALSAAudioError: pyalsaaudio formats `snd_strerror(err) [device]`."""
    text = str(exc)
    if text.endswith("]") and " [" in text:
        text = text[: text.rindex(" [")]
    return _TEXT_ERRNO.get(text)


# -- one PCM ------------------------------------------------------------------------------

class AlsaPcm:
    """A nonblocking pyalsaaudio PCM with xrun/loss classification and poll() waiting."""

    def __init__(self, direction: str, device: str, rate: int, channels: int,
                 period_frames: int, periods: int) -> None:
        import alsaaudio

        self.direction = direction
        self.device = device
        self._alsa = alsaaudio
        kind = alsaaudio.PCM_CAPTURE if direction == "capture" else alsaaudio.PCM_PLAYBACK
        self.pcm = None
        try:
            self.pcm = alsaaudio.PCM(type=kind, mode=alsaaudio.PCM_NONBLOCK, device=device,
                                     rate=rate, channels=channels,
                                     format=alsaaudio.PCM_FORMAT_S16_LE,
                                     periodsize=period_frames, periods=periods)
            # ALSA picks the nearest rate and period size the device allows: use what we got.
            info = self.pcm.info() if hasattr(self.pcm, "info") else {}
            self._descriptors = self.pcm.polldescriptors()
        except alsaaudio.ALSAAudioError as exc:
            if self.pcm is not None:
                self.close()
            raise DeviceError(f"cannot open {direction} device {device!r}: {exc}",
                              alsa_errno(exc)) from None
        self.rate = int(info.get("rate", rate))
        self.channels = int(info.get("channels", channels))
        self.period = int(info.get("period_size", period_frames))
        self.buffer = int(info.get("buffer_size", period_frames * periods))
        self.frame_bytes = 2 * self.channels
        self._poll = select.poll()
        for fd, events in self._descriptors:
            self._poll.register(fd, events)
        self._revents = getattr(self.pcm, "polldescriptors_revents", None)  # 0.11+

    def _error(self, exc: Exception) -> Exception:
        code = alsa_errno(exc)
        if code == errno.EPIPE:  # 0.10 write(): the xrun as an exception
            self.drop()
            return Xrun(str(exc))
        return DeviceError(f"{self.direction} device {self.device!r}: {exc}", code)

    def read(self) -> np.ndarray | None:
        """Interleaved int16 samples (up to one period), None if nothing is ready yet."""
        try:
            n, data = self.pcm.read()
        except self._alsa.ALSAAudioError as exc:
            raise self._error(exc) from None
        if n < 0:  # -EPIPE: overrun; 0.11 has re-prepared, 0.10 re-prepares on the next read
            raise Xrun(os.strerror(-n))
        if n == 0:
            return None
        return np.frombuffer(data, np.int16)

    def write(self, data: memoryview) -> int:
        """Frames accepted (0: no room yet; a nonblocking write may take part of the data)."""
        try:
            n = self.pcm.write(data)
        except self._alsa.ALSAAudioError as exc:
            raise self._error(exc) from None
        if n < 0:  # 0.11: -EPIPE after re-preparing
            raise Xrun(os.strerror(-n))
        return n

    def wait(self, timeout: float) -> bool:
        """Block in poll() until the device is ready (or in error) or timeout passes."""
        ready = self._poll.poll(max(0, math.ceil(timeout * 1000)))  # ceil: 0 would spin
        if not ready:
            return False
        if self._revents is None:
            return True
        got = dict(ready)
        try:
            return bool(self._revents([(fd, got.get(fd, 0)) for fd, _ in self._descriptors]))
        except self._alsa.ALSAAudioError as exc:
            raise self._error(exc) from None

    def avail(self) -> int | None:
        fn = getattr(self.pcm, "avail", None)  # 0.11+
        return None if fn is None else int(fn())

    def queued(self) -> int | None:
        """Frames in the device buffer now: waiting to play (playback, buffer_size - avail) or
        captured and not yet read (capture, avail). None where unknown (pyalsaaudio 0.10, an
        xrun): the echo path then goes by when the threads run (echo_path.py)."""
        try:
            avail = self.avail()
        except Exception:  # noqa: BLE001 - a failing device is the stream's to report
            return None
        if avail is None or avail < 0:
            return None
        if self.direction == "playback":
            return max(0, self.buffer - avail)
        return min(avail, self.buffer)

    def drop(self) -> None:
        try:
            self.pcm.drop()
        except Exception:  # noqa: BLE001 - best effort on a failing device
            pass

    def close(self) -> None:
        try:
            self.pcm.close()
        except Exception:  # noqa: BLE001 - the device may already be gone
            pass


class Pacer:
    """For clockless devices: keep transferred samples from running ahead of the wall clock."""

    def __init__(self, rate: int, lead: int) -> None:
        self.rate, self.lead = rate, lead
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.samples = 0

    def advance(self, n: int, stop: threading.Event) -> None:
        self.samples += n
        ahead = self.t0 + (self.samples - self.lead) / self.rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
        elif ahead < -0.5:  # we were descheduled for long: don't burst to catch up
            self.reset()
