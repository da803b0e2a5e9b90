"""Precision strings shared by the functional API, the algorithms and the Trainer (Composer's names)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["PRECISIONS", "validate_precision", "autocast_dtype"]

#: Allowed precision strings and the autocast dtype each one runs under (None: no autocast).
PRECISIONS: dict[str, Optional[torch.dtype]] = {
    "fp32": None,
    "amp_fp16": torch.float16,
    "amp_bf16": torch.bfloat16,
}


def validate_precision(precision: object, argument: str = "precision") -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise a ValueError listing them.

    Example:
        >>> validate_precision('amp_bf16')
        'amp_bf16'
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise ValueError(f"{argument}={precision!r} is not supported; allowed values: {allowed}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision string (None for ``'fp32'``).

    Example:
        >>> autocast_dtype('amp_fp16')
        torch.float16
    """
    return PRECISIONS[validate_precision(precision)]
