"""Every random number generator a training run draws from: seeding, capturing and restoring them.

Covers Python's ``random``, NumPy's global generator (when NumPy is installed), PyTorch's CPU
generator and the current CUDA device's generator. States are plain tensors, ints and tuples so
checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state"]


def _numpy() -> Optional[Any]:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device) with ``seed``.

    Example:
        >>> seed_everything(7); a = torch.rand(1); seed_everything(7)
        >>> bool(torch.rand(1) == a)
        True
    """
    random.seed(seed)
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every generator this process uses.

    Example:
        >>> sorted(rng_state())[:2]
        ['numpy', 'python']
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = _numpy()
    if numpy is not None:
        kind, keys, position, has_gauss, gauss = numpy.random.get_state(legacy=True)
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (generators it did not capture are left alone).

    Example:
        >>> saved = rng_state(); a = torch.rand(1); set_rng_state(saved)
        >>> bool(torch.rand(1) == a)
        True
    """
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy = _numpy()
    if numpy is not None and "numpy" in state:
        kind, keys, position, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
