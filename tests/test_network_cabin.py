"""Sharing the model with the cabin (network.policy): the driver takes it back by speaking."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import numpy as np
import pytest
from network_kit import start_net_daemon

from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.network.protocol import ChatRequest
from personaplex_edge.runtime.service.config import NetworkConfig, PersonaConfig
from personaplex_edge.runtime.service.metrics import Metrics
from personaplex_edge.runtime.service.network_seat import NetworkSeat, Refused
from personaplex_edge.sim.chat_client import ChatClient
from personaplex_edge.sim.daemon import samples, scrape
from personaplex_edge.sim.shipped import driver_wav

pytest.importorskip("websockets")
pytest.importorskip("av")


def test_the_driver_takes_the_model_back_over_tls(tiny_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("alsaaudio")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    from personaplex_edge.runtime.audio.files import read_audio

    # TLS from certificate files on the way: a self-signed pair for 127.0.0.1.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    # The driver speaks from the moment the microphone opens (then silence).
    d = start_net_daemon(tmp_path, tiny_build, read_audio(driver_wav()),
                         "policy: when-cabin-idle, cabin_idle_s: 0, takeback_ms: 240, "
                         f"tls_cert: {cert}, tls_key: {key}")
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        client = ChatClient.connect(d.url("seed=3", scheme="wss"), ssl=context)
        client.wait_handshake()
        for page in client.encode(np.zeros(24000 * 2, np.float32)):
            client.send_audio(page)
        assert client.wait_closed(20), "the cabin did not take the model back"
        assert client.errors == ["the driver is speaking: the cabin takes the model back"]
        assert client.close_code == 1000  # a clean close: nothing wrong with the client
        status = d.wait_idle()
        assert "driver" in status["network"]["last_end"]
        values = samples(scrape(d.metrics_port))
        assert values['ppx_conversation_starts_total{reason="network_end"}'] == 1
        assert values['ppx_network_sessions_total{end="error"}'] == 1
        assert status["audio"]["dropped_frames"] == 0 and status["frame_errors"] == 0
    finally:
        output = d.stop()
    assert d.proc.returncode == 0 and "Traceback" not in output, output


@pytest.fixture(scope="module")
def conversation(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Conversation:
    manifest = load_manifest(tiny_build)
    session = Session(manifest, make_backend("ort-cpu", 1), tmp_path_factory.mktemp("snap"))
    conv = Conversation(session)
    conv.switch_persona(load_persona("copilot"))
    return conv


def _seat(conversation: Conversation, **cfg) -> NetworkSeat:
    cabin = load_persona("copilot")
    return NetworkSeat(NetworkConfig(enabled=True, **cfg), PersonaConfig(), 250, conversation,
                       Metrics(device_metrics=False), cabin_persona=lambda: cabin,
                       give_back=lambda reason: conversation.switch_persona(cabin))


def test_policy_decides_who_has_the_model(conversation: Conversation) -> None:
    with pytest.raises(Refused, match="network.policy is off"):
        _seat(conversation, policy="off").open(ChatRequest(), "192.0.2.9")
    conversation.switch_persona(load_persona("copilot"))  # a conversation just started
    with pytest.raises(Refused, match="the cabin is in a conversation"):
        _seat(conversation, policy="when-cabin-idle", cabin_idle_s=5).open(ChatRequest(), "x")
    seat = _seat(conversation, policy="exclusive")
    link = seat.open(ChatRequest(seed=1), "x")  # exclusive: the cabin's state does not matter
    with pytest.raises(Refused, match="busy"):
        seat.open(ChatRequest(), "y")
    link.end(None)
    assert not seat.frame(np.zeros(1920, np.float32))  # ended: the frame is the cabin's again
    assert not seat.active


def test_a_client_may_reconnect_before_the_next_frame(conversation: Conversation) -> None:
    seat = _seat(conversation, policy="exclusive")
    seat.open(ChatRequest(seed=1), "x").end(None)  # ended on the network thread
    link = seat.open(ChatRequest(seed=1), "x")  # no frame in between: not "busy"
    assert seat.link is link and not link.closed and seat.sessions == 2
    assert seat.last_end == "client closed"
    link.end(None)
    assert not seat.frame(np.zeros(1920, np.float32))


def test_a_quiet_driver_during_a_session_counts_as_a_quiet_cabin(conversation) -> None:
    from dataclasses import replace

    conversation.switch_persona(load_persona("copilot"))
    seat = _seat(conversation, policy="when-cabin-idle", cabin_idle_s=0.0)
    link = seat.open(ChatRequest(seed=1), "x")
    for _ in range(20):  # 1.6 s of a silent cabin microphone while the session runs
        assert seat.frame(np.zeros(1920, np.float32))
    link.end(None)
    assert not seat.frame(np.zeros(1920, np.float32))  # given back: a fresh cabin conversation
    assert conversation.quiet_frames == 0
    seat.cfg = replace(seat.cfg, cabin_idle_s=1.0)
    assert seat.cabin_quiet_frames >= 20
    seat.open(ChatRequest(seed=1), "x").end(None)  # reconnecting does not wait cabin_idle_s again
    seat.frame(np.zeros(1920, np.float32))
    fresh = _seat(conversation, policy="when-cabin-idle", cabin_idle_s=1.0)
    with pytest.raises(Refused, match="quiet for 0.0 s"):
        fresh.open(ChatRequest(), "x")


def test_the_quiet_carried_over_ends_with_the_next_cabin_conversation(conversation) -> None:
    conversation.switch_persona(load_persona("copilot"))
    seat = _seat(conversation, policy="when-cabin-idle", cabin_idle_s=0.0)
    link = seat.open(ChatRequest(seed=1), "x")
    for _ in range(20):  # 1.6 s of a quiet driver during the session
        assert seat.frame(np.zeros(1920, np.float32))
    link.end(None)
    assert not seat.frame(np.zeros(1920, np.float32))  # given back: the quiet carries over
    assert seat.cabin_quiet_frames >= 20
    conversation.switch_persona(load_persona("copilot"))  # then the head unit resets
    assert seat.cabin_quiet_frames == 0  # a conversation of its own: the carry is gone


def test_the_drivers_vad_is_loaded_before_any_session(conversation) -> None:
    assert _seat(conversation, policy="when-cabin-idle")._vad is not None  # not on a frame
    assert _seat(conversation, policy="exclusive")._vad is None  # nobody watches the driver
    seat = _seat(conversation, policy="exclusive")
    with pytest.raises(PpxError):  # refused half-way (a voice the build lacks): no session
        seat.open(ChatRequest(voice_prompt="NOBODY"), "x")
    assert not seat.active and seat.sessions == 0


def test_snapshots_of_clients_prompts_are_capped(conversation) -> None:
    from personaplex_edge.runtime.service.network_seat import NETWORK_SNAPSHOTS

    root = conversation.session.snapshot_dir
    seat = _seat(conversation, policy="exclusive")
    prompts = [f"You are network test number {i}." for i in range(NETWORK_SNAPSHOTS + 2)]
    for prompt in prompts + prompts[-1:]:  # the last one again: restored, not compiled
        seat.open(ChatRequest(text_prompt=prompt, seed=1), "x").end(None)
        assert not seat.frame(np.zeros(1920, np.float32))
    kept = sorted(root.rglob("net-*.npz"))
    assert len(kept) == NETWORK_SNAPSHOTS, kept  # ~120 MB each on the 7B: no client fills the disk
    last = conversation.session.snapshot_path(seat.persona_for(ChatRequest(text_prompt=prompts[-1])))
    assert last in kept
    assert list(root.glob("copilot-*.npz"))  # the cabin's own snapshots are not the network's


def test_the_clients_prompt_becomes_a_persona_with_clamped_sampling(conversation) -> None:
    seat = _seat(conversation)
    persona = seat.persona_for(ChatRequest(text_prompt="You are a test.", voice_prompt="",
                                           text_temperature=9.0, text_topk=100000,
                                           audio_temperature=-1.0, audio_topk=0))
    assert persona.name == "net-copilot" and persona.prompt == "You are a test."
    s = persona.sampling
    assert (s.text_temperature, s.text_top_k, s.audio_temperature, s.audio_top_k) == (2.0, 250, 0.0, 1)
    assert seat.persona_for(ChatRequest()) .prompt == load_persona("copilot").prompt
