"""Autocast helpers shared by the low-precision and fused norm modules."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from slipstream.surgery import SurgeryWarning


#: The dtypes autocast casts; it leaves any other input (float64, integers) as it is.
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def active_autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``, or None when autocast is off there or would leave ``x`` alone.

    Example:
        >>> with torch.autocast('cpu', dtype=torch.bfloat16):
        ...     active_autocast_dtype(torch.ones(1)), active_autocast_dtype(torch.ones(1, dtype=torch.float64))
        (torch.bfloat16, None)
    """
    if x.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type without autocast (meta tensors: shape tracing, deferred init)
        return None
    return torch.get_autocast_dtype(device_type)


def cast_optional(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, passing None through (norms without affine parameters)."""
    return None if t is None else t.to(dtype)


def uses_timm_fast_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a timm norm with timm's "fast norm" on (then warn that surgery leaves it alone).

    Such a norm computes in the autocast dtype, where the fused norms compute in fp32: other math.
    """
    if getattr(module, "_fast_norm", False):
        warnings.warn(
            f"surgery left {type(module).__name__} alone: timm's fast norm is on for it, which computes in the "
            "autocast dtype, and the fused norm computes in fp32",
            SurgeryWarning,
            stacklevel=5,
        )
        return True
    return False
