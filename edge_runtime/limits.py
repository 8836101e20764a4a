"""The bounds every entry point holds numbers to, in one place: the CLI's options, the server's
fields and ``SamplingParams`` refuse the same values with the same words.

Light on purpose (no imports): the CLI reads these while it builds its options.
"""

MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "random seed"
MAX_C_INT = 2**31 - 1  # every integer that reaches a native library fits its C int
MAX_REPEAT_PENALTY = 10.0
MAX_JSON_DEPTH = 64  # deeper than any document we read or write; Python's decoder recurses per level
