"""Where training metrics go: the console, a JSON-lines file, memory; rank 0 only."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from tqdm.auto import tqdm

__all__ = ["Logger", "ConsoleLogger", "JSONLinesLogger", "InMemoryLogger", "LoggerGroup"]


class Logger:
    """Receives metrics (``{name: float}`` at a batch ``step``) and the run's hyperparameters once."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` measured at batch ``step``."""

    def log_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        """Record the run's settings (called at the start of ``fit``)."""

    def close(self) -> None:
        """Release files and the like."""


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleLogger(Logger):
    """Prints one line per call, above any progress bar.

    Example:
        >>> ConsoleLogger().log_metrics({'loss/train': 0.5}, step=10)
        [batch 10] loss/train=0.5
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        tqdm.write(f"[batch {step}] " + " ".join(f"{name}={_format(value)}" for name, value in metrics.items()))

    def log_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        tqdm.write("[config] " + " ".join(f"{name}={value}" for name, value in hyperparameters.items()))


class JSONLinesLogger(Logger):
    """Appends one JSON object per call to ``path``: ``{"step": ..., metrics...}`` or ``{"hyperparameters": ...}``.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'log.jsonl')
        >>> logger = JSONLinesLogger(path); logger.log_metrics({'loss/train': 0.5}, step=3); logger.close()
        >>> open(path).read()
        '{"step": 3, "loss/train": 0.5}\\n'
    """

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, got {type(path).__name__}")
        self.path = os.fspath(path)
        self._file = None

    def _write(self, record: dict) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"step": step, **metrics})

    def log_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        self._write({"hyperparameters": {name: _jsonable(value) for name, value in hyperparameters.items()}})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


class InMemoryLogger(Logger):
    """Keeps ``(step, metrics)`` records in :attr:`records`, for tests and scripts that read results back.

    Example:
        >>> logger = InMemoryLogger(); logger.log_metrics({'loss/train': 0.5}, step=1)
        >>> logger.records
        [(1, {'loss/train': 0.5})]
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.hyperparameters: dict[str, Any] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        self.hyperparameters.update(hyperparameters)

    def last(self, name: str) -> Optional[float]:
        """The latest value logged under ``name`` (None if never logged)."""
        values = [metrics[name] for _, metrics in self.records if name in metrics]
        return values[-1] if values else None


class LoggerGroup:
    """The logger the Trainer and its algorithms call: fans out to ``loggers`` on rank 0, silent elsewhere.

    ``step`` defaults to the current batch count; tensor values become floats.

    Example:
        >>> memory = InMemoryLogger()
        >>> LoggerGroup([memory], enabled=True, current_step=lambda: 7).log_metrics({'a': torch.tensor(2.0)})
        >>> memory.records
        [(7, {'a': 2.0})]
    """

    def __init__(self, loggers: Iterable[Logger], enabled: bool, current_step: Callable[[], int]):
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not isinstance(logger, Logger):
                raise TypeError(f"loggers must be slipstream.trainer.Logger instances, got {type(logger).__name__}")
        self.enabled = enabled
        self.current_step = current_step

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Send ``metrics`` to every logger (tensors are read back to floats here)."""
        if not self.enabled or not self.loggers:
            return
        values = {name: float(v) if isinstance(v, torch.Tensor) else v for name, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, self.current_step() if step is None else step)

    def log_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        """Send the run's settings to every logger."""
        if self.enabled:
            for logger in self.loggers:
                logger.log_hyperparameters(hyperparameters)

    def close(self) -> None:
        """Close every logger."""
        for logger in self.loggers:
            logger.close()
