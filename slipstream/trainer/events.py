"""Firing training-loop events at algorithms, in the order they were given."""

from __future__ import annotations

from typing import Any, Iterable

from slipstream.algorithms.base import Algorithm, Event, State

__all__ = ["Engine"]


class Engine:
    """Calls ``match`` then, where it matched, ``apply`` of each algorithm at each event.

    Example:
        >>> from torch import nn
        >>> class Count(Algorithm):
        ...     calls = 0
        ...     def match(self, event, state): return event == Event.BATCH_END
        ...     def apply(self, event, state, logger): Count.calls += 1
        >>> Engine([Count()], State(model=nn.Linear(1, 1)), logger=None).fire(Event.BATCH_END)
        >>> Count.calls
        1
    """

    def __init__(self, algorithms: Iterable[Algorithm], state: State, logger: Any):
        self.algorithms = list(algorithms)
        for algorithm in self.algorithms:
            if not isinstance(algorithm, Algorithm):
                raise TypeError(
                    f"algorithms must be slipstream.algorithms.Algorithm instances, got {type(algorithm).__name__}"
                )
        self.state = state
        self.logger = logger

    def fire(self, event: Event) -> None:
        """Run every algorithm that matches ``event``."""
        for algorithm in self.algorithms:
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state, self.logger)
