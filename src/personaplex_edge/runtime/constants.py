"""Frame and token constants shared by the export toolchain and the runtime.

Values follow PersonaPlex-7B / Moshi (see shared/reference/personaplex.md).
"""

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SAMPLES = 1920  # one 80 ms frame at 24 kHz

# Special token ids in the LM input streams.
ZERO_TOKEN = -1  # contributes an all-zero embedding
UNGENERATED_TOKEN = -2
TEXT_PADDING_ID = 3  # `existing_text_padding_id`, also the "zero text" code of prompts
TEXT_END_PADDING_ID = 0

# Token ids the real Mimi gives for the two fixed prompt inputs (upstream constants).
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
