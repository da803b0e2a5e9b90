"""The launchers' plain-Python grid arithmetic gives Triton's results."""

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

