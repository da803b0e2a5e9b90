"""Low Precision GroupNorm for the Trainer."""

from __future__ import annotations

from slipstream.algorithms.base import State, SurgeryAlgorithm
from slipstream.functional import apply_low_precision_groupnorm

__all__ = ["LowPrecisionGroupNorm"]


class LowPrecisionGroupNorm(SurgeryAlgorithm):
    """Swap ``nn.GroupNorm`` for :class:`~slipstream.nn.LPGroupNorm` at init, using the Trainer's precision.

    Example:
        >>> from slipstream.algorithms.base import Event, State
        >>> from torch import nn
        >>> state = State(model=nn.Sequential(nn.GroupNorm(2, 4)), precision='amp_bf16')
        >>> LowPrecisionGroupNorm().apply(Event.INIT, state, logger=None)
        >>> type(state.model[0]).__name__
        'LPGroupNorm'
    """

    def surgery(self, state: State) -> dict:
        return apply_low_precision_groupnorm(state.model, state.precision, state.optimizers)
