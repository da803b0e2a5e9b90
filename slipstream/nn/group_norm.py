"""GroupNorm replacements: low-precision (under autocast) and fused (Triton)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn._autocast import active_autocast_dtype, cast_optional, uses_timm_fast_norm
from slipstream.ops._backend import triton_available
from slipstream.ops.group_norm import check_activation, group_norm_of_module

__all__ = ["LPGroupNorm", "FusedGroupNorm", "fuse_silu_into_group_norms"]


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
    autocast dtype: the same output dtype without the casts and layout copies around PyTorch's kernel,
    and statistics from the unrounded input (so not bit-identical to the cast path: differences of
    the order of the output dtype's rounding).
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
            return group_norm_of_module(self, x, out_dtype=dtype)
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
        check_activation(activation)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)
        self.activation = activation

    @classmethod
    def from_module(cls, module: nn.GroupNorm, activation: Optional[str] = None) -> Optional["FusedGroupNorm"]:
        """A replacement with ``module``'s configuration (surgery then adopts its Parameters).

        None (with a SurgeryWarning) for a timm norm whose fast norm is on: it computes other math.
        """
        return None if uses_timm_fast_norm(module) else cls(**_group_norm_config(module), activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_of_module(self, x, self.activation, active_autocast_dtype(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation!r}")


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def fuse_silu_into_group_norms(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Fold each ``nn.SiLU`` that directly follows a :class:`FusedGroupNorm` in an ``nn.Sequential``.

    The norm takes ``activation='silu'`` and the SiLU's place holds an ``nn.Identity``: same math,
    one kernel instead of two. A pair is left alone when the Sequential overrides ``forward`` (the
    order of calls is then unknown), when the norm is used in several places, when the norm already
    has an activation, or when either module has hooks (they would see other tensors).

    Returns:
        ``{silu: identity}`` for each SiLU folded away.

    Example:
        >>> model = nn.Sequential(FusedGroupNorm(2, 4), nn.SiLU())
        >>> len(fuse_silu_into_group_norms(model)), model[0].activation, type(model[1]).__name__
        (1, 'silu', 'Identity')
    """
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    folded: dict[nn.Module, nn.Module] = {}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            norm, act = seq._modules[first], seq._modules[second]
            if (isinstance(norm, FusedGroupNorm) and norm.activation is None and type(act) is nn.SiLU
                    and uses[id(norm)] == 1 and not _has_hooks(norm) and not _has_hooks(act)):
                norm.activation = "silu"
                identity = nn.Identity().train(act.training)
                seq._modules[second] = identity
                folded[act] = identity
    return folded
