"""GroupNorm replacements: low-precision (under autocast) and fused (Triton)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn._autocast import active_autocast_dtype, cast_optional
from slipstream.ops._backend import triton_available
from slipstream.ops.group_norm import ACTIVATIONS, group_norm

__all__ = ["LPGroupNorm", "FusedGroupNorm"]


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
    autocast off, so its output is in that dtype. On CUDA (with Triton) it instead runs slipstream's
    GroupNorm kernel, which reads them as they are (any layout), computes in fp32 and writes the
    autocast dtype: the same result without the casts and layout copies around PyTorch's kernel.
    Outside autocast it is exactly ``nn.GroupNorm``.

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
        if x.is_cuda and triton_available():
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, out_dtype=dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(
                x.to(dtype), self.num_groups, cast_optional(self.weight, dtype),
                cast_optional(self.bias, dtype), self.eps,
            )


class FusedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed by slipstream's Triton kernels, optionally with SiLU fused after it.

    Same parameters and ``state_dict`` as ``nn.GroupNorm``. On CUDA it runs
    :func:`slipstream.ops.group_norm`'s kernels (one launch forward, fp32 math, contiguous and
    channels_last inputs read in place); elsewhere their pure-PyTorch fallback. It writes its input's
    dtype, or the autocast dtype under autocast; backward writes dx in the input's dtype and the
    parameter gradients in the parameters' dtype. ``activation='silu'`` computes
    ``silu(group_norm(x))`` in the same kernels.

    Example:
        >>> gn = FusedGroupNorm(2, 4, activation='silu')
        >>> x = torch.randn(3, 4, 5, 5)
        >>> ref = F.silu(F.group_norm(x, 2, gn.weight, gn.bias, gn.eps))
        >>> torch.allclose(gn(x), ref, atol=1e-5)
        True
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = None, **kwargs) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; allowed values: {ACTIVATIONS}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)
        self.activation = activation

    @classmethod
    def from_module(cls, module: nn.GroupNorm, activation: Optional[str] = None) -> "FusedGroupNorm":
        """A replacement with ``module``'s configuration (surgery then adopts its Parameters)."""
        return cls(**_group_norm_config(module), activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                          out_dtype=active_autocast_dtype(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation!r}")
