"""The network endpoint in the real daemon: PersonaPlex's protocol with a real websocket client,
real Ogg/Opus, the tiny build on the virtual cabin; every bad input ends only its own client."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from network_kit import TOKEN, NetDaemon, lan_address, start_net_daemon

from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.runtime.network.opus import OpusDecoder
from personaplex_edge.sim.chat_client import ChatClient
from personaplex_edge.sim.shipped import speech

CHAT_PAGE = Path(__file__).parent / "data" / "chat_page"  # a small client of the protocol

pytest.importorskip("alsaaudio")
pytest.importorskip("websockets")
pytest.importorskip("av")


@pytest.fixture(scope="module")
def daemon(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory):
    """A silent cabin, the endpoint on every interface (loopback free, the LAN with the token)."""
    tmp = tmp_path_factory.mktemp("net")
    (tmp / "personas").mkdir()  # read at each switch: a test may add a file
    d = start_net_daemon(tmp, tiny_build, np.zeros(24000, np.float32), (
        f"host: 0.0.0.0, token: {TOKEN}, cabin_idle_s: 0, idle_timeout_s: 3, "
        f"jitter_max_ms: 20000, jitter_trim_s: 0, max_message_bytes: 8192, static_dir: {CHAT_PAGE}"),
        persona=f"default: copilot, persona_dirs: [{tmp / 'personas'}]")
    yield d
    run_s = time.monotonic() - d.ready_at
    output = d.stop()
    assert d.proc.returncode == 0, output
    assert "Traceback" not in output, output
    # Through every session and every bad client the cabin speaker got a continuous stream:
    # its length follows the wall clock (as in test_serve).
    played_s = len(d.cabin.read_speaker()) / 48000
    assert played_s > run_s - 1.0, (played_s, run_s)


def test_reply_tokens_equal_play_for_the_same_decoded_input(daemon: NetDaemon, tiny_build: Path,
                                                              tmp_path: Path) -> None:
    client = ChatClient.connect(daemon.url("text_prompt=&voice_prompt=&seed=42"))
    client.wait_handshake()
    status = daemon.status()
    assert status["network"]["session"]["persona"] == "copilot", status["network"]
    pages = client.encode(speech(24000))
    for page in pages:  # all at once: the jitter buffer holds them (jitter_max_ms: 20000, no trim)
        client.send_audio(page)
    deadline = time.monotonic() + 60
    while len(client.pages) < len(pages) + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    client.close()
    assert client.wait_closed()
    daemon.wait_idle()
    assert not client.errors, client.errors

    # What the model heard: the same pages through the same decoder, as play reads a file.
    decoder = OpusDecoder()
    heard = np.concatenate([decoder.feed(p) for p in pages])
    n = len(heard) // FRAME_SAMPLES
    wav = tmp_path / "heard.wav"
    sf.write(str(wav), heard, 24000, subtype="FLOAT")  # bit for bit what the model heard
    from personaplex_edge.runtime.play.run import play

    offline = play(wav, tiny_build, "copilot", seed=42, backend="ort-cpu", threads=1,
                   snapshot_dir=tmp_path / "snapshots")
    served = np.load(next(daemon.tokens.glob("session-*.npz")))["out_tokens"]
    assert served.shape[0] >= n
    np.testing.assert_array_equal(served[:n], offline.out_tokens[:n])
    # The text pieces the client got begin with play's pieces for the same frames.
    assert "".join(client.text).startswith("".join(offline.pieces[:n]))
    reply = client.reply_pcm()
    assert len(reply) >= (n - 2) * FRAME_SAMPLES and np.isfinite(reply).all()


def _refused(daemon: NetDaemon, query: str) -> ChatClient:
    client = ChatClient.connect(daemon.url(query))
    assert client.wait_closed(15)
    return client


def _ended_by(client: ChatClient, send: bytes | str, timeout: float = 15.0) -> str:
    """Send one message after the handshake; the error message the server answers with."""
    client.wait_handshake()
    client.send(send)
    assert client.wait_closed(timeout), "the server did not close the connection"
    assert client.errors, f"closed ({client.close_code}) without an error message"
    return client.errors[-1]


def test_bad_input_ends_only_that_client_and_the_cabin_keeps_running(daemon: NetDaemon) -> None:
    from personaplex_edge.runtime.network import protocol
    from personaplex_edge.runtime.network.protocol import Kind

    before = daemon.status()
    # Bad queries: refused before the model is touched.
    assert "seed" in _refused(daemon, "seed=abc").errors[0]
    assert "persona" in _refused(daemon, "persona=nope").errors[0]
    assert "voice" in _refused(daemon, "voice_prompt=NOBODY.pt").errors[0]

    url = daemon.url("seed=1")
    garbage = _ended_by(ChatClient.connect(url), protocol.message(Kind.AUDIO, b"not ogg at all"))
    assert "not an Ogg stream" in garbage
    daemon.wait_idle()

    # A well-formed Ogg stream whose Opus packet does not decode.
    client = ChatClient.connect(url)
    headers = client.encode(np.zeros(FRAME_SAMPLES, np.float32))[0]
    client.wait_handshake()
    client.send_audio(headers)
    bad_page = client._encoder._ogg.page([b"\xff\xff\xff"], 99999)  # the same stream's next page
    assert "does not decode" in _ended_by(client, protocol.message(Kind.AUDIO, bad_page))
    daemon.wait_idle()

    for message, expected in ((protocol.message(Kind.TEXT, b"hello"), "kind 2 (text)"),
                              (b"", "empty"), ("a text frame", "text frames"),
                              (bytes([9]), "unknown kind 9"),
                              (protocol.message(Kind.AUDIO, b"\0" * 9000), "max_message_bytes")):
        client = ChatClient.connect(url)
        assert expected in _ended_by(client, message), client.errors
        assert client.close_code == 1008
        daemon.wait_idle()

    # Far beyond the limit: websockets closes with 1009 before buffering it.
    client = ChatClient.connect(url)
    client.wait_handshake()
    client.send(b"\1" + b"\0" * 40000)
    assert client.wait_closed(10) and client.close_code == 1009
    daemon.wait_idle()

    # One session at a time: a second client is refused while the first has the model.
    first = ChatClient.connect(url)
    first.wait_handshake()
    second = _refused(daemon, "seed=2")
    assert "busy" in second.errors[0], second.errors
    # Idle: no audio for network.idle_timeout_s (3 s) ends the first one.
    assert first.wait_closed(10) and "idle" in first.errors[-1], first.errors
    daemon.wait_idle()

    # A client that vanishes mid-reply (no close frame): its session ends, the next one works.
    client = ChatClient.connect(url)
    client.wait_handshake()
    for page in client.encode(speech(24000, seconds=2.0)):
        client.send_audio(page)
    time.sleep(0.5)
    client.ws.socket.close()
    daemon.wait_idle()
    again = ChatClient.connect(url)
    again.wait_handshake()
    again.close()
    daemon.wait_idle()

    # The cabin went on through all of it: no captured frame dropped, the speaker fed.
    after = daemon.status()
    assert after["frames"] > before["frames"] + 50
    assert after["audio"]["dropped_frames"] == before["audio"]["dropped_frames"] == 0
    assert after["audio"]["overruns"] == 0 and after["frame_errors"] == 0
    assert after["network"]["sessions"] >= 10


def test_a_client_that_goes_quiet_after_a_little_audio_is_idle(daemon: NetDaemon) -> None:
    # One 80 ms page: less than the jitter buffer's start level, so it stays there for good.
    client = ChatClient.connect(daemon.url("seed=1"))
    client.wait_handshake()
    sent = time.monotonic()
    client.send_audio(client.encode(np.zeros(FRAME_SAMPLES, np.float32))[0])
    assert client.wait_closed(10), "no idle end: the buffered remnant kept the session alive"
    assert "idle" in client.errors[-1], client.errors
    assert 3.0 <= time.monotonic() - sent < 6.0  # idle_timeout_s (3 s) after the audio
    daemon.wait_idle()


def test_network_clients_need_the_token(daemon: NetDaemon) -> None:
    from websockets.exceptions import InvalidStatus

    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback address")
    for query, headers in (("seed=1", None), ("worker_auth_id=wrong-token-000000", None)):
        with pytest.raises(InvalidStatus) as refused:
            ChatClient.connect(daemon.url(query, host=lan), headers=headers)
        assert refused.value.response.status_code == 401
    for query, headers in ((f"worker_auth_id={TOKEN}", None),
                           ("", {"Authorization": f"Bearer {TOKEN}"})):
        client = ChatClient.connect(daemon.url(query, host=lan), headers=headers)
        client.wait_handshake()
        client.close()
        daemon.wait_idle()


def test_static_files(daemon: NetDaemon) -> None:
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/", timeout=10) as page:
        assert b"<title>PersonaPlex Edge: talk to the car</title>" in page.read()
        assert page.headers["Content-Type"].startswith("text/html")
    for path in ("/missing.js", "/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/%00"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}", timeout=10)
        assert missing.value.code == 404


def test_metrics_and_status_tell_the_sessions(daemon: NetDaemon) -> None:
    from personaplex_edge.runtime.network import protocol
    from personaplex_edge.runtime.network.protocol import Kind
    from personaplex_edge.sim.daemon import samples, scrape

    client = ChatClient.connect(daemon.url("seed=1"))
    client.wait_handshake()
    for page in client.encode(speech(24000, seconds=2.0)):
        client.send_audio(page)
    time.sleep(1.0)
    session = daemon.status()["network"]["session"]
    assert session["bytes_in"] > 1000 and session["reply_frames"] > 0
    assert set(session["jitter"]) == {"depth_ms", "wait_ms", "underruns", "overflows", "drops"}
    client.send(protocol.message(Kind.AUDIO, b"garbage"))
    assert client.wait_closed(10)
    daemon.wait_idle()
    _refused(daemon, "seed=abc")
    values = samples(scrape(daemon.metrics_port))
    assert values['ppx_network_bytes_total{direction="in"}'] > 1000
    assert values['ppx_network_bytes_total{direction="out"}'] > 1000
    assert values["ppx_network_decode_errors_total"] >= 1
    assert values['ppx_network_sessions_total{end="refused"}'] >= 1
    assert values["ppx_network_session_active"] == 0
    assert "ppx_network_jitter_wait_seconds" in values
    assert "ppx_network_jitter_drops_total" in values


def test_a_clients_prompt_is_compiled_once_and_restored_after(daemon: NetDaemon) -> None:
    query = "text_prompt=You%20are%20a%20network%20test.&voice_prompt=&seed=5"
    ready = []
    for _ in range(2):
        client = ChatClient.connect(daemon.url(query))
        client.wait_handshake()  # sent once the persona is ready: its state is in place now
        session = daemon.status()["network"]["session"]
        assert session["persona"] == "net-copilot"
        ready.append(session["ready"])
        client.close()
        daemon.wait_idle()
    assert ready[0]["compiled"] and not ready[1]["compiled"], ready
    assert ready[1]["ms"] < 100, ready


def test_a_browser_talks_to_the_car(daemon: NetDaemon, tmp_path: Path) -> None:
    """Headless Chromium with a fake microphone loads the chat page from the daemon (static
    files), streams the microphone as Ogg/Opus, and gets the reply's audio and text back."""
    import json
    import shutil
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from personaplex_edge.sim.daemon import free_port

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here")
    reports: list[dict] = []
    got = threading.Event()

    class Report(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            reports.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            got.set()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Report)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mic = tmp_path / "mic.wav"
    import soxr

    from personaplex_edge.runtime.audio.files import read_audio
    from personaplex_edge.sim.shipped import driver_wav

    sf.write(str(mic), soxr.resample(read_audio(driver_wav()), 24000, 48000), 48000,
             subtype="PCM_16")
    url = (f"http://127.0.0.1:{daemon.port}/?seconds=6&report={server.server_address[1]}")
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                             f"--use-file-for-fake-audio-capture={mic}",
                             "--autoplay-policy=no-user-gesture-required", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert got.wait(90), "the page reported nothing"
    finally:
        proc.kill()
        output = proc.communicate()[0]
        server.shutdown()
    report = reports[0]
    assert report["handshake"], (report, output[-3000:])
    assert not report["errors"], report
    assert report["sentPages"] > 100  # 6 s of 20 ms packets
    assert report["replyPages"] > 40 and report["replySamples"] > 48000 * 2, report
    assert report["text"], report
    daemon.wait_idle()


def test_the_head_unit_wins(daemon: NetDaemon) -> None:
    import subprocess
    import sys

    from personaplex_edge.sim.daemon import ctl_json, samples, scrape

    client = ChatClient.connect(daemon.url("seed=4"))
    client.wait_handshake()
    for page in client.encode(speech(24000)):  # 8 s buffered: not idle while ctl runs
        client.send_audio(page)
    # A switch the model refuses (a voice the build lacks) leaves the session as it was.
    (daemon.config.parent / "personas" / "novoice.yaml").write_text(
        "name: novoice\nvoice: NOPE\nprompt: Be brief.\n")
    refused = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl",
                              "--config", str(daemon.config), "persona", "novoice"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "NOPE" in refused.stderr, refused.stderr
    assert not client.wait_closed(0.5) and daemon.status()["network"]["session"] is not None
    before = samples(scrape(daemon.metrics_port))
    assert ctl_json(daemon.config, "reset")["ok"]
    assert client.wait_closed(10)
    assert client.errors == ["the head unit reset the conversation: the cabin takes the model back"]
    status = daemon.wait_idle()
    assert status["persona"] == "copilot"
    after = samples(scrape(daemon.metrics_port))
    starts = 'ppx_conversation_starts_total{reason="%s"}'
    # One cabin conversation, the reset's: the session's end does not start another one.
    assert after[starts % "reset"] == before.get(starts % "reset", 0) + 1
    assert after[starts % "network_end"] == before.get(starts % "network_end", 0)
