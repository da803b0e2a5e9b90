"""Low Precision LayerNorm for the Trainer."""

from __future__ import annotations

from slipstream.algorithms.base import State, SurgeryAlgorithm
from slipstream.functional import apply_low_precision_layernorm

__all__ = ["LowPrecisionLayerNorm"]


class LowPrecisionLayerNorm(SurgeryAlgorithm):
    """Swap ``nn.LayerNorm`` for :class:`~slipstream.nn.LPLayerNorm` at init, using the Trainer's precision.

    Example:
        >>> from slipstream.algorithms.base import Event, State
        >>> from torch import nn
        >>> state = State(model=nn.Sequential(nn.LayerNorm(4)), precision='amp_bf16')
        >>> LowPrecisionLayerNorm().apply(Event.INIT, state, logger=None)
        >>> type(state.model[0]).__name__
        'LPLayerNorm'
    """

    def surgery(self, state: State) -> dict:
        return apply_low_precision_layernorm(state.model, state.precision, state.optimizers)
