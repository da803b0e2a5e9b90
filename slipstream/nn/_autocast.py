"""Autocast helpers shared by the low-precision modules."""

from __future__ import annotations

from typing import Optional

import torch


def active_autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device type, or None when autocast is off there."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_optional(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, passing None through (norms without affine parameters)."""
    return None if t is None else t.to(dtype)
