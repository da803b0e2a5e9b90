"""Evaluation metrics as running (sum, count) pairs, added up over batches and reduced across ranks."""

from __future__ import annotations

from typing import Any, Optional

import torch

from slipstream.trainer.distributed import all_gather_object, all_reduce_sum

__all__ = ["MetricCounts", "accuracy_counts", "MetricSums"]

#: A metric's contribution from one batch: (sum of per-sample values, number of samples).
MetricCounts = tuple[torch.Tensor, torch.Tensor]

#: Targets with this value are not counted (the usual ignore index of cross-entropy).
IGNORE_INDEX = -100


def accuracy_counts(logits: Any, targets: Any) -> Optional[MetricCounts]:
    """(correct predictions, counted targets) when ``logits`` are class scores for ``targets``, else None.

    Targets equal to -100 are left out, as ``F.cross_entropy`` leaves them out.

    Example:
        >>> accuracy_counts(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        (tensor(1), tensor(2))
    """
    if not (isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if not logits.is_floating_point() or targets.is_floating_point() or logits.dim() < 1:
        return None
    if logits.shape[:-1] != targets.shape:
        return None
    counted = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & counted
    return correct.sum(), counted.sum()


class MetricSums:
    """Sums and counts per metric name over an evaluation; :meth:`compute` reduces them across ranks.

    Example:
        >>> sums = MetricSums(torch.device('cpu'))
        >>> sums.add('loss', torch.tensor(3.0), torch.tensor(2))
        >>> sums.add('loss', torch.tensor(1.0), torch.tensor(2))
        >>> sums.compute()
        {'loss': 1.0}
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add one batch's sum and count for ``name`` (kept on the device: no synchronization).

        Either may be a number or a tensor on any device (a count is often a CPU tensor).
        """
        pair = torch.stack([torch.as_tensor(value, device=self.device).double() for value in (total, count)])
        if name in self.totals:
            self.totals[name] += pair
        else:
            self.totals[name] = pair

    def compute(self) -> dict[str, float]:
        """Sum over ranks, then ``sum / count`` per metric (metrics no rank counted are left out)."""
        names = sorted({name for rank_names in all_gather_object(sorted(self.totals)) for name in rank_names})
        if not names:
            return {}
        zeros = torch.zeros(2, dtype=torch.float64, device=self.device)
        stacked = all_reduce_sum(torch.stack([self.totals.get(name, zeros) for name in names]))
        return {name: float(total / count) for name, (total, count) in zip(names, stacked.tolist()) if count > 0}
