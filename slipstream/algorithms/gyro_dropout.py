"""Gyro Dropout for the Trainer: surgery at init, schedule planned at fit start, advanced per batch."""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

from slipstream.algorithms.base import Algorithm, Event, State
from slipstream.functional import apply_gyro_dropout
from slipstream.nn.gyro_dropout import GyroDropout as GyroDropoutModule
from slipstream.nn.gyro_dropout import check_gyro_arguments
from slipstream.time import TimeUnit

__all__ = ["GyroDropout"]


def planned_run_length(state: State) -> tuple[int, float]:
    """``(iters_per_epoch, max_epoch)`` of the run ``state`` describes; ``max_epoch`` may be fractional.

    ``iters_per_epoch`` is the batches one rank takes per epoch. A ``max_duration`` in batches is
    divided by it; one in samples (counted over all ranks) is first turned into batches of
    ``train_dataloader.batch_size * world_size`` samples.

    Example:
        >>> from slipstream.time import Time
        >>> planned_run_length(State(model=nn.Identity(), dataloader_len=50, max_duration=Time.parse('125ba')))
        (50, 2.5)
    """
    iters = state.dataloader_len
    if iters is None and state.train_dataloader is not None and hasattr(state.train_dataloader, "__len__"):
        iters = len(state.train_dataloader)
    if not iters:
        raise ValueError("GyroDropout needs the train dataloader's length (state.dataloader_len) to plan its schedule")
    duration = state.max_duration
    if duration is None:
        raise ValueError("GyroDropout needs the Trainer's max_duration ('<n>ep', '<n>ba' or '<n>sp') to plan its schedule")
    if duration.unit == TimeUnit.EPOCH:
        return iters, duration.value
    if duration.unit == TimeUnit.BATCH:
        return iters, duration.value / iters
    batch_size = getattr(state.train_dataloader, "batch_size", None)
    if not batch_size:
        raise ValueError(
            f"max_duration={duration} is in samples, but the train dataloader has no batch_size to turn it into batches"
        )
    return iters, math.ceil(duration.value / (batch_size * state.world_size)) / iters


def _gyro_modules(model: nn.Module) -> list[GyroDropoutModule]:
    return [m for m in model.modules() if isinstance(m, GyroDropoutModule)]


class GyroDropout(Algorithm):
    """Replace ``nn.Dropout`` with :class:`~slipstream.nn.GyroDropout`, planned from the Trainer's run.

    ``Event.INIT``: surgery (before optimizers, checkpoint loading and DDP wrapping, so a resumed
    checkpoint finds the Gyro state keys). ``Event.FIT_START``: the schedule is planned from
    ``state.dataloader_len`` and ``state.max_duration`` (batches or samples are converted).
    ``Event.BATCH_END``: every Gyro module advances one step, so eval forwards and
    gradient-accumulation micro-batches never move the schedule.

    Args:
        p: ``None`` keeps each Dropout's own ``p`` (see :func:`slipstream.functional.apply_gyro_dropout`).
        sigma, tau: masks pre-selected and masks active per step (``1 <= tau <= sigma``).
        seed: module ``i`` is seeded with ``seed + i``; the same on every rank.

    Example:
        >>> from slipstream.time import Time
        >>> state = State(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)), dataloader_len=10,
        ...               max_duration=Time.parse('3ep'))
        >>> algorithm = GyroDropout(sigma=8, tau=2)
        >>> for event in (Event.INIT, Event.FIT_START):
        ...     algorithm.apply(event, state, logger=None)
        >>> state.model[1].iter_num
        6
    """

    def __init__(self, p: Optional[float] = None, sigma: int = 256, tau: int = 16, seed: int = 0) -> None:
        check_gyro_arguments(p, sigma, tau, p_may_be_none=True)
        self.p, self.sigma, self.tau, self.seed = p, sigma, tau, seed

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Any) -> None:
        if event == Event.INIT:
            replaced = apply_gyro_dropout(
                state.model, self.sigma, self.tau, p=self.p, seed=self.seed, advance_on_forward=False
            )
            state.model = replaced.get(state.model, state.model)
            if logger is not None and hasattr(logger, "log_metrics"):
                logger.log_metrics({"GyroDropout/modules_replaced": len(replaced)})
        elif event == Event.FIT_START:
            iters_per_epoch, max_epoch = planned_run_length(state)
            for module in _gyro_modules(state.model):
                module.set_run_length(iters_per_epoch, max_epoch)
        elif event == Event.BATCH_END:
            for module in _gyro_modules(state.model):
                module.advance()

    def __repr__(self) -> str:
        return f"GyroDropout(p={self.p}, sigma={self.sigma}, tau={self.tau}, seed={self.seed})"
