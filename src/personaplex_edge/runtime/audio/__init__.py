"""The audio path: files, loudness, streaming DSP, voice activity and the ALSA cabin devices."""
