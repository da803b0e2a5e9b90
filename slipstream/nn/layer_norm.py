"""LayerNorm replacements: low-precision (under autocast) and fused (Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn._autocast import active_autocast_dtype, cast_optional

__all__ = ["LPLayerNorm"]


def _layer_norm_config(module: nn.LayerNorm) -> dict:
    """Constructor arguments that rebuild ``module``'s configuration on its device and dtype."""
    param = module.weight if module.weight is not None else module.bias
    return dict(
        normalized_shape=module.normalized_shape,
        eps=module.eps,
        elementwise_affine=module.elementwise_affine,
        bias=module.bias is not None,
        device=None if param is None else param.device,
        dtype=None if param is None else param.dtype,
    )


class LPLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that runs in the autocast dtype (fp16/bf16) instead of being upcast to fp32.

    Under autocast, input, weight and bias are cast to the autocast dtype and the norm runs with
    autocast off, so its output is in that dtype. Outside autocast it is exactly ``nn.LayerNorm``.

    Example:
        >>> ln = LPLayerNorm(8)
        >>> with torch.autocast('cpu', dtype=torch.bfloat16):
        ...     ln(torch.randn(2, 8)).dtype
        torch.bfloat16
    """

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> "LPLayerNorm":
        """A replacement with ``module``'s configuration (surgery then adopts its Parameters)."""
        return cls(**_layer_norm_config(module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = active_autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(
                x.to(dtype), self.normalized_shape, cast_optional(self.weight, dtype),
                cast_optional(self.bias, dtype), self.eps,
            )
