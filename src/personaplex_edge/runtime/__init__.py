"""The on-device runtime: PersonaPlex on a Jetson, without torch or the export stack.

Rooms, each depending only on the ones listed before it:
- `core`: one conversation's inference - build manifests, personas, the LM's
  token state machine, snapshots, `Session`;
- `backends`: the interface `core` runs graphs through, and its ONNX Runtime
  and TensorRT implementations (`registry` picks one by name);
- `audio`: audio files, loudness, resampling and the ALSA cabin devices;
- `play`: a recorded conversation through the runtime (`ppx-runtime play`);
- `service`: the daemon and what it serves - configuration, control socket,
  metrics, systemd notify, logging, `check`.
`constants`, `errors`, `yaml_schema`, `utf8` and `console` are shared by every
room (and by the export toolchain).
"""
