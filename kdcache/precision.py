"""Mixed precision, one rule for build, train, online and eval: autocast only on CUDA, fp32 everywhere else."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for fp16/bf16 on a CUDA device; a no-op for fp32 and on any other device."""
    amp = AMP_DTYPES.get(precision) if device.type == "cuda" else None
    return torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
