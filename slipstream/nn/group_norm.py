"""GroupNorm replacements: low-precision (under autocast) and fused (Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn._autocast import active_autocast_dtype, cast_optional

__all__ = ["LPGroupNorm"]


def _group_norm_config(module: nn.GroupNorm) -> dict:
    """Constructor arguments that rebuild ``module``'s configuration on its device and dtype."""
    param = module.weight if module.weight is not None else module.bias
    config = dict(
        num_groups=module.num_groups,
        num_channels=module.num_channels,
        eps=module.eps,
        affine=module.affine,
        device=None if param is None else param.device,
        dtype=None if param is None else param.dtype,
    )
    if module.affine and module.bias is None:  # torch >= 2.6 allows GroupNorm(bias=False)
        config["bias"] = False
    return config


class LPGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that runs in the autocast dtype (fp16/bf16) instead of being upcast to fp32.

    Under autocast, input, weight and bias are cast to the autocast dtype and the norm runs with
    autocast off, so its output is in that dtype. Outside autocast it is exactly ``nn.GroupNorm``.

    Example:
        >>> gn = LPGroupNorm(2, 4)
        >>> with torch.autocast('cpu', dtype=torch.bfloat16):
        ...     gn(torch.randn(2, 4, 3, 3)).dtype
        torch.bfloat16
    """

    @classmethod
    def from_module(cls, module: nn.GroupNorm) -> "LPGroupNorm":
        """A replacement with ``module``'s configuration (surgery then adopts its Parameters)."""
        return cls(**_group_norm_config(module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = active_autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(
                x.to(dtype), self.num_groups, cast_optional(self.weight, dtype),
                cast_optional(self.bias, dtype), self.eps,
            )
