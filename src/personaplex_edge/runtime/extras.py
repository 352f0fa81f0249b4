"""What each optional package is for and how to install it: a missing one is one line.

The runtime imports its optional packages where it first needs them (the device daemon stays
lean, and `check` runs anywhere). A `ModuleNotFoundError` for one of them reaching the command
line becomes a configuration error (exit 78, so systemd does not restart-loop on it) that names
the package, what needs it and the pip line; any other missing module is a bug and stays a
traceback.
"""

from __future__ import annotations

from personaplex_edge.runtime.errors import ConfigError

# top-level module: (what needs it, how to install it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "onnxruntime": ("the ort-* backends and the driver's voice activity detector",
                    "pip install 'personaplex-edge[onnx]' (a TensorRT install: "
                    "'personaplex-edge[vad]'; on a Jetson, NVIDIA's onnxruntime-gpu wheel for "
                    "this JetPack)"),
    "alsaaudio": ("the cabin's microphone and speakers (pyalsaaudio)",
                  "pip install 'personaplex-edge[device]' (it builds against libasound2-dev)"),
    "prometheus_client": ("the daemon's metrics endpoint",
                          "pip install 'personaplex-edge[device]'"),
    "pywebrtc_audio": ("echo_cancel: webrtc (WebRTC AEC3)", "pip install 'personaplex-edge[aec]'"),
    "websockets": ("the network endpoint (network.enabled)", "pip install 'personaplex-edge[network]'"),
    "av": ("the network endpoint's Ogg/Opus audio (PyAV)", "pip install 'personaplex-edge[network]'"),
    "matplotlib": ("play --report", "pip install 'personaplex-edge[report]'"),
    "cryptography": ("signed build bundles (ppx-runtime update, ppx-export bundle and keygen)",
                     "pip install 'personaplex-edge[update]'"),
    "zstandard": ("zstd-compressed build bundles", "pip install 'personaplex-edge[update]'"),
    "cuda": ("the tensorrt backend (cuda-python)",
             "pip install 'personaplex-edge[tensorrt-cu12]' (or -cu13, jetpack6, jetpack7)"),
    "tensorrt": ("the tensorrt backend", "pip install 'personaplex-edge[tensorrt-cu12]' (or "
                 "-cu13; on a Jetson JetPack's python3-libnvinfer)"),
}


def missing_extra(exc: ModuleNotFoundError) -> ConfigError | None:
    """The one-line error for a missing optional package, or None for any other module."""
    top = (exc.name or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    needed_by, install = OPTIONAL[top]
    return ConfigError(f"{top} is not installed; {needed_by} needs it: {install}")
