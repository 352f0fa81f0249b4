"""The network endpoint's parts on their own: config, query, Ogg pages, Opus, jitter buffer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.network.access import allowed, is_loopback
from personaplex_edge.runtime.network.jitter import JitterBuffer
from personaplex_edge.runtime.network.ogg import OggReader, OggWriter
from personaplex_edge.runtime.network.protocol import ChatRequest, Kind, ProtocolError, split
from personaplex_edge.runtime.service.config import load_config


def _config(tmp_path: Path, text: str):
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    return load_config(path)


def test_network_config_is_off_by_default_and_checked(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "")
    assert not cfg.network.enabled and cfg.network.host == "127.0.0.1"
    assert cfg.network.policy == "when-cabin-idle"
    cases = {
        "network: {enabled: true, host: 0.0.0.0}": "runtime.yaml:1: network.host: 0.0.0.0 is not "
                                                   "a loopback address: set network.token",
        "network: {host: car.local}": "network.host: 'car.local' is not an IP address",
        "network: {token: short}": "network.token: at least 16 characters",
        "network: {tls_cert: cert.pem}": "network.tls_key: set both tls_cert and tls_key",
        "network: {enabled: true, tls_cert: c.pem, tls_key: k.pem}": "network.tls_cert: ",
        "network: {policy: sometimes}": "network.policy: 'sometimes' is not one of "
                                        "when-cabin-idle, exclusive, off",
        "network: {enabled: true, static_dir: nothing}": "network.static_dir: ",
        "network: {max_message_bytes: 10}": "network.max_message_bytes: 10 is outside",
        "network: {bogus: 1}": "network.bogus",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            _config(tmp_path, text + "\n")
        assert expected in str(err.value), (text, str(err.value))
    ok = _config(tmp_path, "network: {enabled: true, host: 0.0.0.0, token: 0123456789abcdef}\n")
    assert ok.network.token == "0123456789abcdef" and not ok.network.loopback_only


def test_serve_with_a_bad_network_section_exits_78(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "runtime.yaml"
    config.write_text("network:\n  enabled: true\n  host: 0.0.0.0\n")
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve",
                           "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "runtime.yaml:3: network.host" in proc.stderr and "Traceback" not in proc.stderr
    config.write_text("")
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve",
                           "--config", str(config), "--static", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "serve --static: the network endpoint is off" in proc.stderr


def test_serve_static_sets_the_directory(tmp_path: Path) -> None:
    from personaplex_edge.runtime.service.config import with_static_dir

    cfg = _config(tmp_path, "network: {enabled: true}\n")
    (tmp_path / "dist").mkdir()
    with pytest.raises(ConfigError, match="no index.html"):
        with_static_dir(cfg, tmp_path / "dist")
    (tmp_path / "dist" / "index.html").write_text("<!doctype html>")
    assert with_static_dir(cfg, tmp_path / "dist").network.static_dir == (tmp_path / "dist").resolve()


def test_the_query_is_parsed_like_upstreams() -> None:
    r = ChatRequest.from_query("text_prompt=%3Csystem%3E%20Be%20brief.%20%3Csystem%3E&"
                               "voice_prompt=NATF2.pt&text_temperature=0.7&text_topk=25&"
                               "audio_temperature=0.8&audio_topk=250&pad_mult=0&seed=-1&"
                               "worker_auth_id=abc&email=x%40y")
    assert (r.text_prompt, r.voice_prompt, r.seed, r.token) == ("Be brief.", "NATF2", None, "abc")
    assert (r.text_temperature, r.text_topk, r.audio_topk) == (0.7, 25, 250)
    for query, field in (("seed=x", "seed"), ("text_topk=nan", "text_topk"),
                         ("audio_temperature=inf", "audio_temperature"),
                         ("voice_prompt=../../etc/passwd", "voice_prompt"),
                         ("persona=Bad%20Name", "persona"), ("text_prompt=" + "a" * 5000, "text_prompt")):
        with pytest.raises(ProtocolError, match=field):
            ChatRequest.from_query(query)


def test_a_close_reason_fits_a_close_frame() -> None:
    from personaplex_edge.runtime.network.protocol import close_reason

    assert close_reason("short") == "short"
    for text in ("é" * 100, "a" + "€" * 60, "x" * 200, "🚗" * 40):
        cut = close_reason(text)
        assert len(cut.encode()) <= 123 and text.startswith(cut)
        assert len(cut.encode()) > 123 - 4  # cut at the last whole character, no further


def test_message_kinds() -> None:
    assert split(b"\x01abc") == (Kind.AUDIO, b"abc")
    for bad, why in ((b"", "empty"), (b"\x09", "unknown kind 9"), ("text", "text frames")):
        with pytest.raises(ProtocolError, match=why):
            split(bad)


def test_access_needs_the_token_off_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.4")
    token = "0123456789abcdef"
    assert allowed("127.0.0.1", "/api/chat", None, token) is None
    assert "present the access token" in allowed("192.0.2.4", "/api/chat", None, token)
    assert "wrong" in allowed("192.0.2.4", "/api/chat?worker_auth_id=nope", None, token)
    assert allowed("192.0.2.4", f"/api/chat?worker_auth_id={token}", None, token) is None
    assert allowed("192.0.2.4", "/api/chat", f"Bearer {token}", token) is None
    assert allowed("192.0.2.4", "/api/chat", None, None) is not None


def test_static_files_are_found_under_their_root_only(tmp_path: Path) -> None:
    from personaplex_edge.runtime.network.server import _static_file

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("<!doctype html>")
    (tmp_path / "secret").write_text("no")
    root = tmp_path / "www"
    assert _static_file(root, "/") == ("index.html", b"<!doctype html>")
    for path in ("/%00", "/a%00b", "/../secret", "/%2e%2e/secret", "/missing"):
        assert _static_file(root, path) == "not found", path  # never an exception: a 500


def test_ogg_pages_survive_any_cut_and_garbage_is_refused() -> None:
    writer = OggWriter(7)
    packets = [bytes([i]) * n for i, n in enumerate((19, 300, 1, 255, 510, 0, 77))]
    stream = b"".join(writer.page([p], i) for i, p in enumerate(packets))
    for cut in (1, 3, 27, 100, len(stream)):
        reader = OggReader()
        got = []
        for i in range(0, len(stream), cut):
            got += reader.feed(stream[i:i + cut])
        assert got == packets
    with pytest.raises(ProtocolError, match="not an Ogg stream"):
        OggReader().feed(b"RIFF....WAVEfmt ")
    broken = bytearray(stream)
    broken[40] ^= 0xFF
    with pytest.raises(ProtocolError, match="checksum"):
        OggReader().feed(bytes(broken))


def test_opus_round_trip_keeps_the_speech_in_time() -> None:
    pytest.importorskip("av")
    from personaplex_edge.runtime.network.opus import OpusDecoder, OpusEncoder
    from personaplex_edge.sim.shipped import speech

    audio = speech(SAMPLE_RATE, seconds=4.0)
    encoder, decoder = OpusEncoder(), OpusDecoder()
    out = np.concatenate([decoder.feed(encoder.encode(audio[i:i + FRAME_SAMPLES]))
                          for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)])
    assert abs(len(out) - len(audio)) < 400  # the resampler's hold, no pre-skip left in
    ref = audio[:len(out)]
    lags = np.arange(-20, 21)
    best = max(lags, key=lambda k: float(np.dot(np.roll(out, k)[1000:-1000], ref[1000:-1000])))
    assert abs(best) <= 3  # in time with the input (within 0.125 ms)
    assert np.corrcoef(np.roll(out, best)[1000:-1000], ref[1000:-1000])[0, 1] > 0.85
    level = np.sqrt(np.mean(out[1000:-1000] ** 2) / np.mean(ref[1000:-1000] ** 2))
    assert 0.8 < level < 1.25 and np.abs(out).max() <= 1.0  # float at the input's level


def test_jitter_buffer_prebuffers_covers_bursts_and_bounds_its_depth() -> None:
    jb = JitterBuffer(target_ms=40.0, max_ms=500.0)
    assert jb.pop() is None  # nothing yet
    jb.push(np.ones(FRAME_SAMPLES, np.float32))
    assert not jb.playable  # a frame, but not the 40 ms beyond it
    assert jb.pop() is None and not jb.ever_started
    jb.push(np.full(960, 2.0, np.float32))
    assert jb.playable
    frame = jb.pop()
    assert frame is not None and frame.shape == (FRAME_SAMPLES,) and (frame == 1).all()
    assert not jb.playable and jb.depth_ms == 40.0  # a remnant: nothing the model will hear
    assert jb.pop() is None and jb.underruns == 1  # dry: silence, and buffer up again
    jb.push(np.full(24000, 3.0, np.float32))  # a second at once: above max_ms the oldest go
    assert jb.overflows == 1 and jb.depth_ms == pytest.approx(500.0)
    assert jb.pop()[0] == 3.0


def test_jitter_buffer_brings_a_standing_latency_back_down() -> None:
    jb = JitterBuffer(target_ms=40.0, max_ms=1000.0, trim_s=2.0)
    jb.push(np.zeros(12000, np.float32))  # a 500 ms burst, then audio in real time
    for _ in range(jb.trim_frames * 2):
        for _ in range(4):
            jb.push(np.zeros(480, np.float32))
        assert jb.pop() is not None
    assert jb.drops == 1 and jb.depth_ms == pytest.approx(40.0)  # back to the start level
    assert jb.underruns == 0 and jb.overflows == 0 and jb.stats()["drops"] == 1
    # Bursty but in real time (400 ms every 5 frames): jitter to cover, nothing to drop.
    jb = JitterBuffer(target_ms=40.0, max_ms=1000.0)
    for _ in range(jb.trim_frames):
        jb.push(np.zeros(9600, np.float32))
        for _ in range(5):
            assert jb.pop() is not None
    assert jb.drops == 0 and jb.underruns == 0
    jb = JitterBuffer(target_ms=40.0, max_ms=1000.0, trim_s=0.0)  # never: it stays late
    jb.push(np.zeros(12000, np.float32))
    for _ in range(50):
        jb.push(np.zeros(1920, np.float32))
        assert jb.pop() is not None
    assert jb.drops == 0 and jb.depth_ms == pytest.approx(500.0)


def test_jitter_buffer_wait_is_measured() -> None:
    jb = JitterBuffer(target_ms=40.0)
    for _ in range(10):  # 20 ms pages, popped every 80 ms as the frame loop does
        for _ in range(4):
            jb.push(np.zeros(480, np.float32))
            time.sleep(0.02)
        jb.pop()
    assert jb.wait_ms is not None and 60.0 < jb.wait_ms < 250.0


def test_a_client_that_does_not_read_its_replies_is_ended() -> None:
    from personaplex_edge.runtime.network.link import Link

    woken = []
    link = Link("192.0.2.4", "copilot", JitterBuffer(), max_replies=3)
    link.wake = lambda: woken.append(1)
    for _ in range(3):
        link.deliver(np.zeros(FRAME_SAMPLES, np.float32), "")
    assert not link.closed
    link.deliver(np.zeros(FRAME_SAMPLES, np.float32), "")  # the fourth finds the queue full
    assert link.closed and link.reason.startswith("slow reader: 3 reply frames (240 ms)")
    assert len(link.take()) == 3 and woken
    link.end("later reason")
    assert link.reason.startswith("slow reader")  # the first reason stays


class _FrameLoopStandIn:
    """The daemon as the endpoint sees it, with a frame loop that answers only when told."""

    def __init__(self) -> None:
        self.opens: list = []
        self.refused = 0

    def network_open(self, request, peer):
        from concurrent.futures import Future

        future: Future = Future()
        self.opens.append(future)
        return future

    def network_refused(self) -> None:
        self.refused += 1

    def network_bytes(self, direction: str, count: int) -> None:
        pass

    def network_decode_error(self) -> None:
        pass

    def network_rtt(self, seconds: float | None) -> None:
        pass

    def wait_open(self, n: int) -> object:
        deadline = time.monotonic() + 10
        while len(self.opens) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.opens[n - 1]


def test_clients_waiting_for_the_model_always_get_an_answer() -> None:
    pytest.importorskip("websockets")
    pytest.importorskip("av")
    from personaplex_edge.runtime.errors import PpxError
    from personaplex_edge.runtime.network.link import Link
    from personaplex_edge.runtime.network.server import EndpointSettings, NetworkServer
    from personaplex_edge.sim.chat_client import ChatClient

    host = _FrameLoopStandIn()
    server = NetworkServer(EndpointSettings(
        host="127.0.0.1", port=0, token=None, tls_cert=None, tls_key=None, static_dir=None,
        idle_timeout_s=10.0, max_session_s=60.0, start_timeout_s=1.0, max_message_bytes=65536,
        max_clients=4, ping_interval_s=5.0), host)
    url = f"ws://127.0.0.1:{server.start()}/api/chat"
    try:
        # A refusal whose reason is long and not ASCII: told, and closed with 1008 (not 1006).
        client = ChatClient.connect(url)
        host.wait_open(1).set_exception(PpxError("persona: ü" + "ü" * 100))
        assert client.wait_closed(5) and client.close_code == 1008, client.close_code
        assert client.errors == ["persona: ü" + "ü" * 100] and host.refused == 1

        # A start the frame loop took but did not finish in start_timeout_s: the client is told,
        # the session is ended once it exists, and counted then (as an error), not refused too.
        client = ChatClient.connect(url)
        started = host.wait_open(2)
        assert started.set_running_or_notify_cancel()
        assert client.wait_closed(5) and "not ready within 1 s" in client.errors[-1]
        link = Link("127.0.0.1", "copilot", JitterBuffer(), max_replies=4)
        started.set_result(link)
        assert link.closed and host.refused == 1

        # The daemon stops while a client waits for the model: it is told, not left hanging.
        client = ChatClient.connect(url)
        waiting = host.wait_open(3)
    finally:
        server.stop()
    assert client.wait_closed(5) and client.errors == ["the daemon is stopping"], client.errors
    assert waiting.cancelled() and host.refused == 2


def test_a_client_sending_faster_than_real_time_is_ended() -> None:
    from personaplex_edge.runtime.network.flood import FloodGuard

    guard = FloodGuard(burst_s=1.0, burst_bytes=100_000)
    for i in range(1000):  # 20 s in real time: 20 ms pages
        guard.check(i * 0.02, 120, 0.02)
    FloodGuard(1.0, 100_000).check(0.0, 5000, 1.0)  # a burst the jitter buffer holds
    guard = FloodGuard(burst_s=1.0, burst_bytes=100_000)
    with pytest.raises(ProtocolError, match=r"flood: .* s of audio in .* s \(more than 2x"):
        for i in range(1000):  # 3x real time: past the burst within a second
            guard.check(i * 0.02, 120, 0.06)
    assert guard.audio_s < 4.0
    guard = FloodGuard(burst_s=1.0, burst_bytes=100_000)
    with pytest.raises(ProtocolError, match="bytes in"):  # big messages that decode to little
        for i in range(1000):
            guard.check(i * 0.02, 65536, 0.0)
