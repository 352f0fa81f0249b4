"""The virtual cabin: devices, acoustics and probes for tests, benchmarks and trying the daemon
without hardware.

    devices        virtual ALSA devices (alsa-lib's file plugins over null or the clocked
                   ppx_clock plugin this module compiles): a microphone and a speaker as files
    try_daemon     `make try`: serve on those devices for a person, ctl from another terminal
    daemon         `ppx-runtime serve` on those devices: its config, a stand-in for systemd's
                   notify socket, requests to its control socket
    noise          road, tyre and engine noise, seeded; mixing at an SNR
    acoustics      the cabin's echo path: impulse responses, loudspeaker, scenes and metrics
    cabin          the cabin as a process: what a daemon plays comes back on its microphone
    latency_probe  mic-to-speaker latency of `serve`, timed with clicks on the clocked devices
    speech_corpus  speech with pauses, its per-frame truth and noise (voice activity)
    shipped        where the repository's speech and impulse responses are (tests/data)
    builds         builds made wrong on purpose (scrambled weights) for verify's tests and bench

Only tests, bench/ and tools import it: the runtime and the export never do.
"""
