"""Integer helpers for launchers' grid and tile arithmetic, as plain Python functions, plan lookup and launch keys.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` s (callable inside kernels
too), so each host call unwraps its arguments first: several microseconds per launch that these
plain versions do not spend. Same results for the integers launchers use (>= 0 and >= 1).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, TypeVar

import triton

__all__ = ["cdiv", "next_power_of_2", "memoized_plan", "launch_key"]

Plan = TypeVar("Plan")
_INT = frozenset({int})
_launch_keys = itertools.count()


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


def memoized_plan(plan: "functools._lru_cache_wrapper[Plan]", sizes: tuple, *rest: object) -> Plan:
    """``plan(*sizes, *rest)`` for an ``lru_cache`` d ``plan``: a cache lookup unless a size is symbolic.

    ``sizes`` are the key's sizes and strides, the only parts that can be SymInts (while
    torch.compile traces a launcher); the rest of the key is plain by construction. A plan of
    SymInts is computed every time: it belongs to one trace, and SymInts cannot be cache keys.

    Example:
        >>> @functools.lru_cache(maxsize=None)
        ... def grid(n, block):
        ...     return (cdiv(n, block),)
        >>> memoized_plan(grid, (10,), 4), grid.cache_info().currsize
        ((3,), 1)
    """
    lookup: Callable[..., Plan] = plan if _INT.issuperset(map(type, sizes)) else plan.__wrapped__
    return lookup(*sizes, *rest)


def launch_key() -> int:
    """A new key for one memoized launch configuration (see ``slipstream.ops._triton_op.launch_keyed``).

    Each call returns another int, so a plan evicted from its cache and rebuilt gets a fresh key
    (an ``id`` could be reused by a different plan).

    Example:
        >>> launch_key() != launch_key()
        True
    """
    return next(_launch_keys)
