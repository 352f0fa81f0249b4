"""The audio path: files, loudness, streaming DSP and the ALSA cabin devices (no model code)."""
