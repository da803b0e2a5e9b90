"""slipstream.ops.layer_norm: kernels (TRITON_INTERPRET=1) and fallback against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from slipstream.ops._backend import use_triton
from slipstream.ops.layer_norm import layer_norm, layer_norm_backward_reference, layer_norm_forward_reference

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def random_case(shape, normalized_shape, dtype, param_dtype=None, affine=True, bias=True):
    """Random (never zero) x, weight, bias, dy; x is offset from zero as activations are."""
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape) * 3 + 2).to(dtype).requires_grad_()
    w = (torch.randn(normalized_shape) * 0.5 + 1).to(param_dtype).requires_grad_() if affine else None
    b = torch.randn(normalized_shape).to(param_dtype).requires_grad_() if affine and bias else None
    dy = torch.randn(shape).to(dtype)
    return x, w, b, dy


def check_against_float64(x, w, b, dy, normalized_shape, tol, out_dtype=None, dy_dtype=None, eps=1e-5):
    leaves = [t for t in (x, w, b) if t is not None]
    y = layer_norm(x, normalized_shape, w, b, eps, out_dtype=out_dtype)
    assert y.dtype == (out_dtype or x.dtype) and y.shape == x.shape
    grads = torch.autograd.grad(y, leaves, dy.to(dy_dtype or y.dtype))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64 = leaves64[0]
    w64 = leaves64[1] if w is not None else None
    b64 = leaves64[-1] if b is not None else None
    y64 = F.layer_norm(x64, normalized_shape, w64, b64, eps)
    grads64 = torch.autograd.grad(y64, leaves64, dy.to(dy_dtype or y.dtype).double())
    assert rel_err(y, y64) < tol
    for leaf, g, g64 in zip(leaves, grads, grads64):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert rel_err(g, g64) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33, 1000, 1537])
def test_forward_backward_match_float64(dtype, n):
    x, w, b, dy = random_case((5, n), (n,), dtype)
    if n == 1:  # a single element normalizes to zero: y = bias, dx = 0; compare absolutely
        y = layer_norm(x, (n,), w, b)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
        assert torch.equal(y, b.expand_as(y).to(dtype)) and not dx.any() and not dw.any()
        # db sums 5 values that may nearly cancel: bound the error by the sum of their magnitudes
        dy64 = dy.double()
        assert float((db.double() - dy64.sum(0)).abs().max() / dy64.abs().sum(0).max()) < TOL[dtype]
        return
    check_against_float64(x, w, b, dy, (n,), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row_and_leading_dims(dtype):
    x, w, b, dy = random_case((1, 300), (300,), dtype)
    check_against_float64(x, w, b, dy, (300,), TOL[dtype])
    x, w, b, dy = random_case((2, 3, 4, 37), (37,), dtype)
    check_against_float64(x, w, b, dy, (37,), TOL[dtype])


@pytest.mark.parametrize("shape,normalized", [((3, 4, 6, 5), (6, 5)), ((6, 5), (6, 5)), ((2, 6, 5), (2, 6, 5)),
                                              ((7,), (7,))])
def test_several_normalized_dims(shape, normalized):
    """Including every dimension normalized (one row), where the flat rows' shape differs from x's."""
    x, w, b, dy = random_case(shape, normalized, torch.float32)
    check_against_float64(x, w, b, dy, normalized, TOL[torch.float32])
    x_strided = (torch.randn(*shape[:-1], shape[-1] * 2) * 3 + 2)[..., ::2].requires_grad_()
    check_against_float64(x_strided, w, b, dy, normalized, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    wide = (torch.randn(9, 80) * 3 + 2).to(dtype)
    x = wide[:, 3:70].requires_grad_()  # rows of 67 with a row stride of 80: no copy
    _, w, b, dy = random_case((9, 67), (67,), dtype)
    check_against_float64(x, w, b, dy, (67,), TOL[dtype])
    xt = (torch.randn(40, 6) * 3 + 2).to(dtype).t().requires_grad_()  # transposed: copied once
    dyt = torch.randn(40, 6).to(dtype).t()  # a non-contiguous gradient too
    _, w, b, _ = random_case((6, 40), (40,), dtype)
    check_against_float64(xt, w, b, dyt, (40,), TOL[dtype])


def test_strided_weights_and_odd_strides_of_size_one_dims():
    """A 1-D weight view with stride 2 is read correctly; a contiguous x whose size-1 dim reports an
    arbitrary stride is read by its real row stride."""
    x, _, _, dy = random_case((5, 1, 33), (33,), torch.float32)
    x = x.detach().as_strided((5, 1, 33), (33, 7, 1)).requires_grad_()
    assert x.is_contiguous() and x.stride(1) == 7
    w = (torch.randn(66) * 0.5 + 1)[::2].requires_grad_()
    b = torch.randn(99)[::3].requires_grad_()
    check_against_float64(x, w, b, dy, (33,), TOL[torch.float32])


def test_broadcast_gradient():
    x, w, b, _ = random_case((4, 50), (50,), torch.float32)
    layer_norm(x, (50,), w, b).sum().backward()  # dy is an expanded tensor of stride 0
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.layer_norm(x64, (50,), w64, b.detach().double()).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5
    assert rel_err(b.grad, torch.full((50,), 4.0, dtype=torch.float64)) < 1e-6


# Rows of variance ~0.01 with eps = 0.1: eps dominates the denominator, so a kernel that dropped it would fail.
@pytest.mark.parametrize("n", [33, 300])
def test_eps_where_rows_barely_vary(n):
    x, w, b, dy = random_case((5, n), (n,), torch.float32)
    x = (x.detach() * 0.03).requires_grad_()
    check_against_float64(x, w, b, dy, (n,), 1e-5, eps=0.1)


def test_eps_in_the_fallback():
    x = torch.randn(6, 40, dtype=torch.float64) * 0.03
    y, _, rstd = layer_norm_forward_reference(x, None, None, 0.1, torch.float64)
    assert rel_err(y, F.layer_norm(x, (40,), eps=0.1)) < 1e-12
    assert rel_err(rstd, torch.rsqrt(x.var(1, unbiased=False) + 0.1)) < 1e-12


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_weight_or_bias(affine, bias, dtype):
    x, w, b, dy = random_case((6, 129), (129,), dtype, affine=affine, bias=bias)
    check_against_float64(x, w, b, dy, (129,), TOL[dtype])


def test_bias_without_weight():
    x, _, b, dy = random_case((6, 40), (40,), torch.float32)
    check_against_float64(x, None, b, dy, (40,), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_fp32_params(dtype):
    x, w, b, dy = random_case((7, 300), (300,), dtype, param_dtype=torch.float32)
    check_against_float64(x, w, b, dy, (300,), TOL[dtype])


def test_fp32_input_bf16_output():
    """The autocast case: fp32 residual stream in, bf16 out; dx comes back fp32, dW/dB fp32."""
    x, w, b, dy = random_case((9, 200), (200,), torch.float32)
    check_against_float64(x, w, b, dy, (200,), TOL[torch.bfloat16], out_dtype=torch.bfloat16, dy_dtype=torch.bfloat16)


@pytest.mark.parametrize("width", [8200, 16400])
def test_wide_rows_take_the_looped_paths(width):
    """Past 8192 the backward is column-tiled; past 16384 the forward loops over each row."""
    x, w, b, dy = random_case((3, width), (width,), torch.float32)
    check_against_float64(x, w, b, dy, (width,), 1e-5)


@pytest.mark.skipif(not use_triton(torch.empty(0)), reason="kernels run on CUDA or under TRITON_INTERPRET=1")
def test_kernel_paths_with_small_tilings():
    """Force the looped forward and the column-tiled backward on small rows, with masked tails."""
    from slipstream.ops.kernels import layer_norm as kernels

    for m, n, eps in [(1, 70, 1e-5), (11, 100, 1e-5), (11, 100, 0.1)]:
        x, w, b, dy = (t.detach() for t in random_case((m, n), (n,), torch.float32))
        if eps > 1e-3:  # rows of variance ~0.01, where eps matters
            x = x * 0.03
        y, stats = kernels.forward(x, w, b, eps, torch.float32, kernels.Tiling(1, 32, 4))
        ref_y, ref_mean, ref_rstd = layer_norm_forward_reference(x.double(), w, b, eps, torch.float64)
        assert rel_err(y, ref_y) < 1e-6 and rel_err(stats[0], ref_mean) < 1e-6 and rel_err(stats[1], ref_rstd) < 1e-6
        dx, dw, db = kernels.backward(dy, x, w, stats, b.dtype, kernels.Tiling(2, 32, 4, 1))
        ref = layer_norm_backward_reference(dy.double(), x.double(), w.double(), ref_mean, ref_rstd, torch.float64)
        for out, expected in zip((dx, dw, db), ref):
            assert rel_err(out, expected) < 1e-5


@pytest.mark.skipif(not use_triton(torch.empty(0)), reason="kernels run on CUDA or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("tiling", [None, (1, 32, 4, 1)])  # default tilings; the looped and column-tiled paths
def test_kernel_launch_plans_are_cached_per_shape(tiling):
    """Second launches with the same shapes look their plans up, and give the same bits."""
    from slipstream.ops.kernels import layer_norm as kernels

    tiling = kernels.Tiling(*tiling) if tiling else None
    x, w, b, dy = (t.detach() for t in random_case((9, 100), (100,), torch.float32))
    plans = (kernels._forward_plan, kernels._backward_plan)

    def run():
        y, stats = kernels.forward(x, w, b, 1e-5, torch.float32, tiling)
        return (y, stats, *kernels.backward(dy, x, w, stats, b.dtype, tiling))

    first = run()
    hits = [plan.cache_info().hits for plan in plans]
    second = run()
    assert [plan.cache_info().hits for plan in plans] == [h + 1 for h in hits]
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_backward_is_deterministic():
    x, w, b, dy = random_case((40, 96), (96,), torch.float32)
    first = torch.autograd.grad(layer_norm(x, (96,), w, b), (x, w, b), dy)
    second = torch.autograd.grad(layer_norm(x, (96,), w, b), (x, w, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_gradcheck():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, (2, 5), w, b), (x, w, b))


def test_eager_path_and_custom_ops_agree_exactly():
    """Eager mode runs the custom ops' functions through an autograd Function: same bits either way."""
    x, w, b, dy = random_case((6, 70), (70,), torch.bfloat16, param_dtype=torch.float32)
    y = layer_norm(x, (70,), w, b, out_dtype=torch.float32)
    y_op = torch.ops.slipstream.layer_norm_fwd(x, w, b, 1, 1e-5, torch.float32)[0]
    assert torch.equal(y, y_op)
    grads = torch.autograd.grad(y, (x, w, b), dy.float())
    grads_op = torch.autograd.grad(y_op, (x, w, b), dy.float())
    assert all(torch.equal(g, g_op) for g, g_op in zip(grads, grads_op))


def test_torch_compile_has_no_graph_breaks_and_same_numerics():
    x, w, b, _ = random_case((4, 6, 24), (24,), torch.float32)

    def block(x, w, b):
        return torch.tanh(layer_norm(x, (24,), w, b)) * 2

    explanation = torch._dynamo.explain(block)(x, w, b)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True)
    out, ref = compiled(x, w, b), block(x, w, b)
    assert torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (x, w, b))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w, b))
    assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-5) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(x=[1.0]), TypeError),
        (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError),
        (dict(normalized_shape=(5,)), ValueError),
        (dict(normalized_shape=()), ValueError),
        (dict(normalized_shape=(0,)), ValueError),
        (dict(weight=torch.ones(5)), ValueError),
        (dict(bias="zeros"), TypeError),
        (dict(eps=-1.0), ValueError),
        (dict(eps="1e-5"), TypeError),
        (dict(out_dtype=torch.int8), TypeError),
    ],
)
def test_bad_arguments_are_named(kwargs, error):
    args = dict(x=torch.randn(3, 4), normalized_shape=(4,), weight=None, bias=None, eps=1e-5)
    args.update(kwargs)
    out_dtype = args.pop("out_dtype", None)
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        layer_norm(args.pop("x"), args.pop("normalized_shape"), **args, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: the kernel under the interpreter
def test_second_order_gradients_match_pytorch(dtype):
    """create_graph=True (gradient penalties): gradients of gradients as PyTorch's own layer norm gives them."""
    x, w, b = torch.randn(5, 3, 12, dtype=dtype), torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)

    def penalty(norm, tensors):
        x, w, b = (t.detach().clone().requires_grad_() for t in tensors)
        gx, gw = torch.autograd.grad(norm(x * 1.5, w, b).pow(3).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.sum(), (x, w, b))

    ours = penalty(lambda t, w, b: layer_norm(t, 12, w, b), (x, w, b))
    expected = penalty(lambda t, w, b: F.layer_norm(t, (12,), w, b), [t.double() for t in (x, w, b)])
    for got, ref in zip(ours, expected):
        assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-12)
    x64 = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w64, b64 = (torch.randn(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(lambda t, w, b: layer_norm(t, (2, 6), w, b), (x64, w64, b64))
