"""The Trainer: a training loop that fires events at algorithms, on PyTorch's own DDP engine."""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from slipstream.algorithms.base import Algorithm, Event, State
from slipstream.nn.run_state import load_run_state
from slipstream.time import Time
from slipstream.trainer.amp import autocast, grad_scaler, resolve_precision
from slipstream.trainer.checkpoint import (build_checkpoint, load_checkpoint, rank_entry, restore_checkpoint,
                                          save_checkpoint)
from slipstream.trainer.data import EpochLoader, batch_size_of, move_to_device, shard_eval_loader
from slipstream.trainer.distributed import (all_gather_object, all_reduce_sum, check_same_on_all_ranks,
                                            init_distributed, resolve_device, wrap_ddp)
from slipstream.trainer.events import Engine
from slipstream.trainer.loggers import ConsoleLogger, Logger, LoggerGroup
from slipstream.trainer.metrics import MetricSums
from slipstream.trainer.model import adapter_for
from slipstream.trainer.progress import ProgressBar
from slipstream.trainer.rng import rng_state, seed_everything, set_rng_state

__all__ = ["Trainer"]


def _as_list(value: Any, kind: type, argument: str) -> list:
    """``value`` (one item, a list or tuple of items, or None) as a list of ``kind`` instances."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{argument} must be {kind.__name__} instances, got {type(item).__name__}")
    return items


def _check_schedulers(schedulers: list) -> list:
    for scheduler in schedulers:
        if not all(callable(getattr(scheduler, name, None)) for name in ("step", "state_dict", "load_state_dict")):
            raise TypeError(f"schedulers must have step(), state_dict() and load_state_dict(), "
                            f"got {type(scheduler).__name__}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("schedulers: ReduceLROnPlateau steps on a metric, and the Trainer steps schedulers "
                            "without one; step it from an algorithm at Event.EVAL_END with state.eval_metrics")
    return schedulers


def _training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {module: module.training for module in model.modules()}


def _restore_training_modes(modes: dict[nn.Module, bool]) -> None:
    """Each module's own mode back: ``model.train(flag)`` would also flip submodules a user froze."""
    for module, training in modes.items():
        module.training = training


def _agreed_seed(seed: Optional[int]) -> int:
    """``seed``, or one rank 0 draws for every rank (ranks must shuffle data the same way)."""
    if seed is None:
        return all_gather_object(random.SystemRandom().randrange(2**31))[0]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed


class Trainer:
    """Trains ``model`` on ``train_dataloader`` for ``max_duration``, running ``algorithms`` at each event.

    Args:
        model: a :class:`~slipstream.trainer.SlipstreamModel`, a plain ``nn.Module`` fed
            ``(inputs, targets)`` batches (loss ``loss_fn``, cross-entropy by default), or a Hugging
            Face-style model fed dict batches whose output has ``.loss``.
        train_dataloader: a sized iterable of batches (a plain ``DataLoader`` is sharded over ranks and
            reshuffled per epoch by the Trainer).
        eval_dataloader: batches to evaluate on every ``eval_interval`` and at the end (optional).
        max_duration: how long to train: ``'<n>ep'`` epochs, ``'<n>ba'`` batches or ``'<n>sp'`` samples.
        algorithms: :class:`~slipstream.algorithms.Algorithm` instances, run in this order at each event.
        optimizers: an optimizer or a list (default: ``AdamW`` over the model after surgery).
        schedulers: learning-rate schedulers, stepped per epoch (``step_schedulers_every_batch`` for per batch).
        precision: ``'fp32'``, ``'amp_fp16'`` or ``'amp_bf16'``; default ``'amp_bf16'`` on GPUs that have
            it, ``'fp32'`` on the CPU.
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:<i>'``; default the local GPU when there is one.
        eval_interval, save_interval, log_interval: time strings like ``max_duration``.
        save_folder: where checkpoints go (rank 0 writes them; give it on every rank); None saves nothing.
        load_path: a checkpoint file, or a save folder (its ``latest.pt``), to resume from.
        seed: seeds Python, NumPy and PyTorch (``seed + rank`` on each rank) and the data order.
        loggers: :class:`~slipstream.trainer.Logger` instances (default: a console logger); rank 0 only.
        progress_bar: a tqdm bar with loss and throughput on rank 0.
        loss_fn: the loss of a plain ``nn.Module``: ``loss_fn(outputs, targets)``.
        step_schedulers_every_batch: step schedulers after every batch instead of every epoch.
        dist_timeout: seconds a collective may wait for the other ranks before failing.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
        >>> trainer = Trainer(model=nn.Linear(8, 3), train_dataloader=loader, eval_dataloader=loader,
        ...                   max_duration='2ep', loggers=[], progress_bar=False, seed=0)
        >>> trainer.fit()
        >>> sorted(trainer.eval())
        ['accuracy', 'loss']
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: Iterable,
        eval_dataloader: Optional[Iterable] = None,
        *,
        max_duration: Union[str, Time],
        algorithms: Union[Algorithm, Sequence[Algorithm]] = (),
        optimizers: Union[None, torch.optim.Optimizer, Sequence[torch.optim.Optimizer]] = None,
        schedulers: Union[None, Any, Sequence[Any]] = None,
        precision: Optional[str] = None,
        device: Union[None, str, torch.device] = None,
        eval_interval: Union[str, Time] = "1ep",
        save_folder: Optional[str] = None,
        save_interval: Union[str, Time] = "1ep",
        load_path: Optional[str] = None,
        seed: Optional[int] = None,
        loggers: Optional[Sequence[Logger]] = None,
        progress_bar: bool = True,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        log_interval: Union[str, Time] = "1ep",
        step_schedulers_every_batch: bool = False,
        dist_timeout: float = 600.0,
    ):
        self.adapter = adapter_for(model, loss_fn)
        self.max_duration = Time.parse(max_duration, "max_duration")
        self.eval_interval = Time.parse(eval_interval, "eval_interval")
        self.save_interval = Time.parse(save_interval, "save_interval")
        self.log_interval = Time.parse(log_interval, "log_interval")
        self.save_folder = save_folder
        self.step_schedulers_every_batch = step_schedulers_every_batch
        self.device = resolve_device(device)
        precision = resolve_precision(precision, self.device)
        self.dist = init_distributed(self.device, dist_timeout)
        data_seed = _agreed_seed(seed)
        if seed is not None:
            seed_everything(seed + self.dist.rank)
        self.train_data = EpochLoader(train_dataloader, self.dist.rank, self.dist.world_size, data_seed)
        optimizers = _as_list(optimizers, torch.optim.Optimizer, "optimizers")
        schedulers = _check_schedulers(_as_list(schedulers, object, "schedulers"))
        if schedulers and not optimizers:
            raise ValueError("schedulers need the optimizers they were built on: pass optimizers too")

        self.state = State(
            model=model, precision=precision, optimizers=optimizers, schedulers=schedulers,
            max_duration=self.max_duration, train_dataloader=self.train_data.loader,
            dataloader_len=len(self.train_data), rank=self.dist.rank, world_size=self.dist.world_size,
            device=self.device,
            eval_dataloader=None if eval_dataloader is None else shard_eval_loader(
                eval_dataloader, self.dist.rank, self.dist.world_size),
        )
        self.logger = LoggerGroup([ConsoleLogger()] if loggers is None else _as_list(loggers, Logger, "loggers"),
                                  enabled=self.dist.is_main, current_step=lambda: self.state.timestamp.batch)
        self.engine = Engine(_as_list(algorithms, Algorithm, "algorithms"), self.state, self.logger)
        self.engine.fire(Event.INIT)  # surgery: before device placement, optimizers and DDP
        self.state.model.to(self.device)
        if not self.state.optimizers:
            self.state.optimizers = [torch.optim.AdamW(self.state.model.parameters())]
        self.scaler = grad_scaler(precision, self.device)
        check_same_on_all_ranks({  # ranks that disagree on any of these would wait in different collectives
            "dataloader_len": self.state.dataloader_len, "max_duration": str(self.max_duration),
            "precision": precision, "seed": data_seed, "save_folder given": save_folder is not None,
            "eval_dataloader given": eval_dataloader is not None, "eval_interval": str(self.eval_interval),
            "save_interval": str(self.save_interval), "log_interval": str(self.log_interval),
            "step_schedulers_every_batch": step_schedulers_every_batch,
            "algorithms": [type(a).__name__ for a in self.engine.algorithms],
            "model parameter count": sum(p.numel() for p in self.state.model.parameters()),
        })
        self._resumed_rng: Optional[dict] = None
        self._loss_window = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum, batches) unlogged
        if load_path is not None:
            self._load(load_path)
        self.module = wrap_ddp(self.state.model, self.device, self.dist)
        self.progress = ProgressBar(enabled=progress_bar and self.dist.is_main)
        self._last_eval_batch: Optional[int] = None
        self._last_saved_at: Optional[tuple[int, int]] = None  # (epoch, batch): an epoch's end is saved apart

    # ---- training -------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until ``max_duration`` (continuing from a loaded checkpoint's timestamp)."""
        state = self.state
        if self.max_duration.reached(state.timestamp):
            warnings.warn(f"the run is already at max_duration={self.max_duration}; fit() has nothing to do")
            return
        self.logger.log_hyperparameters(self._hyperparameters())
        self.engine.fire(Event.FIT_START)
        if self._resumed_rng is not None:  # after FIT_START, so what it draws does not shift the streams
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        try:
            while not self.max_duration.reached(state.timestamp):
                self._train_epoch()
        finally:
            self.progress.close()
        self._log_train_loss()  # the batches since the last log interval
        if state.eval_dataloader is not None and self._last_eval_batch != state.timestamp.batch:
            self._evaluate()
        if self.save_folder is not None and self._last_saved_at != (state.timestamp.epoch, state.timestamp.batch):
            self._save()
        self.engine.fire(Event.FIT_END)

    def _train_epoch(self) -> None:
        state, timestamp = self.state, self.state.timestamp
        self.engine.fire(Event.EPOCH_START)
        if not state.model.training:  # a model in eval mode trains in train mode; submodules a user froze
            state.model.train()      # (eval-mode BatchNorm in a training model) stay as they are
        self.progress.start_epoch(timestamp.epoch, len(self.train_data), timestamp.batch_in_epoch)
        started, first_sample = time.perf_counter(), timestamp.sample
        for batch in self.train_data.epoch(timestamp.epoch, skip_batches=timestamp.batch_in_epoch):
            before = dataclasses.replace(timestamp)
            self._train_batch(batch)
            self._after_progress(before)
            if self.max_duration.reached(timestamp) and timestamp.batch_in_epoch < len(self.train_data):
                return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        before = dataclasses.replace(timestamp)
        timestamp.epoch, timestamp.batch_in_epoch = timestamp.epoch + 1, 0
        if not self.step_schedulers_every_batch:
            for scheduler in state.schedulers:
                scheduler.step()
        self.logger.log_metrics({"time/epoch_s": seconds,
                                 "throughput/samples_per_s": (timestamp.sample - first_sample) / seconds})
        self.engine.fire(Event.EPOCH_END)
        self._after_progress(before)

    def _train_batch(self, batch: Any) -> None:
        state, fire = self.state, self.engine.fire
        state.batch = move_to_device(batch, self.device)
        fire(Event.BATCH_START)
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        fire(Event.BEFORE_FORWARD)
        with autocast(state.precision, self.device):
            state.outputs = self.adapter.forward(self.module, state.batch)
        fire(Event.AFTER_FORWARD)
        fire(Event.BEFORE_LOSS)
        with autocast(state.precision, self.device):
            state.loss = self.adapter.loss(state.model, state.outputs, state.batch)
        fire(Event.AFTER_LOSS)
        fire(Event.BEFORE_BACKWARD)
        (state.loss if self.scaler is None else self.scaler.scale(state.loss)).backward()
        fire(Event.AFTER_BACKWARD)
        self._step_optimizers()
        samples = batch_size_of(state.batch) * self.dist.world_size
        timestamp = state.timestamp
        timestamp.batch, timestamp.batch_in_epoch = timestamp.batch + 1, timestamp.batch_in_epoch + 1
        timestamp.sample += samples
        fire(Event.BATCH_END)
        self._loss_window += torch.stack([state.loss.detach().double(), self._loss_window.new_ones(())])
        self.progress.update(samples, state.loss)

    def _step_optimizers(self) -> None:
        for optimizer in self.state.optimizers:
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
        if self.scaler is not None:
            self.scaler.update()
        if self.step_schedulers_every_batch:
            for scheduler in self.state.schedulers:
                scheduler.step()

    def _after_progress(self, before: Any) -> None:
        """Log, evaluate and save where an interval falls between ``before`` and now."""
        now = self.state.timestamp
        if self.log_interval.crossed(before, now):
            self._log_train_loss()
        if self.state.eval_dataloader is not None and self.eval_interval.crossed(before, now):
            self._evaluate()
        if self.save_folder is not None and self.save_interval.crossed(before, now):
            self._save()

    def _log_train_loss(self) -> None:
        total, batches = all_reduce_sum(self._loss_window.clone()).tolist()
        self._loss_window.zero_()
        if batches:
            self.logger.log_metrics({"loss/train": total / batches})

    # ---- evaluation -----------------------------------------------------------------------------

    def eval(self) -> dict[str, float]:
        """Evaluate on ``eval_dataloader``; returns ``{'loss': ..., 'accuracy': ..., ...}`` over all ranks."""
        if self.state.eval_dataloader is None:
            raise ValueError("eval() needs an eval_dataloader: pass one to the Trainer")
        return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        state = self.state
        self.engine.fire(Event.EVAL_START)
        sums = MetricSums(self.device)
        modes = _training_modes(state.model)
        state.model.eval()
        with torch.no_grad():
            for batch in state.eval_dataloader:
                batch = move_to_device(batch, self.device)
                with autocast(state.precision, self.device):
                    outputs = self.adapter.forward(state.model, batch)
                    loss = self.adapter.loss(state.model, outputs, batch)
                    metrics = self.adapter.eval_metrics(state.model, outputs, batch)
                size = batch_size_of(batch)
                sums.add("loss", loss.detach().double() * size, torch.tensor(size))
                for name, (total, count) in metrics.items():
                    sums.add(name, total, count)
        _restore_training_modes(modes)
        state.eval_metrics = sums.compute()
        self._last_eval_batch = state.timestamp.batch
        self.logger.log_metrics({f"metrics/eval/{name}": value for name, value in state.eval_metrics.items()})
        self.engine.fire(Event.EVAL_END)
        return dict(state.eval_metrics)

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save(self) -> None:
        # Every rank's streams, run state and loss sums, saved by rank 0.
        ranks = all_gather_object(rank_entry(self.state.model, rng_state(), self._loss_window.tolist()))
        if self.dist.is_main:
            checkpoint = build_checkpoint(self.state, self.engine.algorithms, self.scaler, ranks,
                                          self.train_data.seed)
            save_checkpoint(checkpoint, self.save_folder)
        self._last_saved_at = (self.state.timestamp.epoch, self.state.timestamp.batch)

    def _load(self, load_path: str) -> None:
        checkpoint = load_checkpoint(load_path)
        restore_checkpoint(checkpoint, self.state, self.engine.algorithms, self.scaler)
        self.train_data.seed = checkpoint["data_seed"]
        ranks = checkpoint["ranks"]
        if len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            load_run_state(self.state.model, own["run_state"])
            self._resumed_rng = own["rng"]
            self._loss_window = torch.tensor(own["loss_window"], dtype=torch.float64, device=self.device)
        else:
            warnings.warn(f"the checkpoint was saved by {len(ranks)} processes, this run has "
                          f"{self.dist.world_size}: every rank takes rank 0's modules' run state, and random streams "
                          "continue from this run's seeding, not each rank's own")

    # ---- misc -----------------------------------------------------------------------------------

    def _hyperparameters(self) -> dict[str, Any]:
        state = self.state
        return {
            "max_duration": str(self.max_duration), "precision": state.precision, "device": str(self.device),
            "world_size": state.world_size, "data_seed": self.train_data.seed,
            "dataloader_len": state.dataloader_len,
            "algorithms": ",".join(type(a).__name__ for a in self.engine.algorithms),
            "optimizers": ",".join(type(o).__name__ for o in state.optimizers),
        }

    def close(self) -> None:
        """Close the progress bar and the loggers (files are flushed after every line anyway)."""
        self.progress.close()
        self.logger.close()
