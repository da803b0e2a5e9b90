"""Dataloaders as the Trainer iterates them: sharded over ranks, reshuffled per epoch, resumable.

A plain ``DataLoader`` over a map-style dataset with the default random or sequential sampler is
rebuilt around a :class:`ShardSampler` (a ``DistributedSampler``), so each epoch's order is a pure
function of (seed, epoch), every rank takes its own shard, and a resumed run starts mid-epoch by
skipping indices rather than loading and dropping batches. Other loaders are used as they are: in a
world larger than one they must bring their own ``DistributedSampler`` (or an ``IterableDataset``
that shards itself).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

__all__ = ["ShardSampler", "EpochLoader", "shard_eval_loader", "move_to_device", "batch_size_of"]

# DataLoader arguments the Trainer chooses itself when it rebuilds a loader.
_REBUILT_ARGUMENTS = {"self", "dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator"}


class ShardSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start mid-epoch and, for evaluation, shard without padding.

    ``pad=True`` (training) repeats a few indices so every rank gets as many samples as the others
    (ranks must take the same number of steps); ``pad=False`` (evaluation) counts each sample once.
    :meth:`skip_next` makes the next pass start ``n`` samples into this rank's shard.

    Example:
        >>> sampler = ShardSampler(range(5), num_replicas=2, rank=1, shuffle=False, pad=False)
        >>> list(sampler)
        [1, 3]
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, shuffle: bool, seed: int = 0, pad: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad = pad
        self._skip = 0

    def _shard_len(self) -> int:
        if self.pad:
            return self.num_samples
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def skip_next(self, samples: int) -> None:
        """Start the next pass ``samples`` indices in (once; later passes start at 0)."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        shard = list(super().__iter__())[: self._shard_len()]
        return iter(shard[skip:])

    def __len__(self) -> int:
        return self._shard_len()


def _rebuildable(loader: Any) -> bool:
    """A plain DataLoader whose sampling the Trainer can take over without changing its meaning."""
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return False
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return not sampler.replacement and sampler._num_samples is None
    return isinstance(sampler, SequentialSampler)


def _rebuild(loader: DataLoader, sampler: ShardSampler, generator: Optional[torch.Generator],
             drop_last: Optional[bool] = None) -> DataLoader:
    """A copy of ``loader`` drawing indices from ``sampler`` (every other argument kept, ``drop_last`` if None)."""
    kept = {
        name: getattr(loader, name)
        for name in inspect.signature(DataLoader.__init__).parameters
        if name not in _REBUILT_ARGUMENTS and hasattr(loader, name)
    }
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      drop_last=loader.drop_last if drop_last is None else drop_last, generator=generator, **kept)


def _checked_len(loader: Any, argument: str) -> int:
    try:
        length = len(loader)
    except TypeError as error:
        raise TypeError(f"{argument} must have a length (len() of the dataloader), "
                        f"got {type(loader).__name__}") from error
    if length == 0:
        raise ValueError(f"{argument} has length 0 (no batches): its dataset is empty or smaller than one "
                         "batch with drop_last=True")
    return length


class EpochLoader:
    """The train dataloader: epoch ``e`` is shuffled by ``(seed, e)`` and sharded over the ranks.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(6.0))
        >>> loader = EpochLoader(DataLoader(data, batch_size=2, shuffle=True), rank=0, world_size=1, seed=0)
        >>> len(loader), len(list(loader.epoch(0, skip_batches=1)))
        (3, 2)
    """

    def __init__(self, loader: Any, rank: int, world_size: int, seed: int):
        _checked_len(loader, "train_dataloader")
        self.seed = seed
        self.sampler: Optional[ShardSampler] = None
        self.generator: Optional[torch.Generator] = None
        if _rebuildable(loader):
            self.sampler = ShardSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                        shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
            # The loader's own generator seeds its workers; owning it keeps the global RNG untouched.
            self.generator = torch.Generator()
            loader = _rebuild(loader, self.sampler, self.generator)
        elif world_size > 1 and not isinstance(getattr(loader, "sampler", None), DistributedSampler) \
                and not isinstance(getattr(loader, "dataset", None), IterableDataset):
            raise ValueError(
                f"train_dataloader uses {type(loader.sampler).__name__} with {world_size} processes; give it a "
                "torch.utils.data.DistributedSampler (or use a plain DataLoader with shuffle=True/False, which "
                "the Trainer shards itself)"
            )
        self.loader = loader
        self.length = _checked_len(loader, "train_dataloader (this rank's shard)")

    def __len__(self) -> int:
        return self.length

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Any]:
        """The batches of ``epoch``, without its first ``skip_batches`` (a resumed epoch)."""
        if self.sampler is None:
            if hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
                self.loader.sampler.set_epoch(epoch)
            elif skip_batches:
                warnings.warn(
                    f"resuming mid-epoch with a {type(self.loader).__name__} the Trainer does not rebuild: unless its "
                    f"order is fixed, skipping {skip_batches} batches of a newly drawn order repeats some samples "
                    "and skips others. Use a plain DataLoader (shuffle=True/False), a sampler with set_epoch(), or "
                    "save at epoch ends (save_interval='1ep')"
                )
            return itertools.islice(iter(self.loader), skip_batches, None)
        self.sampler.seed = self.seed  # a resumed run takes the seed its checkpoint was shuffled with
        self.sampler.set_epoch(epoch)
        self.sampler.skip_next(skip_batches * self.loader.batch_size)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)


def shard_eval_loader(loader: Any, rank: int, world_size: int) -> Any:
    """The eval dataloader, each sample on one rank only (as it is in a world of one).

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(5.0))
        >>> len(shard_eval_loader(DataLoader(data, batch_size=2), rank=1, world_size=2).sampler)
        2
    """
    _checked_len(loader, "eval_dataloader")
    if world_size == 1 or isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    if not _rebuildable(loader):
        warnings.warn(f"eval_dataloader with {type(getattr(loader, 'sampler', None)).__name__} is not sharded: "
                      "every rank evaluates all of it (metrics stay right, the work is repeated)")
        return loader
    # The samples a one-process pass evaluates (with drop_last, the whole batches), each on one rank; no
    # rank drops a partial batch of its own shard.
    samples = len(loader.dataset)
    if loader.drop_last:
        samples -= samples % loader.batch_size
    sampler = ShardSampler(range(samples), num_replicas=world_size, rank=rank, shuffle=False, pad=False)
    return _rebuild(loader, sampler, loader.generator, drop_last=False)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (inside tuples, lists and dicts) moved to ``device``.

    Example:
        >>> move_to_device({'x': torch.ones(1)}, torch.device('cpu'))
        {'x': tensor([1.])}
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of the first tensor found in it.

    Example:
        >>> batch_size_of((torch.ones(3, 2), torch.ones(3)))
        3
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size_of(value)
        if size:
            return size
    return 0
