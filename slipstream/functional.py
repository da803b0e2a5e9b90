"""Functional API: ``apply_<method>(model, ...)`` surgery entry points for people's own training loops.

Each function modifies ``model`` in place and returns ``{old_module: new_module}`` for what it
replaced (``len()`` of it is the count; if the root module itself was replaced, use
``replaced.get(model, model)``). Finding nothing to replace raises a :class:`NoEffectWarning`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from slipstream.nn import FusedLayerNorm, LPGroupNorm, LPLayerNorm
from slipstream.precision import autocast_dtype
from slipstream.surgery import NoEffectWarning, replace_module_classes

__all__ = ["apply_fused_layernorm", "apply_low_precision_layernorm", "apply_low_precision_groupnorm"]

Optimizers = Optional[Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]]


def _replace_all(
    model: nn.Module,
    original: type[nn.Module],
    build: Callable[[nn.Module], nn.Module],
    optimizers: Optimizers,
    method: str,
) -> dict[nn.Module, nn.Module]:
    """Swap every module ``surgery`` matches to ``original`` for ``build(module)``; warn if none."""
    replaced = replace_module_classes(model, {original: lambda module, index: build(module)}, optimizers)
    if not replaced:
        warnings.warn(f"{method}: found no {original.__name__} to replace; the model is unchanged", NoEffectWarning)
    return replaced


def _low_precision_has_effect(precision: Optional[str], method: str) -> bool:
    if precision is not None and autocast_dtype(precision) is None:
        warnings.warn(
            f"{method}: precision={precision!r} runs no autocast, so low-precision norms change nothing; "
            "the model is unchanged",
            NoEffectWarning,
        )
        return False
    return True


def apply_low_precision_layernorm(
    model: nn.Module, precision: Optional[str] = None, optimizers: Optimizers = None
) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.LayerNorm`` modules with :class:`~slipstream.nn.LPLayerNorm`.

    Under autocast the replaced norms compute in the autocast dtype (fp16/bf16) instead of fp32.

    Args:
        model: model to modify in place.
        precision: ``'fp32'``, ``'amp_fp16'`` or ``'amp_bf16'``; ``'fp32'`` changes nothing (with a
            :class:`NoEffectWarning`). ``None`` replaces the norms, which then follow whatever autocast
            dtype is active at run time.
        optimizers: optimizers built before surgery (they keep working: Parameters are adopted).

    Returns:
        ``{old_module: new_module}`` for each replaced norm.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        >>> len(apply_low_precision_layernorm(model, precision='amp_bf16'))
        1
    """
    if not _low_precision_has_effect(precision, "apply_low_precision_layernorm"):
        return {}
    return _replace_all(model, nn.LayerNorm, LPLayerNorm.from_module, optimizers, "apply_low_precision_layernorm")


def apply_low_precision_groupnorm(
    model: nn.Module, precision: Optional[str] = "amp_bf16", optimizers: Optimizers = None
) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.GroupNorm`` modules with :class:`~slipstream.nn.LPGroupNorm`.

    Under autocast the replaced norms compute in the autocast dtype (fp16/bf16) instead of fp32.

    Args:
        model: model to modify in place.
        precision: ``'fp32'``, ``'amp_fp16'`` or ``'amp_bf16'`` (the precision the model trains in);
            ``'fp32'`` changes nothing (with a :class:`NoEffectWarning`); ``None`` replaces the norms,
            which then follow whatever autocast dtype is active at run time.
        optimizers: optimizers built before surgery (they keep working: Parameters are adopted).

    Returns:
        ``{old_module: new_module}`` for each replaced norm.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
        >>> len(apply_low_precision_groupnorm(model))
        1
    """
    if not _low_precision_has_effect(precision, "apply_low_precision_groupnorm"):
        return {}
    return _replace_all(model, nn.GroupNorm, LPGroupNorm.from_module, optimizers, "apply_low_precision_groupnorm")


def apply_fused_layernorm(model: nn.Module, optimizers: Optimizers = None) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.LayerNorm`` modules with :class:`~slipstream.nn.FusedLayerNorm`.

    The replaced norms run slipstream's Triton LayerNorm on CUDA (one launch forward, fp32 math; under
    autocast they write the autocast dtype) and its pure-PyTorch fallback elsewhere.

    Args:
        model: model to modify in place.
        optimizers: optimizers built before surgery (they keep working: Parameters are adopted).

    Returns:
        ``{old_module: new_module}`` for each replaced norm.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        >>> len(apply_fused_layernorm(model))
        1
    """
    return _replace_all(model, nn.LayerNorm, FusedLayerNorm.from_module, optimizers, "apply_fused_layernorm")
