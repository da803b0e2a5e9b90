"""Low-memory (seeded) dropout for the Trainer."""

from __future__ import annotations

from typing import Optional

from slipstream.algorithms.base import State, SurgeryAlgorithm
from slipstream.functional import apply_low_memory_dropout

__all__ = ["LowMemoryDropout"]


class LowMemoryDropout(SurgeryAlgorithm):
    """Swap ``nn.Dropout`` for :class:`~slipstream.nn.SeededDropout` at init.

    The seed streams are run state, not ``state_dict`` entries (:mod:`slipstream.nn.run_state`); the
    Trainer's checkpoints save and resume them.

    Args:
        seed: ``None`` keys each module from torch's global RNG; an int keys module ``i`` with
            ``seed + i``.

    Example:
        >>> from slipstream.algorithms.base import Event
        >>> from torch import nn
        >>> state = State(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)))
        >>> LowMemoryDropout(seed=0).apply(Event.INIT, state, logger=None)
        >>> type(state.model[1]).__name__
        'SeededDropout'
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        self.seed = seed

    def surgery(self, state: State) -> dict:
        return apply_low_memory_dropout(state.model, seed=self.seed)

    def __repr__(self) -> str:
        return f"LowMemoryDropout(seed={self.seed})"
