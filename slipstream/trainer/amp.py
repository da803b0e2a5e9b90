"""Mixed precision for the Trainer: the default precision per device, autocast, and fp16's GradScaler."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from slipstream.precision import autocast_dtype, validate_precision

__all__ = ["resolve_precision", "autocast", "grad_scaler"]


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """``precision``, checked against ``device``; ``None`` picks the default.

    The default is ``'amp_bf16'`` on GPUs that support bf16, ``'amp_fp16'`` on older GPUs and
    ``'fp32'`` on the CPU. ``'amp_fp16'`` needs a GPU (CPU autocast has no fp16 path worth using).

    Example:
        >>> resolve_precision(None, torch.device('cpu'))
        'fp32'
    """
    if precision is None:
        if device.type != "cuda":
            return "fp32"
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    precision = validate_precision(precision)
    if precision == "amp_fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='amp_fp16' needs a CUDA device, but the trainer runs on {device}; "
            "on the CPU use precision='fp32' or 'amp_bf16'"
        )
    if precision == "amp_bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='amp_bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                         "use 'amp_fp16' or 'fp32'")
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for ``'fp32'``).

    Example:
        >>> with autocast('amp_bf16', torch.device('cpu')):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for ``'amp_fp16'`` (fp16 gradients underflow without one), else None.

    Example:
        >>> grad_scaler('amp_bf16', torch.device('cpu')) is None
        True
    """
    if precision != "amp_fp16":
        return None
    return torch.amp.GradScaler(device.type)
