"""Integer helpers for launchers' grid and tile arithmetic, as plain Python functions.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` s (callable inside kernels
too), so each host call unwraps its arguments first: several microseconds per launch that these
plain versions do not spend. Same results for the integers launchers use (>= 0 and >= 1).
"""

from __future__ import annotations

import triton

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ints, ``y > 0``.

    Example:
        >>> cdiv(10, 4), cdiv(8, 4)
        (3, 2)
    """
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n``, for ``n >= 1``.

    Example:
        >>> next_power_of_2(1), next_power_of_2(5), next_power_of_2(64)
        (1, 8, 64)
    """
    if type(n) is not int:  # a symbolic size while torch.compile traces a launcher: Triton's bit twiddling
        return triton.next_power_of_2(n)
    return 1 << (n - 1).bit_length()
