"""Checkpoints that resume a run exactly: model, optimizers, schedulers, GradScaler, timestamp,
algorithm state, the data-order seed, and per rank its RNG states, its modules' run state (ranks may
draw different dropout seeds) and its unlogged training-loss sums.

Files are ``<save_folder>/ep<epoch>-ba<batch>.pt`` plus ``latest.pt`` pointing at the newest; they
hold only tensors, numbers, strings and containers, and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from slipstream.algorithms.base import Algorithm, State
from slipstream.nn.run_state import load_run_state, save_run_state

__all__ = ["FORMAT", "LATEST", "build_checkpoint", "save_checkpoint", "load_checkpoint", "restore_checkpoint"]

FORMAT = "slipstream.trainer.checkpoint/3"  # 2: run state out of the model's state_dict; 3: per-rank entries
LATEST = "latest.pt"


def rank_entry(model: nn.Module, rng: dict[str, Any], loss_window: Sequence[float]) -> dict[str, Any]:
    """One rank's part of a checkpoint: its RNG states, its modules' run state and its loss sums.

    Example:
        >>> sorted(rank_entry(nn.Linear(2, 2), {}, [0.0, 0.0]))
        ['loss_window', 'rng', 'run_state']
    """
    return {"rng": rng, "run_state": save_run_state(model), "loss_window": [float(v) for v in loss_window]}


def build_checkpoint(state: State, algorithms: Sequence[Algorithm], scaler: Optional[torch.amp.GradScaler],
                     ranks: list[dict], data_seed: int) -> dict[str, Any]:
    """Everything needed to continue ``state``'s run (``ranks``: one :func:`rank_entry` per rank).

    Example:
        >>> ckpt = build_checkpoint(State(model=nn.Linear(2, 2)), [], None, [], data_seed=0)
        >>> sorted(ckpt['model'])
        ['bias', 'weight']
    """
    return {
        "format": FORMAT,
        "model_class": type(state.model).__name__,
        "model": state.model.state_dict(),
        "run_state": save_run_state(state.model),
        "optimizers": [optimizer.state_dict() for optimizer in state.optimizers],
        "schedulers": [scheduler.state_dict() for scheduler in state.schedulers],
        "scaler": None if scaler is None else scaler.state_dict(),
        "algorithms": [{"name": type(a).__name__, "state": a.state_dict()} for a in algorithms],
        "timestamp": state.timestamp.state_dict(),
        "ranks": ranks,
        "data_seed": data_seed,
        "precision": state.precision,
    }


def save_checkpoint(checkpoint: dict[str, Any], folder: str) -> str:
    """Write ``checkpoint`` to ``folder`` (atomically) and point ``latest.pt`` at it; return its path.

    Example:
        >>> import tempfile
        >>> ckpt = build_checkpoint(State(model=nn.Linear(2, 2)), [], None, [], data_seed=0)
        >>> os.path.basename(save_checkpoint(ckpt, tempfile.mkdtemp()))
        'ep0-ba0.pt'
    """
    os.makedirs(folder, exist_ok=True)
    timestamp = checkpoint["timestamp"]
    name = f"ep{timestamp['epoch']}-ba{timestamp['batch']}.pt"
    path = os.path.join(folder, name)
    partial = path + ".partial"
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a truncated checkpoint behind
    latest = os.path.join(folder, LATEST)
    if os.path.lexists(latest):
        os.remove(latest)
    try:
        os.symlink(name, latest)
    except OSError:  # file systems without symbolic links
        shutil.copyfile(path, latest)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint file, or the ``latest.pt`` of a save folder, onto the CPU.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_checkpoint(build_checkpoint(State(model=nn.Linear(2, 2)), [], None, [], 0), folder)
        >>> load_checkpoint(folder)['timestamp']['batch']
        0
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_path must be a file or folder path, got {type(path).__name__}")
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_path: no checkpoint at {path!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"load_path={path!r} is not a slipstream Trainer checkpoint (format {FORMAT!r})")
    return checkpoint


def _check_model_fits(model: nn.Module, saved: dict[str, torch.Tensor], saved_class: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shared_tensors = [key for key in set(own) & set(saved)
                      if isinstance(own[key], torch.Tensor) and isinstance(saved[key], torch.Tensor)]
    mismatched = sorted(f"{key}: {tuple(saved[key].shape)} in the checkpoint, {tuple(own[key].shape)} here"
                        for key in shared_tensors if own[key].shape != saved[key].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                    if items]
        raise ValueError(f"the checkpoint holds another model ({saved_class}) than this {type(model).__name__}: "
                         + "; ".join(problems))


def _check_counts(kind: str, saved: int, here: int) -> None:
    if saved != here:
        raise ValueError(f"the checkpoint holds {saved} {kind}, this Trainer has {here}")


def restore_checkpoint(checkpoint: dict[str, Any], state: State, algorithms: Sequence[Algorithm],
                       scaler: Optional[torch.amp.GradScaler]) -> None:
    """Load ``checkpoint`` into ``state``, ``algorithms`` and ``scaler`` (RNG states are the caller's).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> ckpt = build_checkpoint(State(model=model), [], None, [], data_seed=0)
        >>> restore_checkpoint(ckpt, State(model=nn.Linear(2, 2)), [], None)
    """
    _check_model_fits(state.model, checkpoint["model"], checkpoint["model_class"])
    saved_names = [entry["name"] for entry in checkpoint["algorithms"]]
    names = [type(a).__name__ for a in algorithms]
    if saved_names != names:
        raise ValueError(f"the checkpoint was trained with algorithms {saved_names}, this Trainer has {names}")
    _check_counts("optimizers", len(checkpoint["optimizers"]), len(state.optimizers))
    _check_counts("schedulers", len(checkpoint["schedulers"]), len(state.schedulers))
    state.model.load_state_dict(checkpoint["model"])
    load_run_state(state.model, checkpoint["run_state"])
    for optimizer, saved in zip(state.optimizers, checkpoint["optimizers"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(state.schedulers, checkpoint["schedulers"]):
        scheduler.load_state_dict(saved)
    for algorithm, entry in zip(algorithms, checkpoint["algorithms"]):
        algorithm.load_state_dict(entry["state"])
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    elif (scaler is None) != (checkpoint["scaler"] is None):
        warnings.warn(f"the checkpoint was trained with precision={checkpoint['precision']!r}, this run uses "
                      f"{state.precision!r}: the GradScaler state is not carried over")
    state.timestamp.load_state_dict(checkpoint["timestamp"])
