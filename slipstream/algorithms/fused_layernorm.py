"""Fused LayerNorm for the Trainer."""

from __future__ import annotations

from slipstream.algorithms.base import State, SurgeryAlgorithm
from slipstream.functional import apply_fused_layernorm

__all__ = ["FusedLayerNorm"]


class FusedLayerNorm(SurgeryAlgorithm):
    """Swap ``nn.LayerNorm`` for :class:`~slipstream.nn.FusedLayerNorm` at init.

    Example:
        >>> from slipstream.algorithms.base import Event, State
        >>> from torch import nn
        >>> state = State(model=nn.Sequential(nn.LayerNorm(4)))
        >>> FusedLayerNorm().apply(Event.INIT, state, logger=None)
        >>> type(state.model[0]).__name__
        'FusedLayerNorm'
    """

    def surgery(self, state: State) -> dict:
        return apply_fused_layernorm(state.model, state.optimizers)
