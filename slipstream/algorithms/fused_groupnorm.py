"""Fused GroupNorm for the Trainer."""

from __future__ import annotations

from slipstream.algorithms.base import State, SurgeryAlgorithm
from slipstream.functional import apply_fused_groupnorm

__all__ = ["FusedGroupNorm"]


class FusedGroupNorm(SurgeryAlgorithm):
    """Swap ``nn.GroupNorm`` for :class:`~slipstream.nn.FusedGroupNorm` at init, folding in a following SiLU.

    Args:
        fuse_silu: fold an ``nn.SiLU`` that directly follows a norm in an ``nn.Sequential`` into its
            kernels (see :func:`slipstream.functional.apply_fused_groupnorm`).

    Example:
        >>> from slipstream.algorithms.base import Event, State
        >>> from torch import nn
        >>> state = State(model=nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))
        >>> FusedGroupNorm().apply(Event.INIT, state, logger=None)
        >>> type(state.model[0]).__name__, state.model[0].activation
        ('FusedGroupNorm', 'silu')
    """

    def __init__(self, fuse_silu: bool = True) -> None:
        if not isinstance(fuse_silu, bool):
            raise TypeError(f"fuse_silu must be a bool, got {type(fuse_silu).__name__} {fuse_silu!r}")
        self.fuse_silu = fuse_silu

    def surgery(self, state: State) -> dict:
        return apply_fused_groupnorm(state.model, self.fuse_silu, state.optimizers)
