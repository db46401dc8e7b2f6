"""Devices and mixed precision, one rule for build, train, online and eval: autocast only on CUDA, fp32 elsewhere."""

from __future__ import annotations

import contextlib
import logging

import torch

from kdcache.constants import PRECISIONS

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for fp16/bf16 on a CUDA device; a no-op for fp32 and on any other device."""
    amp = AMP_DTYPES.get(precision) if device.type == "cuda" else None
    return torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()


def resolve_device(device: str, precision: str, *, error: type[Exception] = ValueError,
                   who: str = "the model") -> tuple[torch.device, str]:
    """Check `--device` and `--precision` before anything is loaded, raising `error` with the fix; return the device
    and the precision that will really be used (fp16/bf16 are CUDA autocast, so fp32 on any other device, with a
    warning)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise error(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device {device}: CUDA is not available (torch.cuda.is_available() is False); "
                        "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"--device {device}: MPS is not available")
    if precision not in PRECISIONS:
        raise error(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and dev.type != "cuda":
        log.warning("--precision %s uses CUDA autocast; on %s %s runs in fp32", precision, dev.type, who)
        precision = "fp32"
    return dev, precision
