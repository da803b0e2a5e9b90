"""LayerNorm replacements: low-precision (under autocast) and fused (Triton)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn._autocast import active_autocast_dtype, cast_optional, uses_timm_fast_norm
from slipstream.ops._backend import triton_available
from slipstream.ops.layer_norm import layer_norm_of_module

__all__ = ["LPLayerNorm", "FusedLayerNorm", "FusedLayerNorm2d", "CHANNELS_FIRST_LAYER_NORMS"]

#: Qualified names of channels-first LayerNorms: ``nn.LayerNorm`` subclasses whose forward normalizes
#: dim 1 of an NCHW tensor (``permute(0, 2, 3, 1)``, layer_norm over the last dim, permute back).
#: :func:`slipstream.functional.apply_fused_layernorm` swaps them for :class:`FusedLayerNorm2d`.
CHANNELS_FIRST_LAYER_NORMS = ("timm.layers.norm.LayerNorm2d", "timm.models.layers.norm.LayerNorm2d")


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
    autocast off, so its output is in that dtype. On CUDA (with Triton) it instead runs slipstream's
    fused kernel, which reads them as they are, computes in fp32 and writes the autocast dtype: the
    same output dtype without the cast kernels, and statistics from the unrounded input (so not
    bit-identical to the cast path: differences of the order of the output dtype's rounding).
    Outside autocast it is exactly ``nn.LayerNorm``.

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
        if x.is_cuda and triton_available():
            # Casting first costs a kernel per tensor: an fp32 residual stream (GPT-2) came out slower.
            return layer_norm_of_module(self, x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(
                x.to(dtype), self.normalized_shape, cast_optional(self.weight, dtype),
                cast_optional(self.bias, dtype), self.eps,
            )


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by slipstream's fused Triton kernels (one launch forward, fp32 math).

    Same parameters and ``state_dict`` as ``nn.LayerNorm``. On CUDA it runs
    :func:`slipstream.ops.layer_norm`'s kernels; elsewhere their pure-PyTorch fallback. Under
    autocast it reads its input in whatever dtype arrives and writes the autocast dtype (fp32 math
    inside); its backward writes dx in the input's dtype and dW/dB in the parameters' dtype.

    Example:
        >>> ln = FusedLayerNorm(8)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(ln(x), nn.functional.layer_norm(x, (8,), ln.weight, ln.bias), atol=1e-6)
        True
    """

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> Optional["FusedLayerNorm"]:
        """A replacement with ``module``'s configuration (surgery then adopts its Parameters).

        None (with a SurgeryWarning) for a timm norm whose fast norm is on: it computes other math.
        """
        return None if uses_timm_fast_norm(module) else cls(**_layer_norm_config(module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_of_module(self, x, active_autocast_dtype(x))


class FusedLayerNorm2d(FusedLayerNorm):
    """Channels-first LayerNorm: normalizes dim 1 (channels) of an NCHW tensor, with the fused kernel.

    The math of timm's ``LayerNorm2d`` (``permute(0, 2, 3, 1)``, layer norm over channels, permute
    back), computed as :class:`FusedLayerNorm` computes it (fp32 math; under autocast the output is
    in the autocast dtype). A channels_last input is read in place: its permuted view is contiguous
    rows of channels. Same parameters and ``state_dict`` as the module it replaces.

    Example:
        >>> ln = FusedLayerNorm2d(3)
        >>> x = torch.randn(2, 3, 4, 5)
        >>> ref = F.layer_norm(x.permute(0, 2, 3, 1), (3,), ln.weight, ln.bias).permute(0, 3, 1, 2)
        >>> torch.allclose(ln(x), ref, atol=1e-6)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"FusedLayerNorm2d expects an NCHW tensor, got shape {tuple(x.shape)}")
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
