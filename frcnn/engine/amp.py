"""Mixed precision switches shared by training and inference: off | fp16 | bf16."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def _dtype(amp: str) -> torch.dtype | None:
    if amp not in AMP_DTYPES:
        raise ValueError(f"solver.amp: unknown mode {amp!r}; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the device's type (CPU bf16 works), or a no-op when ``off``."""
    dtype = _dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only: bf16 has float32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=_dtype(amp) is torch.float16)
