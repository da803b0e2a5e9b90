"""The algorithm protocol: training-loop events, the state algorithms see, and the Algorithm base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch
from torch import nn

from slipstream.time import Time, Timestamp

__all__ = ["Event", "State", "Algorithm", "SurgeryAlgorithm"]


class Event(str, Enum):
    """Points in the training loop where the Trainer calls algorithms, in the order they fire.

    ``INIT`` once when the Trainer is built (before the model moves to its device, before the
    default optimizer is made, a checkpoint is loaded and DDP wraps the model); ``FIT_START`` at
    the start of each ``fit()`` (also a resumed one); then per epoch ``EPOCH_START``, per batch
    ``BATCH_START``, ``BEFORE_FORWARD``, ``AFTER_FORWARD``, ``BEFORE_LOSS``, ``AFTER_LOSS``,
    ``BEFORE_BACKWARD``, ``AFTER_BACKWARD`` (the optimizer steps after it), ``BATCH_END``;
    ``EPOCH_END`` after an epoch's last batch. ``EVAL_START``/``EVAL_END`` surround each evaluation,
    which runs after the ``BATCH_END`` or ``EPOCH_END`` where its interval falls, and once more
    before ``FIT_END`` if the end of training was not evaluated yet. ``FIT_END`` last.
    """

    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_LOSS = "before_loss"
    AFTER_LOSS = "after_loss"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"


@dataclass
class State:
    """What algorithms see and may change. The Trainer fills it; custom loops can build one by hand.

    ``model`` is always the bare module (the Trainer runs the forward through its DDP wrapper);
    ``dataloader_len`` is the number of batches one rank takes per epoch; ``timestamp`` counts
    completed epochs, batches and samples (samples summed over all ranks); ``batch``, ``outputs``
    and ``loss`` belong to the batch in flight; ``eval_metrics`` holds the last evaluation's results.

    Example:
        >>> state = State(model=nn.Linear(2, 2), precision='amp_bf16')
        >>> state.timestamp.batch
        0
    """

    model: nn.Module
    precision: str = "fp32"
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    max_duration: Optional[Time] = None
    train_dataloader: Optional[Any] = None
    dataloader_len: Optional[int] = None
    timestamp: Timestamp = field(default_factory=Timestamp)
    batch: Any = None
    outputs: Any = None
    loss: Optional[torch.Tensor] = None
    rank: int = 0
    world_size: int = 1
    device: Optional[torch.device] = None
    eval_dataloader: Optional[Any] = None
    eval_metrics: dict[str, float] = field(default_factory=dict)


class Algorithm:
    """A training method the Trainer runs: ``match`` says when, ``apply`` does it.

    Subclasses that keep state across a run implement ``state_dict``/``load_state_dict`` (the
    Trainer saves them in checkpoints).

    Example:
        >>> class CountBatches(Algorithm):
        ...     def __init__(self):
        ...         self.count = 0
        ...     def match(self, event, state):
        ...         return event == Event.BATCH_END
        ...     def apply(self, event, state, logger):
        ...         self.count += 1
    """

    def match(self, event: Event, state: State) -> bool:
        """Whether :meth:`apply` should run at ``event``."""
        raise NotImplementedError

    def apply(self, event: Event, state: State, logger: Any) -> None:
        """Run the method; may modify ``state`` (e.g. replace ``state.model`` after surgery)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Algorithm state saved in checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SurgeryAlgorithm(Algorithm):
    """An algorithm that swaps modules once, at ``Event.INIT`` (before optimizers and DDP wrapping).

    Subclasses implement :meth:`surgery` with their ``slipstream.functional.apply_*`` call.
    """

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Any) -> None:
        replaced = self.surgery(state)
        state.model = replaced.get(state.model, state.model)
        if logger is not None and hasattr(logger, "log_metrics"):
            logger.log_metrics({f"{type(self).__name__}/modules_replaced": len(replaced)})

    def surgery(self, state: State) -> dict:
        """Apply the method to ``state.model``; return ``{old: new}`` as ``apply_*`` functions do."""
        raise NotImplementedError
