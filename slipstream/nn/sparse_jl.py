"""Random-projection layer whose sparse projection matrix is regenerated from a seed, never stored."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from slipstream.ops.sparse_jl import SPARSITIES, sparse_jl, sparse_jl_matrix

__all__ = ["SparseJL"]

_SEED_LIMIT = 2**63  # seeds are non-negative int64 values


class SparseJL(nn.Module):
    """``y = x @ S``: a seeded sparse Johnson-Lindenstrauss projection from ``in_features`` to ``out_features``.

    ``S`` has entries ``0`` or ``+-sqrt(sparsity / out_features)`` (nonzero with probability
    ``1 / sparsity``), so ``E ||y||^2 = ||x||^2`` and pairwise distances are kept within ``1 +- eps``
    for ``out_features = O(log n / eps^2)``. It is a pure function of the seed, rebuilt inside the
    kernel on every call (see :func:`slipstream.ops.sparse_jl`): the module has no parameters and no
    buffers, and its ``state_dict`` holds the seed alone (as extra state). ``S`` is fixed, not
    trained; gradients flow to the input. ``seed=None`` draws one from PyTorch's global generator,
    so ``torch.manual_seed`` makes it reproducible.

    Example:
        >>> proj = SparseJL(512, 64, seed=7)
        >>> proj(torch.randn(3, 512)).shape
        torch.Size([3, 64])
        >>> dict(proj.state_dict())
        {'_extra_state': {'seed': 7}}
    """

    def __init__(self, in_features: int, out_features: int, seed: Optional[int] = None, sparsity: int = 2) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(sparsity, bool) or sparsity not in SPARSITIES:
            raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.sparsity = sparsity
        self.seed = int(torch.randint(0, _SEED_LIMIT - 1, ())) if seed is None else _check_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        return sparse_jl(x, self.out_features, self.seed, self.sparsity)

    def projection_matrix(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """The ``(in_features, out_features)`` matrix ``S`` this layer multiplies by, materialized.

        Example:
            >>> proj = SparseJL(16, 8, seed=1)
            >>> x = torch.randn(2, 16)
            >>> torch.allclose(proj(x), x @ proj.projection_matrix(), atol=1e-6)
            True
        """
        return sparse_jl_matrix(self.in_features, self.out_features, self.seed, self.sparsity, dtype=dtype, device=device)

    def get_extra_state(self) -> dict:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.seed = _check_seed(state["seed"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, seed={self.seed}, sparsity={self.sparsity}"


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    return seed
