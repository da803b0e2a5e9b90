"""Small data, models and recording algorithms shared by the Trainer tests and their torchrun worker."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slipstream.algorithms import Algorithm, Event
from slipstream.trainer import Trainer


def classification_data(samples: int = 96, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Random inputs labelled by a random linear map: learnable, never all zeros."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    targets = (inputs @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, targets)


def loader(dataset: TensorDataset, batch_size: int = 16, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def mlp(features: int = 8, classes: int = 3, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(32, classes))


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A Trainer with no console output unless the test asks for it."""
    kwargs.setdefault("loggers", [])
    kwargs.setdefault("progress_bar", False)
    return Trainer(**kwargs)


class LossRecorder(Algorithm):
    """Records every training loss as a Python float."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def match(self, event: Event, state: Any) -> bool:
        return event == Event.AFTER_LOSS

    def apply(self, event: Event, state: Any, logger: Any) -> None:
        self.losses.append(state.loss.item())
