"""Seeded dropout ops: the Philox stream, masks, values, gradients, strides, bad input, torch.compile.

With ``TRITON_INTERPRET=1`` (CI) the ops run the Triton kernel on CPU tensors, and every comparison
with ``seeded_dropout_reference`` / ``keep_mask`` checks the kernel against the PyTorch stream.
"""

import math

import pytest
import torch

from slipstream.ops import seeded_dropout, seeded_dropout_rows
from slipstream.ops._backend import interpreting, use_triton
from slipstream.ops.dropout import (
    keep_mask,
    keep_threshold,
    seeded_dropout_reference,
    seeded_dropout_rows_reference,
)
from slipstream.ops.philox import philox

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: Largest relative error against float64 that passes: one rounding of x / (1 - p).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-14}
needs_kernel = pytest.mark.skipif(not interpreting(), reason="runs the Triton kernel on CPU: needs TRITON_INTERPRET=1")


def rel_err(out, ref):
    return float((out.detach().double() - ref).norm() / ref.norm())


def random_seed():
    return int(torch.randint(-(2**63), 2**63 - 1, ()))


# ----- the stream -----------------------------------------------------------------------------------


def test_keep_mask_follows_the_documented_stream():
    """Column 8g+j takes word j%4 of philox(seed, g), low 16 bits for j<4, high for j>=4."""
    seed, p = random_seed(), 0.37
    mask = keep_mask(torch.tensor(seed), p, 8 * 5)[0]
    words = philox(seed, torch.arange(5))
    for col in range(40):
        group, lane = divmod(col, 8)
        number = (int(words[lane % 4][group]) >> (16 * (lane // 4))) & 0xFFFF
        assert bool(mask[col]) == (number >= keep_threshold(p))


def test_keep_mask_start_selects_columns():
    seeds = torch.tensor([random_seed(), random_seed()])
    full = keep_mask(seeds, 0.5, 100)
    assert torch.equal(keep_mask(seeds, 0.5, 100, start=13), full[:, 13:])


# ----- values and masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 203), (1, 1001), (5, 3), (2, 3, 17), (9,)])
def test_matches_float64_reference_and_mask(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    seed, p = random_seed(), 0.3
    out = seeded_dropout(x, p, seed)
    ref = seeded_dropout_reference(x.double(), p, seed)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out != 0, ref != 0)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 203), (1, 1001), (6, 8), (13, 1)])
def test_rows_match_float64_reference_and_mask(shape, dtype):
    x = torch.randn(shape, dtype=dtype) - 0.25
    seeds = torch.randint(-(2**63), 2**63 - 1, (shape[0],))
    out = seeded_dropout_rows(x, 0.45, seeds)
    ref = seeded_dropout_rows_reference(x.double(), 0.45, seeds)
    assert torch.equal(out != 0, ref != 0)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_same_seed_same_mask_other_seeds_differ():
    x = torch.randn(64, 129)
    seed, p = random_seed(), 0.5
    a, b = seeded_dropout(x, p, seed), seeded_dropout(x, p, seed)
    assert torch.equal(a, b)
    for other in (seed + 1, seed ^ (1 << 40), -seed - 1):
        changed = ((seeded_dropout(x, p, other) != 0) != (a != 0)).float().mean().item()
        assert abs(changed - 2 * p * (1 - p)) < 0.05  # independent masks disagree with prob 2p(1-p)


def test_seed_tensor_equals_int_seed():
    x = torch.randn(10, 30)
    assert torch.equal(seeded_dropout(x, 0.2, 99), seeded_dropout(x, 0.2, torch.tensor(99)))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bound(p):
    x = torch.rand(300, 700) + 0.5  # never zero
    kept = (seeded_dropout(x, p, random_seed()) != 0).double().mean().item()
    n = x.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_kept_values_are_scaled_by_one_over_one_minus_p():
    x = torch.randn(50, 77, dtype=torch.float64)
    p = 0.25
    out = seeded_dropout(x, p, random_seed())
    kept = out != 0
    assert kept.any() and (~kept).any()
    assert rel_err(out[kept], x[kept] / (1 - p)) < 1e-12


@pytest.mark.parametrize("shape", [(23, 45), (4, 9, 5)])
def test_gradient_is_mask_times_dy_over_one_minus_p(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    seed, p = random_seed(), 0.4
    out = seeded_dropout(x, p, seed)
    dy = torch.randn(shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, dy)
    mask = (out != 0).double()
    assert rel_err(dx, mask * dy / (1 - p)) < 1e-12


def test_rows_gradient_and_gradcheck():
    x = torch.randn(7, 19, dtype=torch.float64, requires_grad=True)
    seeds = torch.randint(0, 2**62, (7,))
    assert torch.autograd.gradcheck(lambda t: seeded_dropout_rows(t, 0.3, seeds), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: seeded_dropout(t, 0.3, 5), (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: the kernel under the interpreter
@pytest.mark.parametrize("rows", [False, True])
def test_second_order_gradients_go_through_the_mask(dtype, rows):
    """With create_graph=True (gradient penalties) the gradient is dropout of dy, itself differentiable."""
    x = torch.randn(6, 21, dtype=dtype)
    w = torch.randn(6, 21, dtype=dtype, requires_grad=True)
    seeds = torch.arange(6) + random_seed() % 2**40

    def drop(t):
        return seeded_dropout_rows(t, 0.5, seeds) if rows else seeded_dropout(t, 0.5, int(seeds[0]))

    (g,) = torch.autograd.grad(drop(x * w).pow(2).sum(), w, create_graph=True)
    (h,) = torch.autograd.grad(g.sum() + w.pow(2).sum(), w)
    scaled_mask = drop(torch.ones_like(x)).double()  # 0 or 1 / (1 - p)
    assert rel_err(h, 2 * x.double() ** 2 * scaled_mask**2 + 2 * w.detach().double()) < TOLERANCE[dtype]
    x64 = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: seeded_dropout_rows(t, 0.3, seeds[:5]), (x64,))


# ----- per-row seeds and strides --------------------------------------------------------------------


def test_rows_are_independent_of_each_other():
    x = torch.randn(6, 301) + 3
    seeds = torch.randint(0, 2**62, (6,))
    out = seeded_dropout_rows(x, 0.5, seeds)
    changed = seeds.clone()
    changed[2] += 1
    other = seeded_dropout_rows(x, 0.5, changed)
    unchanged_rows = [0, 1, 3, 4, 5]
    assert torch.equal(other[unchanged_rows], out[unchanged_rows])
    assert not torch.equal(other[2] != 0, out[2] != 0)
    same = seeded_dropout_rows(x, 0.5, seeds[[1, 1, 1, 1, 1, 1]])
    assert all(torch.equal(same[0] != 0, same[i] != 0) for i in range(6))


def test_one_seed_is_one_row_of_the_rows_op():
    x = torch.randn(4, 50)
    seed = random_seed()
    out = seeded_dropout(x, 0.3, seed)
    assert torch.equal(out.view(1, -1), seeded_dropout_rows(x.reshape(1, -1), 0.3, torch.tensor([seed])))


@pytest.mark.parametrize("make_view", [
    lambda t: t.t().contiguous().t(),     # column-major storage
    lambda t: t.t().contiguous().t()[:, 1:],
    lambda t: torch.cat([t, t], dim=1)[:, ::2],
    lambda t: torch.cat([t, t], dim=0)[::2],
    lambda t: t[:1].expand(t.shape[0], -1),  # row stride 0
], ids=["transposed", "transposed-sliced", "column-step", "row-step", "expanded"])
def test_rows_strided_equals_contiguous(make_view):
    x = torch.randn(33, 70)
    seeds = torch.randint(-(2**63), 2**63 - 1, (33,))
    view = make_view(x)
    contiguous = view.contiguous()
    assert torch.equal(seeded_dropout_rows(view, 0.35, seeds), seeded_dropout_rows(contiguous, 0.35, seeds))
    dy = torch.randn_like(contiguous)
    grads = []
    for t in (view, contiguous):
        t = t.detach().requires_grad_()
        (g,) = torch.autograd.grad(seeded_dropout_rows(t, 0.35, seeds), t, dy)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_rows_keep_a_transposed_layout():
    x = torch.randn(40, 24).t()
    out = seeded_dropout_rows(x, 0.5, torch.arange(24))
    assert out.stride() == x.stride()


def test_non_contiguous_input_equals_contiguous_copy():
    x = torch.randn(12, 31).t()
    assert torch.equal(seeded_dropout(x, 0.3, 8), seeded_dropout(x.contiguous(), 0.3, 8))


def test_rows_seeds_may_be_a_strided_view():
    x = torch.randn(5, 40)
    seeds = torch.randint(0, 2**62, (10,))
    assert torch.equal(seeded_dropout_rows(x, 0.5, seeds[::2]), seeded_dropout_rows(x, 0.5, seeds[::2].clone()))


# ----- edge cases -----------------------------------------------------------------------------------


def test_p_zero_is_a_copy_and_p_one_is_zeros():
    x = torch.randn(9, 21, requires_grad=True)
    assert torch.equal(seeded_dropout(x, 0.0, 3), x)
    zeros = seeded_dropout(x, 1.0, 3)
    assert torch.equal(zeros, torch.zeros_like(x))
    (dx,) = torch.autograd.grad(zeros, x, torch.randn_like(x))
    assert torch.equal(dx, torch.zeros_like(x))
    assert torch.equal(seeded_dropout_rows(x, 1.0, torch.arange(9)), torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0)])
def test_empty_tensors(shape):
    x = torch.randn(shape, requires_grad=True)
    assert seeded_dropout(x, 0.5, 1).shape == shape
    if len(shape) == 2:
        out = seeded_dropout_rows(x, 0.5, torch.arange(shape[0]))
        assert out.shape == shape
        out.sum().backward()


@needs_kernel
@pytest.mark.parametrize("int64", [True, False])
def test_kernel_64_bit_indexing_path_matches_reference(int64):
    from slipstream.ops.kernels.dropout import launch_seeded_dropout

    x = torch.randn(11, 90).t()  # strided, and wider than one group
    seeds = torch.randint(-(2**63), 2**63 - 1, (90,))
    out = torch.full_like(x, float("nan"))
    launch_seeded_dropout(x, out, keep_threshold(0.4), 1 / 0.6, seeds=seeds, int64=int64)
    assert torch.equal(out, seeded_dropout_rows_reference(x, 0.4, seeds))


@needs_kernel
def test_kernel_launch_plan_is_cached_per_shape():
    """A second launch with the same sizes and strides looks its plan up, and writes the same values."""
    from slipstream.ops.kernels import dropout as kernels

    x = torch.randn(23, 77)
    seeds = torch.randint(-(2**63), 2**63 - 1, (23,))
    outs = [torch.full_like(x, float("nan")) for _ in range(2)]
    kernels.launch_seeded_dropout(x, outs[0], keep_threshold(0.3), 1 / 0.7, seeds=seeds)
    hits = kernels._plan.cache_info().hits
    kernels.launch_seeded_dropout(x, outs[1], keep_threshold(0.3), 1 / 0.7, seeds=seeds)
    assert kernels._plan.cache_info().hits == hits + 1
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], seeded_dropout_rows_reference(x, 0.3, seeds))


def test_kernel_seeds_of_both_widths_in_turn():
    """Triton types the seed by its width: launches alternating int32-range and wider seeds (the keyed
    launches memoize one compiled kernel per width) each match the reference."""
    x = torch.randn(6, 50, device="cuda" if torch.cuda.is_available() else "cpu")
    if not use_triton(x):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    for seed in (5, -(2**40), 2**31 - 1, 2**31, -(2**31), 5):
        assert torch.equal(seeded_dropout(x, 0.3, seed), seeded_dropout_reference(x, 0.3, seed)), seed


# ----- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                     ("0.5", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_p(p, error):
    with pytest.raises(error, match="p"):
        seeded_dropout(torch.randn(3), p, 1)
    with pytest.raises(error, match="p"):
        seeded_dropout_rows(torch.randn(2, 3), p, torch.arange(2))


@pytest.mark.parametrize("seed,error", [(1.5, TypeError), (True, TypeError), (2**63, ValueError),
                                        (-(2**63) - 1, ValueError), (torch.tensor([1, 2]), TypeError),
                                        (torch.tensor(1.0), TypeError), ("7", TypeError)])
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        seeded_dropout(torch.randn(3), 0.5, seed)


def test_bad_x():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        seeded_dropout(torch.arange(4), 0.5, 1)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        seeded_dropout([1.0, 2.0], 0.5, 1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        seeded_dropout_rows(torch.randn(2, 3, 4), 0.5, torch.arange(2))


@pytest.mark.parametrize("seeds,error,message", [
    (torch.arange(3), ValueError, "one seed per row"),
    (torch.arange(4, dtype=torch.int32), TypeError, "int64"),
    (torch.arange(4).view(2, 2), TypeError, "1-D"),
    ([1, 2, 3, 4], TypeError, "int64"),
    (torch.arange(4, device="meta"), ValueError, "device"),
])
def test_bad_seeds(seeds, error, message):
    with pytest.raises(error, match=message):
        seeded_dropout_rows(torch.randn(4, 5), 0.5, seeds)


# ----- torch.compile --------------------------------------------------------------------------------


def test_ops_compile_without_graph_breaks_and_match_eager(monkeypatch):
    monkeypatch.setattr("slipstream.config.compiled_dropout", "kernel")  # the path whose masks are eager's
    seeds = torch.randint(0, 2**62, (6,))

    def f(x):
        return seeded_dropout(x, 0.3, 11).sin() + seeded_dropout_rows(x, 0.2, seeds)

    x = torch.randn(6, 20, requires_grad=True)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    dy = torch.randn(6, 20)
    out = compiled(x)
    (dx,) = torch.autograd.grad(out, x, dy)
    ref = f(x)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    assert torch.equal(out, ref) and torch.allclose(dx, ref_dx)


def test_on_backward_is_called_when_backward_reaches_the_result():
    calls = []
    x = (torch.rand(6, 10) + 0.5).requires_grad_()
    y = seeded_dropout(x, 0.3, 9, on_backward=lambda: calls.append(len(calls)))
    assert calls == []
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert calls == [0]
    assert torch.equal(dx != 0, y != 0)
    with pytest.raises(TypeError, match="on_backward"):
        seeded_dropout(x, 0.3, 9, on_backward=3)
