"""A tqdm progress bar per epoch showing the training loss and throughput (rank 0 only)."""

from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm.auto import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """One bar per epoch. The loss is read back from the device at most every ``refresh_s`` seconds,
    so the bar costs no synchronization per batch; throughput counts samples over all ranks.

    Example:
        >>> bar = ProgressBar(enabled=False)
        >>> bar.start_epoch(0, total_batches=10)
        >>> bar.update(samples=32, loss=torch.tensor(0.5)); bar.close()
    """

    def __init__(self, enabled: bool, refresh_s: float = 0.5):
        self.enabled = enabled
        self.refresh_s = refresh_s
        self._bar: Optional[tqdm] = None
        self._samples = 0
        self._since = 0.0

    def start_epoch(self, epoch: int, total_batches: int, done_batches: int = 0) -> None:
        """Open the bar of ``epoch`` (0-based), ``done_batches`` of ``total_batches`` already done."""
        self.close()
        if self.enabled:
            self._bar = tqdm(total=total_batches, initial=done_batches, desc=f"epoch {epoch + 1}",
                             dynamic_ncols=True, leave=True)
        self._samples, self._since = 0, time.perf_counter()

    def update(self, samples: int, loss: torch.Tensor) -> None:
        """One batch of ``samples`` (all ranks) done with ``loss``."""
        if self._bar is None:
            return
        self._samples += samples
        self._bar.update(1)
        elapsed = time.perf_counter() - self._since
        if elapsed >= self.refresh_s:
            value = float(loss)  # waits for the device: this is what makes the throughput honest
            elapsed = time.perf_counter() - self._since
            self._bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{self._samples / elapsed:.0f}")
            self._samples, self._since = 0, time.perf_counter()

    def close(self) -> None:
        """Close the open bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
