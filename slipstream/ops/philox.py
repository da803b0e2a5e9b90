"""Philox-4x32-10 in pure PyTorch: the same stream Triton's ``tl.philox`` draws on the GPU.

Every seeded op in slipstream (dropout, sparse JL) derives its randomness from
``philox(seed, c0, c1, c2, c3)`` with 32-bit counter words, so the CPU fallback reproduces the
kernel's masks bit for bit. Kernels call ``tl.philox`` with explicit ``uint32`` counters (never a
64-bit offset, whose handling differs between Triton versions).

Values are carried in int64 tensors holding unsigned 32-bit words; products are split into 16-bit
halves so nothing overflows int64.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["philox", "split_u64", "MASK32"]

MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of constant ``a`` and words ``b``."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2**48
    p_lo = a * b_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def split_u64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of non-negative int64 values (a 64-bit counter as two Philox words)."""
    return x & MASK32, (x >> 32) & MASK32


def philox(
    seed: Union[int, torch.Tensor],
    c0: torch.Tensor,
    c1: Union[torch.Tensor, int] = 0,
    c2: Union[torch.Tensor, int] = 0,
    c3: Union[torch.Tensor, int] = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four 32-bit random words per counter, as int64 tensors in ``[0, 2**32)``.

    ``seed`` is a 64-bit integer (or an int64 tensor broadcasting against the counters, e.g. one
    seed per row); its low and high words form the Philox key, exactly as in ``tl.philox``.

    Example:
        >>> r0, r1, r2, r3 = philox(1234, torch.arange(4))
        >>> r0.dtype, int(r0.max()) < 2**32
        (torch.int64, True)
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64) & MASK32
    device = c0.device
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) & MASK32 for c in (c1, c2, c3))
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device)
    k0 = seed_t & MASK32
    k1 = (seed_t >> 32) & MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & MASK32
        k1 = (k1 + _KEY_B) & MASK32
    return c0, c1, c2, c3
