"""Facts every stage shares, in one place and import-light (the CLI reads them for its option choices)."""

TOWERS = ("image", "text")
PRECISIONS = ("fp32", "fp16", "bf16")
EMBED_DTYPES = ("fp16", "fp32", "int8")
# PIL's own decompression-bomb threshold. Larger images are rejected as too_large (checked from the header) by the
# build, and decoded with the same limit by the student's loader and by eval.
DEFAULT_MAX_PIXELS = 89_478_485
