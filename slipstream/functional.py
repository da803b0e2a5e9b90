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

from slipstream.nn import FusedGroupNorm, FusedLayerNorm, LPGroupNorm, LPLayerNorm, fuse_silu_into_group_norms
from slipstream.nn.layer_norm import CHANNELS_FIRST_LAYER_NORMS, FusedLayerNorm2d
from slipstream.nn.dropout import SeededDropout
from slipstream.nn.gyro_dropout import GyroDropout, check_gyro_arguments, check_run_length
from slipstream.precision import autocast_dtype
from slipstream.surgery import NoEffectWarning, classes_named, replace_module_classes

__all__ = [
    "apply_fused_layernorm",
    "apply_low_precision_layernorm",
    "apply_low_precision_groupnorm",
    "apply_gyro_dropout",
    "apply_low_memory_dropout",
    "apply_fused_groupnorm",
]

Optimizers = Optional[Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]]


# Builds the replacement of a module, the index-th its policy replaces, or returns None to keep it.
_Build = Callable[[nn.Module, int], Optional[nn.Module]]


def _each(from_module: Callable[[nn.Module], nn.Module]) -> _Build:
    """A build that replaces every matched module with ``from_module(module)``."""
    return lambda module, index: from_module(module)


def _replace_all(
    model: nn.Module,
    original: type[nn.Module],
    build: _Build,
    optimizers: Optimizers,
    method: str,
    also: Optional[dict[type[nn.Module], _Build]] = None,
) -> dict[nn.Module, nn.Module]:
    """Swap every module ``surgery`` matches to ``original`` for ``build(module, index)`` (None keeps it); warn if none.

    ``also``: more classes to match, each with its own ``build`` (subclasses of ``original`` with
    other math that have a replacement of their own).
    """
    replaced = replace_module_classes(model, {original: build, **(also or {})}, optimizers)
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
    return _replace_all(model, nn.LayerNorm, _each(LPLayerNorm.from_module), optimizers,
                        "apply_low_precision_layernorm")


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
    return _replace_all(model, nn.GroupNorm, _each(LPGroupNorm.from_module), optimizers,
                        "apply_low_precision_groupnorm")


def apply_gyro_dropout(
    model: nn.Module,
    sigma: int = 256,
    tau: int = 16,
    iters_per_epoch: int = 196,
    max_epoch: Union[int, float] = 100,
    p: Optional[float] = None,
    seed: int = 0,
    advance_on_forward: bool = True,
) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.Dropout`` modules with :class:`~slipstream.nn.GyroDropout`.

    Each replacement trains ``sigma`` fixed masks, ``tau`` active per step, on a schedule planned
    for ``iters_per_epoch * max_epoch`` optimizer steps.

    Args:
        model: model to modify in place (before wrapping it in DDP).
        sigma, tau: masks pre-selected and masks active per step (``1 <= tau <= sigma``).
        iters_per_epoch, max_epoch: the planned run length.
        p: ``None`` keeps each replaced Dropout's own ``p`` (and leaves ``p=0`` Dropouts, which are
            identities, alone). The card uses one fixed ``p`` (0.5) for
            every layer, which silently changes how strongly a model tuned with, say, ``p=0.1`` is
            regularized; keeping ``p`` means surgery changes how masks are chosen, not how many
            units are dropped. A number in [0, 1) sets that ``p`` everywhere.
        seed: the i-th replaced module is seeded with ``seed + i``, so masks differ between layers
            and are the same on every DDP rank.
        advance_on_forward: ``True`` counts each training-mode forward as one step (right for one
            forward per optimizer step). With gradient accumulation pass ``False`` and call
            ``module.advance()`` on each :class:`~slipstream.nn.GyroDropout` after every optimizer
            step (the Trainer algorithm does this for you).

    Returns:
        ``{old_module: new_module}`` for each replaced Dropout.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1))
        >>> len(apply_gyro_dropout(model, sigma=16, tau=4, iters_per_epoch=10, max_epoch=5))
        1
    """
    check_gyro_arguments(p, sigma, tau, p_may_be_none=True)
    check_run_length(iters_per_epoch, max_epoch)  # also when the model has no Dropout to replace

    def build(module: nn.Module, index: int) -> Optional[nn.Module]:
        if p is None and module.p == 0:  # an identity stays one; nothing to train
            return None
        return GyroDropout.from_module(module, sigma, tau, iters_per_epoch, max_epoch, p=p, seed=seed + index,
                                       advance_on_forward=advance_on_forward)

    return _replace_all(model, nn.Dropout, build, None, "apply_gyro_dropout")


def apply_fused_layernorm(model: nn.Module, optimizers: Optimizers = None) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.LayerNorm`` modules with :class:`~slipstream.nn.FusedLayerNorm`.

    The replaced norms run slipstream's Triton LayerNorm on CUDA (one launch forward, fp32 math; under
    autocast they write the autocast dtype) and its pure-PyTorch fallback elsewhere. Channels-first
    LayerNorms (timm's ``LayerNorm2d``, see :data:`~slipstream.nn.layer_norm.CHANNELS_FIRST_LAYER_NORMS`)
    become :class:`~slipstream.nn.FusedLayerNorm2d`, which computes their math. timm norms with its
    "fast norm" switched on (low-precision math) are left alone with a SurgeryWarning.

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
    channels_first = {cls: _each(FusedLayerNorm2d.from_module)
                      for cls in classes_named(model, CHANNELS_FIRST_LAYER_NORMS)}
    return _replace_all(model, nn.LayerNorm, _each(FusedLayerNorm.from_module), optimizers, "apply_fused_layernorm",
                        also=channels_first)


def apply_low_memory_dropout(model: nn.Module, seed: Optional[int] = None) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.Dropout`` modules with :class:`~slipstream.nn.SeededDropout`.

    Same math (each replacement keeps its Dropout's ``p``), but backward regenerates the mask from a
    per-call seed instead of keeping a one-byte mask per element. Dropouts with ``p=0`` (identities,
    common in model zoos) are left alone.

    Args:
        model: model to modify in place (before wrapping it in DDP).
        seed: ``None`` lets each replacement draw its stream's key from torch's global RNG (so
            ``torch.manual_seed`` makes runs reproducible); an int keys the i-th replaced module
            with ``seed + i``.

    Returns:
        ``{old_module: new_module}`` for each replaced Dropout.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1))
        >>> len(apply_low_memory_dropout(model, seed=0))
        1
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    def build(module: nn.Module, index: int) -> Optional[nn.Module]:
        if module.p == 0:  # an identity keeps no mask: nothing to save
            return None
        return SeededDropout.from_module(module, seed=None if seed is None else seed + index)

    return _replace_all(model, nn.Dropout, build, None, "apply_low_memory_dropout")


def apply_fused_groupnorm(
    model: nn.Module, fuse_silu: bool = True, optimizers: Optimizers = None
) -> dict[nn.Module, nn.Module]:
    """Replace ``nn.GroupNorm`` modules with :class:`~slipstream.nn.FusedGroupNorm`.

    The replaced norms run slipstream's Triton GroupNorm on CUDA (one launch forward, fp32 math,
    contiguous and channels_last inputs in place; under autocast they write the autocast dtype) and
    its pure-PyTorch fallback elsewhere. With ``fuse_silu``, an ``nn.SiLU`` directly after a replaced
    norm in an ``nn.Sequential`` is folded into the norm's kernels (see
    :func:`~slipstream.nn.fuse_silu_into_group_norms`) and its place holds an ``nn.Identity``: the
    Sequential computes what it did, but the norm module alone now returns ``silu(norm(x))``. Pass
    ``fuse_silu=False`` if your code calls the norm by itself (say, to read features).

    Args:
        model: model to modify in place.
        fuse_silu: fold a following ``nn.SiLU`` into the norm where that is safe.
        optimizers: optimizers built before surgery (they keep working: Parameters are adopted).

    Returns:
        ``{old_module: new_module}`` for each replaced norm and each SiLU folded into one.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU())
        >>> len(apply_fused_groupnorm(model)), model[1].activation
        (2, 'silu')
    """
    replaced = _replace_all(model, nn.GroupNorm, _each(FusedGroupNorm.from_module), optimizers,
                            "apply_fused_groupnorm")
    if fuse_silu:
        replaced.update(fuse_silu_into_group_norms(replaced.get(model, model)))
    return replaced
