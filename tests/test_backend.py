"""slipstream.ops._backend: which backend runs, and pytorch_fallback() forcing the fallbacks."""

import torch

from slipstream.ops import layer_norm, pytorch_fallback, seeded_dropout
from slipstream.ops._backend import interpreting, triton_available, use_triton


def test_pytorch_fallback_turns_kernels_off_and_back_on():
    x = torch.randn(3, 40) * 2 + 1
    kernels_here = triton_available() and interpreting()
    assert use_triton(x) == kernels_here
    with pytorch_fallback():
        assert not use_triton(x)
        with pytorch_fallback():  # nests
            assert not use_triton(x)
        assert not use_triton(x)
        fallback = (layer_norm(x, 40), seeded_dropout(x, 0.3, 5))
    assert use_triton(x) == kernels_here
    kernel = (layer_norm(x, 40), seeded_dropout(x, 0.3, 5))
    assert torch.allclose(kernel[0], fallback[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(kernel[1] != 0, fallback[1] != 0)  # the same mask from the same seed


def test_pytorch_fallback_is_left_on_error():
    try:
        with pytorch_fallback():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert use_triton(torch.ones(1)) == (triton_available() and interpreting())


def test_triton_available_traces_without_graph_breaks_or_warnings():
    import warnings

    def double_if_triton(x):
        return x * 2 if triton_available() else x

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(double_if_triton)(torch.ones(3))
    assert explained.graph_break_count == 0
    assert not [w for w in caught if "lru_cache" in str(w.message)]
