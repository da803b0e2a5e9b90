"""Which backend an op runs on: a Triton kernel or the pure-PyTorch fallback.

Triton is imported lazily (only when a kernel is about to run), so ``import slipstream`` works on
machines without Triton. Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
is set (in the environment slipstream is imported in): that is how CI checks the kernels on a
machine with no GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

__all__ = ["triton_available", "interpreting", "use_triton", "pytorch_fallback"]

_fallback_depth = 0  # > 0 inside pytorch_fallback()
# Looked up once, at import (without importing Triton). A module constant, not a cached function:
# Dynamo ignores an lru_cache wrapper and traces into ``find_spec``. On the H200 (torch 2.11)
# resnet50_gn with LPGroupNorm, which checks this in forward, compiled with 32 graph breaks and a
# Dynamo warning at that check.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_FOUND


# Read once, as Triton reads it once per kernel (when ``@triton.jit`` defines it): each call of an op
# asks, and an environment lookup cost about 0.6 us of host time a time on a 2-core dev machine.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` when slipstream was imported)."""
    return _INTERPRETING


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should run its Triton kernel rather than the PyTorch fallback."""
    if _fallback_depth or not _TRITON_FOUND:
        return False
    if x.is_cuda:
        return not _INTERPRETING
    return _INTERPRETING and x.device.type == "cpu"


@contextlib.contextmanager
def pytorch_fallback() -> Iterator[None]:
    """Run every slipstream op on its pure-PyTorch fallback inside the block, even on CUDA.

    The fallbacks compute the same function as the kernels (dropout: the same masks for the same
    seeds), so a model run once with kernels and once inside this block should agree up to float
    rounding: a way to tell a kernel bug from a modelling one. Not thread-aware; for debugging.

    Example:
        >>> from slipstream.ops import layer_norm
        >>> with pytorch_fallback():
        ...     y = layer_norm(torch.randn(2, 8), 8)
        >>> use_triton(torch.ones(1, device="meta"))
        False
    """
    global _fallback_depth
    _fallback_depth += 1
    try:
        yield
    finally:
        _fallback_depth -= 1
