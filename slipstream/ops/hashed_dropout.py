"""Seeded dropout in PyTorch ops that Inductor fuses: the compiled path ``compiled_dropout = "inductor"``.

The default compiled path launches the Philox kernel of :mod:`slipstream.ops.dropout` as a kernel of
its own, forward and backward, and Inductor splits its fused kernels around it; on host-bound steps
that made GPT-2 small + SeededDropout 0.70x the speed of torch.compile alone (docs/benchmarks.md,
session 10). This path instead writes the mask as PyTorch ops, which Inductor generates inside the
neighbouring kernels, as it does for its own dropout.

The stream: a seed ``s`` gives two 32-bit keys, ``a = mix(lo32(s) ^ mix(hi32(s) ^ K1))`` and
``b = mix(a ^ hi32(s) ^ K2)``; element ``c`` of a row keyed by ``s`` is kept when the top 16 bits of
``mix(mix(lo32(c) ^ a) ^ hi32(c) ^ b)`` reach :func:`keep_threshold(p)
<slipstream.ops.dropout.keep_threshold>`, where ``mix`` is a 32-bit integer finalizer
(xor-shift, multiply, xor-shift, multiply, xor-shift) and ``K1``, ``K2`` are constants. Every bit
of the seed reaches both keys: with the seed's halves XORed into the counter directly, seeds that
differ in their low bits gave the same mask with its columns permuted. It is a different stream
from the Philox kernel's: the same seed gives other masks than eager mode. Drop probability and scale are the
kernel's (``p`` rounded to a multiple of ``2**-16``, kept values times ``1 / (1 - p)``). Why a hash
and not Philox in tensor ops: Philox's 32 x 32-bit products do not fit int64 and must be split, and
each element would compute its whole group's Philox call; the finalizer's multipliers are below
``2**31``, so every product stays below ``2**63`` and is exact in int64 on every backend.

Memory: autograd would save the boolean mask (one byte an element). The mask is computed inside a
non-reentrant :func:`torch.utils.checkpoint.checkpoint` whose inputs are the seed and the column
indices, made outside it, so the compiler's partitioner recomputes the mask in backward and saves
just the seed, as eager SeededDropout does. In eager mode this path would keep the mask: the
dispatcher uses it only when compiling.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["hashed_keep_mask", "hashed_numbers", "hashed_dropout"]

_MASK32 = 0xFFFFFFFF
# Multipliers of a 32-bit finalizer from Chris Wellons' hash-prospector search; both below 2**31.
_MIX_1, _MIX_2 = 0x21F0AAAD, 0x735A2D97
_KEY_1, _KEY_2 = 0x9E3779B9, 0x85EBCA6B  # arbitrary odd constants (golden ratio; a murmur3 multiplier)


def _mix32(x: Tensor) -> Tensor:
    """A bijection of 32-bit words (held in int64) that spreads every input bit over the output."""
    x = x ^ (x >> 16)
    x = (x * _MIX_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_2) & _MASK32
    return x ^ (x >> 15)


def hashed_keep_mask(seeds: Tensor, threshold: int, n_cols: int, device: Optional[torch.device] = None) -> Tensor:
    """Boolean keep mask, shape ``(rows, n_cols)``, of the hashed stream for rows keyed by ``seeds``.

    ``seeds``: int64, one per row (a 0-d tensor is one row); ``threshold``: a 16-bit number must
    reach it to keep its element (:func:`~slipstream.ops.dropout.keep_threshold`). The mask is made
    on ``device`` (default: ``seeds``' device). A 0-d seed may stay on the CPU for a mask on
    another device (it enters as a scalar); the compiled dropout path moves it to the mask's
    device first, which CUDA graphs need.

    Example:
        >>> mask = hashed_keep_mask(torch.tensor([3, 4]), threshold=32768, n_cols=6)
        >>> mask.shape, mask.dtype
        (torch.Size([2, 6]), torch.bool)
        >>> torch.equal(mask[1], hashed_keep_mask(torch.tensor(4), 32768, 6)[0])
        True
    """
    if not isinstance(seeds, Tensor) or seeds.dtype != torch.int64:
        got = f"a {seeds.dtype} tensor" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise TypeError(f"seeds must be an int64 tensor, got {got}")
    cols = torch.arange(n_cols, device=seeds.device if device is None else device)
    keep = _keep_of_column_halves(seeds, *_column_halves(cols), threshold)
    return keep.unsqueeze(0) if seeds.dim() == 0 else keep


def hashed_numbers(seeds: Tensor, cols: Tensor) -> Tensor:
    """The 16-bit number of each column index in ``cols`` (int64, >= 0) in the row keyed by ``seeds`` (broadcast).

    Example:
        >>> hashed_numbers(torch.tensor([[1], [2]]), torch.arange(3)).shape
        torch.Size([2, 3])
    """
    return _numbers_of_column_halves(seeds, *_column_halves(cols))


def _column_halves(cols: Tensor) -> tuple[Tensor, Tensor]:
    return cols & _MASK32, cols >> 32


def _numbers_of_column_halves(seeds: Tensor, cols_lo: Tensor, cols_hi: Tensor) -> Tensor:
    # The keys are per seed (a scalar, or one per row), so their cost does not grow with the columns.
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key_a = _mix32(seed_lo ^ _mix32(seed_hi ^ _KEY_1))
    key_b = _mix32(key_a ^ seed_hi ^ _KEY_2)
    return _mix32(_mix32(cols_lo ^ key_a) ^ cols_hi ^ key_b) >> 16


def _keep_of_column_halves(seeds: Tensor, cols_lo: Tensor, cols_hi: Tensor, threshold: int) -> Tensor:
    rows_seeds = seeds if seeds.dim() == 0 else seeds.reshape(-1, 1)  # a 0-d seed stays a scalar wherever it lives
    return _numbers_of_column_halves(rows_seeds, cols_lo, cols_hi) >= threshold


def hashed_dropout(x: Tensor, seeds: Tensor, threshold: int, scale: float) -> Tensor:
    """``where(keep, x * scale, 0)`` with the hashed mask.

    One 0-d seed (on any device) numbers ``x``'s elements in row-major order (one row); a 1-D
    ``seeds`` on ``x``'s device keys each row of a 2-D ``x`` and numbers its columns. Arguments are
    the checked ones of :func:`slipstream.ops.seeded_dropout` / :func:`~slipstream.ops.seeded_dropout_rows`.

    Example:
        >>> x = torch.randn(4, 8)
        >>> y = hashed_dropout(x, torch.tensor(7), threshold=32768, scale=2.0)
        >>> bool(((y == 0) | (y == 2 * x)).all())
        True
    """
    one_row = seeds.dim() == 0
    cols = torch.arange(x.numel() if one_row else x.shape[1], device=x.device)
    # The column indices are made outside the checkpoint: the compiler shares them between dropouts of
    # one size, and a tensor one checkpointed region makes and another uses is saved for backward
    # (8 bytes an element). Outside any region they are free to recompute.
    keep = checkpoint(_keep_of_column_halves, seeds, *_column_halves(cols), threshold, use_reentrant=False,
                      preserve_rng_state=False)
    keep = keep.view(x.shape) if one_row else keep
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))
