"""Seeded sparse JL op: kernel equals the PyTorch reference, JL statistics, seeds, gradients, bad input."""

import math
import os

import pytest
import torch

from slipstream.ops import sparse_jl, sparse_jl_matrix, sparse_jl_reference, sparse_jl_transpose

requires_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 to run Triton on CPU"
)

#: Relative error of the kernel against float64 (the interpreter multiplies in fp32; bf16/fp16 round the output).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BIG_SEED = 2**40 + 5  # exercises the high Philox key word


def rel_err(out, ref):
    return float((out.detach().double() - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------------
# The kernel computes the reference's S (Triton interpreter on CPU)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [2, 8])
def test_kernel_matches_reference(dtype, sparsity):
    from slipstream.ops.kernels.sparse_jl import launch_projection

    m, d, k = 7, 150, 100  # odd sizes: masked rows, columns and reduction tail
    x = torch.randn(m, d).to(dtype)
    dy = torch.randn(m, k).to(dtype)
    scale = math.sqrt(sparsity / k)
    y = launch_projection(x, k, BIG_SEED, sparsity, scale, transposed=False)
    dx = launch_projection(dy, d, BIG_SEED, sparsity, scale, transposed=True)
    s = sparse_jl_matrix(d, k, BIG_SEED, sparsity, dtype=torch.float64)
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, x.double() @ s) < TOLERANCE[dtype]
    assert rel_err(dx, dy.double() @ s.T) < TOLERANCE[dtype]


@requires_interpreter
@pytest.mark.parametrize("sparsity", [2, 8])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_wide_blocks_and_split_reduction(sparsity, transposed):
    """256-column blocks (both Philox word pairs of a call) and a reduction split over programs."""
    from slipstream.ops.kernels.sparse_jl import TileConfig, launch_projection

    d, k = 300, 520
    x = torch.randn(5, k if transposed else d)
    config = TileConfig(16, 64, 256, 2, 1, split=3) if transposed else TileConfig(16, 256, 64, 2, 1, split=3)
    out = launch_projection(x, d if transposed else k, 11, sparsity, math.sqrt(sparsity / k), transposed, config)
    s = sparse_jl_matrix(d, k, 11, sparsity, dtype=torch.float64)
    assert rel_err(out, x.double() @ (s.T if transposed else s)) < 1e-5


@requires_interpreter
def test_split_reduction_rounds_the_sum_once():
    """The splits' fp32 partials are summed in fp32, then rounded: never rounded to fp16 one by one."""
    from slipstream.ops.kernels.sparse_jl import TileConfig, launch_projection

    d, k = 256, 64
    s = sparse_jl_matrix(d, k, 1, 2, dtype=torch.float64)
    first = torch.randn(4, d // 2, dtype=torch.float64) * 60
    # The second half cancels the first's projection down to about 0.3: partials in the hundreds.
    target = 0.3 - first @ s[: d // 2]
    second = torch.linalg.lstsq(s[d // 2:].T, target.T).solution.T
    x = torch.cat([first, second], 1).half()
    exact = x.double() @ s
    assert (x[:, : d // 2].double() @ s[: d // 2]).abs().max() > 100
    y = launch_projection(x, k, 1, 2, math.sqrt(2 / k), False, TileConfig(16, 128, 64, 2, 1, split=2))
    assert (y.double() - exact).abs().max() <= 2 * exact.abs().max() * 2**-11


@requires_interpreter
def test_kernel_reads_a_column_major_view_whose_offsets_pass_int32():
    """(d - 1) * stride > 2**31 elements: a transposed view of a large tensor, read without a copy."""
    m, d, stride = 16, 130, 2**24
    try:  # virtual memory only: the pages the view touches are a few hundred KiB
        storage = torch.empty((d - 1) * stride + m, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4.3 GB of virtual memory here")
    x = storage.as_strided((m, d), (1, stride))
    x.copy_(torch.randn(m, d))
    assert rel_err(sparse_jl(x, 32, 3), x.double() @ sparse_jl_matrix(d, 32, 3, dtype=torch.float64)) < 2e-3


@requires_interpreter
def test_op_runs_kernel_with_strides_and_gradient(launched_kernels):
    x = torch.randn(6, 2 * 130)[:, ::2].requires_grad_()  # non-contiguous rows
    y = sparse_jl(x, 90, seed=3)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y) * torch.linspace(-1, 2, 90))
    assert launched_kernels == ["_projection_kernel"] * 2  # forward and backward, not the fallback
    s = sparse_jl_matrix(130, 90, 3, dtype=torch.float64)
    assert rel_err(y, x.detach().double() @ s) < 1e-5
    assert rel_err(dx, (torch.ones(6, 90) * torch.linspace(-1, 2, 90)).double() @ s.T) < 1e-5


# ----------------------------------------------------------------------------------------------
# The matrix S


@pytest.mark.parametrize("sparsity", [2, 8])
def test_matrix_entries_and_density(sparsity):
    d, k = 640, 384
    s = sparse_jl_matrix(d, k, 5, sparsity, dtype=torch.float64)
    scale = math.sqrt(sparsity / k)
    nonzero = s != 0
    assert torch.all(s[nonzero].abs().sub(scale).abs() < 1e-12)
    n = d * k
    density = float(nonzero.double().mean())
    p = 1 / sparsity
    assert abs(density - p) < 6 * math.sqrt(p * (1 - p) / n)  # binomial bound
    positive = float((s > 0).double().sum() / nonzero.sum())
    assert abs(positive - 0.5) < 6 * math.sqrt(0.25 / float(nonzero.sum()))
    # rows and columns carry no structure: every row and column has about its share of nonzeros
    for counts, length in ((nonzero.sum(1), k), (nonzero.sum(0), d)):
        assert counts.double().sub(length * p).abs().max() < 6 * math.sqrt(length * p * (1 - p))


def test_matrix_is_a_pure_function_of_the_seed():
    a = sparse_jl_matrix(200, 300, 9)
    assert torch.equal(a, sparse_jl_matrix(200, 300, 9))
    assert torch.equal(a[:70, :130].sign(), sparse_jl_matrix(70, 130, 9).sign())  # a sub-block: same entries
    assert not torch.equal(a, sparse_jl_matrix(200, 300, 10))
    assert not torch.equal(a != 0, sparse_jl_matrix(200, 300, 9, sparsity=8) != 0)


def test_different_seeds_are_nearly_uncorrelated():
    a, b = (sparse_jl_matrix(256, 256, seed).flatten().double() for seed in (1, 2))
    corr = float(a @ b / (a.norm() * b.norm()))
    assert abs(corr) < 6 / 256  # about 1 / sqrt(numel) for independent entries


# ----------------------------------------------------------------------------------------------
# Johnson-Lindenstrauss statistics (PyTorch path)


@pytest.mark.parametrize("sparsity", [2, 8])
def test_expected_squared_norm_is_preserved(sparsity):
    """E ||x S||^2 = ||x||^2 over seeds; the mean of 400 projections lands within 5 standard errors."""
    d, k, trials = 96, 32, 400
    x = torch.randn(3, d, dtype=torch.float64)
    x[0] = 0
    x[0, 5] = 1.0  # a spiky vector: variance (2 + (s - 3) ||x||_4^4 / ||x||^4) / k is largest here
    ratios = torch.stack([
        sparse_jl(x, k, seed, sparsity).pow(2).sum(1) / x.pow(2).sum(1) for seed in range(trials)
    ])
    std = math.sqrt((2 + max(sparsity - 3, 0)) / k)
    assert torch.all((ratios.mean(0) - 1).abs() < 5 * std / math.sqrt(trials))


@pytest.mark.parametrize("sparsity", [2, 8])
@pytest.mark.parametrize("seed", [0, 12345, BIG_SEED])
def test_pairwise_distances_within_epsilon(sparsity, seed):
    """n random points, k = 8 ln(n) / eps^2: every pairwise distance kept within 1 +- eps."""
    n, d, eps = 40, 2000, 0.3
    k = math.ceil(8 * math.log(n) / eps**2)
    points = torch.randn(n, d, dtype=torch.float64)
    projected = sparse_jl(points, k, seed, sparsity)
    i, j = torch.triu_indices(n, n, offset=1)
    ratio = (projected[i] - projected[j]).norm(dim=1) / (points[i] - points[j]).norm(dim=1)
    assert float(ratio.min()) > 1 - eps and float(ratio.max()) < 1 + eps


# ----------------------------------------------------------------------------------------------
# The op: shapes, dtypes, autograd, compile


def test_leading_dimensions_and_empty_batch():
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    y = sparse_jl(x, 20, 4)
    assert y.shape == (2, 3, 20)
    assert torch.allclose(y.reshape(6, 20), sparse_jl(x.reshape(6, 50), 20, 4))
    empty = torch.randn(0, 50, requires_grad=True)
    y = sparse_jl(empty, 20, 4)
    assert y.shape == (0, 20) and y.requires_grad
    y.sum().backward()  # an empty batch still backpropagates, as through nn.Linear
    assert empty.grad.shape == (0, 50)


def test_reference_and_fallback_agree_in_float32():
    x = torch.randn(4, 70)
    assert torch.allclose(sparse_jl(x, 30, 8), sparse_jl_reference(x.double(), 30, 8).float(), atol=1e-5)


def test_transpose_is_the_adjoint():
    x, dy = torch.randn(3, 77, dtype=torch.float64), torch.randn(3, 41, dtype=torch.float64)
    lhs = (sparse_jl(x, 41, 6) * dy).sum()
    rhs = (x * sparse_jl_transpose(dy, 77, 6)).sum()
    assert torch.allclose(lhs, rhs)


def test_gradcheck_both_ways():
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sparse_jl(t, 19, 2, 8), (x,))
    dy = torch.randn(3, 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: sparse_jl_transpose(t, 37, 2), (dy,))


def test_custom_ops_autograd_matches_eager():
    """Eager calls go through an autograd Function; the custom ops (used when compiling) agree with it."""
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.slipstream.sparse_jl(t, 19, 2, 8), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.slipstream.sparse_jl_transpose(t, 23, 2, 2),
                                        (torch.randn(3, 19, dtype=torch.float64, requires_grad=True),))

    def loss(t):
        return sparse_jl(t, 19, 2, 8).pow(2).sum()

    (eager,) = torch.autograd.grad(loss(x), x)
    (compiled,) = torch.autograd.grad(torch.compile(loss)(x), x)
    assert torch.allclose(compiled, eager)


def test_custom_ops_pass_opcheck():
    x = torch.randn(5, 64)
    torch.library.opcheck(torch.ops.slipstream.sparse_jl.default, (x, 32, 7, 2))
    torch.library.opcheck(torch.ops.slipstream.sparse_jl_transpose.default, (torch.randn(5, 32), 64, 7, 2))


def test_compiles_without_graph_breaks():
    def f(x):
        return sparse_jl(torch.tanh(x), 16, 99).sum(-1)

    explanation = torch._dynamo.explain(f)(torch.randn(4, 48))
    assert explanation.graph_break_count == 0
    x = torch.randn(4, 48)
    assert torch.allclose(torch.compile(f)(x), f(x))


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: sparse_jl([1.0, 2.0], 4, 0), TypeError, "x must be a floating-point tensor"),
        (lambda: sparse_jl(torch.ones(3, 4, dtype=torch.int64), 4, 0), TypeError, "x must be a floating-point"),
        (lambda: sparse_jl(torch.tensor(1.0), 4, 0), ValueError, "at least one dimension"),
        (lambda: sparse_jl(torch.ones(3, 0), 4, 0), ValueError, r"x.shape\[-1\] must be >= 1"),
        (lambda: sparse_jl(torch.ones(3, 4), 0, 0), ValueError, "out_features must be >= 1"),
        (lambda: sparse_jl(torch.ones(3, 4), 2.0, 0), TypeError, "out_features must be an int"),
        (lambda: sparse_jl(torch.ones(3, 4), True, 0), TypeError, "out_features must be an int"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, -1), ValueError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, 2**63), ValueError, "seed must be in"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, 1.5), TypeError, "seed must be an int"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, True), TypeError, "seed must be an int"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, 0, sparsity=3), ValueError, r"sparsity must be one of \(2, 8\)"),
        (lambda: sparse_jl(torch.ones(3, 4), 4, 0, sparsity=True), ValueError, "sparsity must be one of"),
        (lambda: sparse_jl_transpose(torch.ones(3, 4), 0, 0), ValueError, "in_features must be >= 1"),
        (lambda: sparse_jl_matrix(4, 4, 0, dtype=torch.int32), ValueError, "dtype must be a floating-point"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
