"""The on-device runtime: PersonaPlex on a Jetson, without torch or the export stack.

Layers, low to high; a module imports only its own layer and those below it
(tests/test_layering.py checks it from the imports, and that no two modules
import each other):
- `constants`, `errors`, `utf8`, `yaml_schema`, `console`: shared by every
  layer (and by the export toolchain);
- `audio`: audio files, loudness, resampling, echo cancellation, VAD and the
  ALSA cabin devices;
- `core`: one conversation's inference - build and engine manifests,
  personas, the LM's token state machine, snapshots, `Session`, and the
  `Network`/`Backend` protocols a backend implements;
- `backends`: the ONNX Runtime and TensorRT implementations (`registry`
  picks one by name); CUDA and TensorRT probing lives with the TensorRT one;
- `update`: signed build bundles, the A/B slots they install into, the health gate
  of a newly activated slot (beside `backends`: neither imports the other);
- `play` (a recorded conversation, `ppx-runtime play`) and `service` (the
  daemon and what it serves: configuration, control socket, metrics, systemd
  notify, logging, `check`);
- `cli`: `ppx-runtime`.
Nothing here imports `personaplex_edge.export`.
"""
