"""The launchers' plain-Python grid arithmetic gives Triton's results; launch plans are memoized for plain sizes only."""

import pytest

pytest.importorskip("triton")


def test_host_math_matches_triton():
    import triton

    from slipstream.ops.kernels.host_math import cdiv, next_power_of_2

    for n in [1, 2, 3, 7, 8, 9, 1000, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 8, 128):
            assert cdiv(n, d) == triton.cdiv(n, d)
    assert cdiv(0, 8) == triton.cdiv(0, 8) == 0



def test_memoized_plan_caches_plain_sizes_and_computes_symbolic_ones():
    import functools

    from slipstream.ops.kernels.host_math import memoized_plan

    @functools.lru_cache(maxsize=None)
    def plan(n, block):
        return n // block

    assert memoized_plan(plan, (64,), 8) == memoized_plan(plan, (64,), 8) == 8
    assert plan.cache_info().hits == 1 and plan.cache_info().currsize == 1

    class SymbolicSize(int):  # stands in for a SymInt: not exactly an int, so never a cache key
        pass

    assert memoized_plan(plan, (SymbolicSize(64),), 8) == 8
    assert plan.cache_info().currsize == 1
