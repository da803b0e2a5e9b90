"""Every op and module takes its Triton kernel path where it should (under ``TRITON_INTERPRET=1``).

The PyTorch fallbacks compute the same values, so the numeric tests alone would pass if an op
silently fell back; these tests look at which kernels ran.
"""

import pytest
import torch

pytest.importorskip("triton")

from slipstream.nn import FusedGroupNorm, FusedLayerNorm, SeededDropout  # noqa: E402
from slipstream.ops import group_norm, layer_norm, seeded_dropout, seeded_dropout_rows  # noqa: E402


def _forward_and_backward(fn, x, *params):
    leaves = [x.requires_grad_(), *params]
    y = fn(x)
    torch.autograd.grad(y, leaves, torch.randn_like(y))


CASES = {
    "layer_norm": (lambda: torch.randn(3, 40), lambda x, w, b: layer_norm(x, 40, w, b), 40,
                   ["_forward_rows_kernel", "_backward_rows_kernel"]),
    "group_norm": (lambda: torch.randn(2, 6, 3, 3), lambda x, w, b: group_norm(x, 3, w, b), 6,
                   ["_forward_kernel", "_backward_kernel"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_norm_ops_launch_their_kernels_forward_and_backward(launched_kernels, name):
    make, op, channels, expected = CASES[name]
    w, b = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    _forward_and_backward(lambda x: op(x, w, b), make(), w, b)
    assert launched_kernels == expected


@pytest.mark.parametrize("module, make, expected", [
    (FusedLayerNorm(40), lambda: torch.randn(3, 40), ["_forward_rows_kernel", "_backward_rows_kernel"]),
    (FusedGroupNorm(3, 6), lambda: torch.randn(2, 6, 3, 3), ["_forward_kernel", "_backward_kernel"]),
    (SeededDropout(0.3, seed=1), lambda: torch.randn(3, 40), ["_seeded_dropout_kernel"] * 2),
])
def test_modules_launch_their_kernels_forward_and_backward(launched_kernels, module, make, expected):
    _forward_and_backward(module, make(), *module.parameters())
    assert launched_kernels == expected


def test_dropout_ops_launch_their_kernel_forward_and_backward(launched_kernels):
    _forward_and_backward(lambda x: seeded_dropout(x, 0.3, 5), torch.randn(3, 40))
    _forward_and_backward(lambda x: seeded_dropout_rows(x, 0.3, torch.arange(3)), torch.randn(3, 40))
    assert launched_kernels == ["_seeded_dropout_kernel"] * 4


def test_float64_dropout_takes_the_exact_pytorch_path(launched_kernels):
    """Triton would pass the scale 1 / (1 - p) as fp32: float64 runs the fallback, exact in float64."""
    x = torch.randn(3, 40, dtype=torch.float64)
    _forward_and_backward(lambda t: seeded_dropout(t, 0.3, 5), x)
    assert launched_kernels == []
    kept = seeded_dropout(x, 0.3, 5) != 0
    assert torch.equal(seeded_dropout(x, 0.3, 5)[kept], x[kept] * (1 / 0.7))
