"""slipstream.ops.group_norm: kernels (Triton's interpreter on CPU, the GPU where present) and the
PyTorch fallback against float64 references, layouts, dtypes, SiLU, gradients, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from slipstream.ops._backend import use_triton
from slipstream.ops.group_norm import group_norm, group_norm_backward_reference, group_norm_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Relative error allowed against float64, by the dtype the result is written in.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
PARAM_TOL = 2e-4  # dW, dB: fp32 sums whatever the activations' dtype


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def make_input(shape, dtype, channels_last, device, scale=2.0, shift=0.5):
    x = (torch.randn(shape) * scale + shift).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def make_params(c, device, affine=True, bias=True):
    if not affine:
        return None, None
    return torch.randn(c, device=device) + 1, (torch.randn(c, device=device) if bias else None)


def float64_reference(x, num_groups, weight, bias, eps, silu, dy):
    """F.group_norm (+ F.silu) in float64 on the CPU, with autograd gradients for x, weight, bias."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = F.group_norm(leaves[0], num_groups, leaves[1], leaves[2], eps)
    y = F.silu(y) if silu else y
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.double().cpu())
    grads = iter(grads)
    return y.detach(), [next(grads) if t is not None else None for t in leaves]


def check_against_float64(x, num_groups, weight, bias, silu, run):
    """``run(x, weight, bias, dy) -> (y, dx, dw, db)``; compares all four with float64 autograd."""
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    y, dx, dw, db = run(x, weight, bias, dy)
    ref_y, (ref_dx, ref_dw, ref_db) = float64_reference(x, num_groups, weight, bias, 1e-5, silu, dy)
    tol = TOL[x.dtype]
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.stride() == x.stride() and dx.stride() == x.stride(), "outputs keep the input's layout"
    assert rel_err(y.cpu(), ref_y) < tol
    assert rel_err(dx.cpu(), ref_dx) < tol
    for got, ref in ((dw, ref_dw), (db, ref_db)):
        assert (got is None) == (ref is None)
        if ref is not None:
            assert rel_err(got.cpu(), ref) < PARAM_TOL


def run_public(num_groups, silu):
    def run(x, weight, bias, dy):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        y = group_norm(leaves[0], num_groups, leaves[1], leaves[2], activation="silu" if silu else None)
        y.backward(dy)
        return y.detach(), leaves[0].grad, *(t.grad if t is not None else None for t in leaves[1:])

    return run


# (shape, groups): C not a power of two, odd spatial sizes, one sample, H*W = 1, G = 1, G = C, 3D and 5D.
SHAPES = [
    ((3, 6, 5, 7), 3),
    ((1, 10, 4, 3), 5),
    ((4, 12, 1, 1), 3),
    ((2, 8, 3, 5), 1),
    ((2, 6, 3, 3), 6),
    ((2, 4, 9), 2),
    ((2, 6, 3, 2, 3), 2),
]
CASES = [
    (shape, groups, channels_last, dtype)
    for shape, groups in SHAPES
    for channels_last in ([False, True] if len(shape) == 4 else [False])
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_float64_reference(device, index):
    shape, groups, channels_last, dtype = CASES[index]
    affine, silu = index % 2 == 0, index // 2 % 2 == 0  # every case mix appears across the list
    x = make_input(shape, dtype, channels_last, device)
    weight, bias = make_params(shape[1], device, affine)
    check_against_float64(x, groups, weight, bias, silu, run_public(groups, silu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("silu", [False, True])
def test_weight_without_bias(device, silu):
    x = make_input((2, 6, 4, 5), torch.float32, False, device)
    weight, bias = make_params(6, device, bias=False)
    check_against_float64(x, 3, weight, bias, silu, run_public(3, silu))


def check_kernels_at_tile(x, groups, tile):
    """The kernels' forward and backward (SiLU fused) with at most ``tile`` elements a program, against float64."""
    from slipstream.ops.kernels import group_norm as kernels

    def run(x, weight, bias, dy):
        y, mean, rstd = kernels.forward(x, weight, bias, groups, 1e-5, True, x.dtype, tile=tile)
        return (y, *kernels.backward(dy, x, weight, bias, mean, rstd, groups, True, tile=tile))

    weight, bias = make_params(x.shape[1], x.device)
    check_against_float64(x, groups, weight, bias, True, run)


# Tiles far smaller than a group: sets of many programs, cut along channels and positions, with
# ragged last chunks; several groups per tile where groups are small; channels_last with several
# group blocks, channel chunks and position chunks at once; channels_last rows of whole groups of a
# width that is not a power of two, the last group block only partly filled; a ragged channel chunk;
# rows of several whole groups without a channel mask; 188 partials a set, more than one combine block
# (COMBINE_BLOCK) holds, so blocks merge by Chan's formula.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,groups,channels_last,tile",
    [((2, 6, 3, 5), 2, False, 4), ((2, 6, 3, 5), 2, True, 4), ((2, 12, 3, 3), 6, True, 8), ((1, 10, 3, 5), 2, False, 8),
     ((2, 128, 1, 5), 2, True, 16), ((2, 35, 4, 3), 7, True, 64), ((2, 20, 3, 5), 1, True, 8),
     ((2, 32, 4, 4), 8, True, 32), ((1, 2, 50, 60), 2, False, 16)],
)
def test_sets_of_many_programs(device, shape, groups, channels_last, tile):
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    check_kernels_at_tile(make_input(shape, torch.float32, channels_last, device), groups, tile)


# channels_last tiles that read whole rows (every group of a sample side by side, as the GPU's
# MIN_RUN_BYTES sweep may choose): widths that are not a power of two, ragged position chunks.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups,tile", [((2, 20, 3, 5), 4, 64), ((1, 48, 5, 3), 6, 128), ((2, 24, 1, 7), 3, 32)])
def test_channels_last_whole_rows(monkeypatch, device, shape, groups, tile):
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    from slipstream.ops.kernels import group_norm as kernels

    monkeypatch.setattr(kernels, "MIN_RUN_BYTES", 1 << 20)
    x = make_input(shape, torch.float32, True, device)
    plan = kernels._plan(x, kernels._ncs_strides(x), groups, tile, 0)
    assert plan.n_gblocks == 1 and plan.shape.channels >= shape[1] // groups  # a tile spans whole rows
    assert plan.per_set > 1
    check_kernels_at_tile(x, groups, tile)


def _force_strategy(monkeypatch, device, strategy):
    """The kernel module with its settings made to choose ``strategy`` for small multi-program sets."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    from slipstream.ops._backend import interpreting
    from slipstream.ops.kernels import group_norm as kernels

    if strategy == "fused" and interpreting():
        pytest.skip("the interpreter runs programs one at a time: no barrier")
    monkeypatch.setattr(kernels, "TWO_PASS_MAX_BYTES", 0 if strategy == "fused" else 1 << 62)
    monkeypatch.setattr(kernels, "TWO_PASS_MAX_SET", 1 if strategy == "three_pass" else 256)
    return kernels


# The same small sets through each multi-program strategy: two passes (each apply program combines
# its set's partials) and three passes (a combine launch between them). The GPU's fused barrier runs
# where sets fit the SMs, so "fused" is only checked there.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["fused", "two_pass", "three_pass"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_each_multi_program_strategy(monkeypatch, device, strategy, channels_last):
    kernels = _force_strategy(monkeypatch, device, strategy)
    shape, groups, tile = (2, 12, 5, 7), 3, 16
    x = make_input(shape, torch.bfloat16, channels_last, device)
    plan = kernels._plan(x, kernels._ncs_strides(x), groups, tile, x.numel() * x.element_size())
    assert plan.strategy == strategy and plan.per_set > 1
    check_kernels_at_tile(x, groups, tile)


# Launches reuse one scratch buffer and one set of barrier words per stream. A call after a larger
# one (which grew them), a larger one after it (which grows them again) and a repeat must each give
# what a first call gives, and each fused launch must zero the words the next one will count in.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["fused", "two_pass", "three_pass"])
def test_calls_reusing_scratch_and_barrier_words(monkeypatch, device, strategy):
    from slipstream.ops.kernels.scratch import barrier_words

    _force_strategy(monkeypatch, device, strategy)
    inputs = [make_input(shape, torch.float32, True, device) for shape in ((2, 12, 4, 5), (1, 6, 3, 5), (3, 12, 4, 5))]
    for x in inputs + inputs[:1]:
        check_kernels_at_tile(x, 3, 16)
    if device == "cuda":
        torch.cuda.synchronize()
    # Take the next launch's turn: its words must be zero, and it must clear the half after it.
    next_launch_words, words_after = barrier_words(inputs[0].device, 1)
    assert not next_launch_words.any()
    words_after.zero_()


@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_small_spread(device):
    """Statistics combine centred partials: E[x^2] - E[x]^2 in fp32 would be off by about 50% here."""
    x = make_input((2, 8, 6, 6), torch.float32, False, device, scale=0.1, shift=300.0)
    dy = torch.randn_like(x)
    y = group_norm(x, 2)
    ref_y, _ = float64_reference(x, 2, None, None, 1e-5, False, dy)
    assert rel_err(y.cpu(), ref_y) < 2e-3  # the fp32 mean itself is rounded by ~300 * 2**-24 / 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups,tile", [((2, 8, 6, 6), 2, 16), ((1, 2, 50, 60), 2, 16)])
def test_large_mean_small_spread_across_many_partials(device, shape, groups, tile):
    """The same through sets of many programs: tile partials, then blocks of them, merge centred (Chan)."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    from slipstream.ops.kernels import group_norm as kernels

    x = make_input(shape, torch.float32, False, device, scale=0.1, shift=300.0)
    y = kernels.forward(x, None, None, groups, 1e-5, False, x.dtype, tile=tile)[0]
    ref_y, _ = float64_reference(x, groups, None, None, 1e-5, False, torch.randn_like(x))
    assert rel_err(y.cpu(), ref_y) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, 16])  # one program a group; sets of programs whose statistics combine
def test_eps_where_groups_barely_vary(device, tile):
    """Groups of variance ~0.001 with eps = 0.1: eps dominates the denominator, forward and backward."""
    if tile is not None and not use_triton(torch.empty(0, device=device)):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1")
    from slipstream.ops.kernels import group_norm as kernels

    x = make_input((2, 8, 6, 6), torch.float32, False, device, scale=0.03)
    dy = torch.randn_like(x)
    if tile is None:
        leaf = x.detach().requires_grad_()
        y = group_norm(leaf, 2, eps=0.1)
        (dx,) = torch.autograd.grad(y, leaf, dy)
    else:
        y, mean, rstd = kernels.forward(x, None, None, 2, 0.1, False, x.dtype, tile=tile)
        dx = kernels.backward(dy, x, None, None, mean, rstd, 2, False, tile=tile)[0]
    ref_y, (ref_dx, _, _) = float64_reference(x, 2, None, None, 0.1, False, dy)
    assert rel_err(y.detach().cpu(), ref_y) < 1e-5 and rel_err(dx.cpu(), ref_dx) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_out_dtype_and_gradient_dtypes(device):
    x = make_input((2, 6, 4, 4), torch.float32, True, device).requires_grad_()
    weight, bias = (t.requires_grad_() for t in make_params(6, device))
    y = group_norm(x, 3, weight, bias, activation="silu", out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    ref = F.silu(F.group_norm(x.detach().double(), 3, weight.detach().double(), bias.detach().double()))
    assert rel_err(y.detach(), ref) < TOL[torch.bfloat16]
    y.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) * 3


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_that_does_not_flatten(device):
    base = make_input((2, 6, 5, 9), torch.float32, False, device)
    x = base[:, :, :, ::2]  # spatial strides (9, 2): not one stride
    weight, bias = make_params(6, device)
    check_against_float64(x.contiguous(), 3, weight, bias, False, lambda *a: _strided_run(x, *a[1:]))


def _strided_run(x, weight, bias, dy):
    x = x.detach().requires_grad_()
    leaves = [t.detach().requires_grad_() for t in (weight, bias)]
    y = group_norm(x, 3, *leaves)
    y.backward(dy)
    return y.detach().contiguous(), x.grad.contiguous(), leaves[0].grad, leaves[1].grad


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = make_input((2, 12, 7, 5), torch.bfloat16, True, device).requires_grad_()
    weight, bias = (t.requires_grad_() for t in make_params(12, device))
    dy = torch.randn_like(x)
    results = []
    for _ in range(2):
        y = group_norm(x, 4, weight, bias, activation="silu")
        results.append((y, *torch.autograd.grad(y, (x, weight, bias), dy)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_gradcheck_and_reference_formulas():
    """The PyTorch path's explicit backward (also the kernels' math) is the true derivative."""
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: group_norm(*t[:1], 3, *t[1:], activation="silu"), (x, weight, bias))
    y, mean, rstd = group_norm_reference(x.detach(), 3, weight.detach(), bias.detach(), silu=True)
    dy = torch.randn_like(y)
    dx, dw, db = group_norm_backward_reference(dy, x.detach(), weight.detach(), bias.detach(), mean, rstd, 3, True)
    ref = F.silu(F.group_norm(x, 3, weight, bias))
    expected = torch.autograd.grad(ref, (x, weight, bias), dy)
    assert torch.allclose(y, ref) and all(torch.allclose(a, b) for a, b in zip((dx, dw, db), expected))


@pytest.mark.parametrize("group_norm_path", ["inductor", "kernel"])
def test_compiles_without_graph_breaks(monkeypatch, group_norm_path):
    monkeypatch.setattr("slipstream.config.compiled_group_norm", group_norm_path)
    torch._dynamo.reset()

    def block(x, weight, bias):
        return group_norm(x * 2, 3, weight, bias, activation="silu").sum()

    x = torch.randn(2, 6, 4, 4, requires_grad=True).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    assert torch._dynamo.explain(block)(x, weight, bias).graph_break_count == 0
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, weight, bias), (x, weight, bias))
    expected = torch.autograd.grad(block(x, weight, bias), (x, weight, bias))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))


def test_compiled_bf16_output_keeps_dtype_and_layout():
    """The Inductor path writes ``out_dtype`` in the input's layout, as the kernels do."""
    torch._dynamo.reset()
    x = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    compiled = torch.compile(lambda t: group_norm(t, 3, out_dtype=torch.bfloat16), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.float(), F.group_norm(x, 3), atol=1e-2)


def test_compiled_inductor_path_is_aten_group_norm():
    """Compiled code holds F.group_norm, which Inductor lowers (forward and backward) as it does without us,
    not the fallback's tensor ops (with those, resnet50_gn's compiled step ran 0.64x of compile alone)."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: group_norm(t, 3, activation="silu", out_dtype=torch.bfloat16),
                             backend=capture, fullgraph=True)
    compiled(torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last))
    called = {getattr(node.target, "__name__", str(node.target)) for node in graphs[0].graph.nodes
              if node.op in ("call_function", "call_method")}
    assert "group_norm" in called and "var_mean" not in called and "copy_" not in called


def test_unknown_compiled_group_norm_path_is_an_error(monkeypatch):
    monkeypatch.setattr("slipstream.config.compiled_group_norm", "fast")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: group_norm(t, 2), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="compiled_group_norm must be 'inductor' or 'kernel', got 'fast'"):
        compiled(torch.randn(2, 4, 3))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(num_groups=4), ValueError),  # does not divide 6
        (dict(num_groups=0), ValueError),
        (dict(activation="gelu"), ValueError),
        (dict(eps=0.0), ValueError),
        (dict(eps=float("inf")), ValueError),
        (dict(eps="1e-5"), TypeError),
        (dict(weight=torch.ones(5)), ValueError),
        (dict(weight=[1.0] * 6), TypeError),
        (dict(bias=torch.ones(6, device="meta")), ValueError),  # another device
        (dict(out_dtype=torch.int32), TypeError),
    ],
)
def test_rejects_bad_arguments(kwargs, error):
    args = dict(num_groups=3) | kwargs
    with pytest.raises(error, match=next(iter(kwargs))):
        group_norm(torch.randn(2, 6, 3), **args)
    with pytest.raises(TypeError, match="x"):
        group_norm(torch.ones(2, 6, 3, dtype=torch.int64), 3)


@pytest.mark.parametrize("shape", [(0, 6, 2, 2), (2, 6, 0)])
@pytest.mark.parametrize("silu", [False, True])
def test_empty_inputs_give_empty_outputs_and_zero_parameter_gradients(shape, silu):
    """As nn.GroupNorm does: an empty batch (say, the last one of a filtered loader) or no positions."""
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    y = group_norm(x, 3, w, b, activation="silu" if silu else None)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros(6)) and torch.equal(b.grad, torch.zeros(6))


def test_layout_strides_are_memoized_and_match_the_tensor():
    from slipstream.ops.kernels.group_norm import _ncs_strides, _ncs_strides_of

    x = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    hits = _ncs_strides_of.cache_info().hits
    assert _ncs_strides(x) == (x.stride(0), x.stride(1), x.stride(3)) == _ncs_strides(x)
    assert _ncs_strides_of.cache_info().hits > hits
    assert _ncs_strides(torch.randn(2, 6, 4, 4)[:, :, ::2, :]) is None  # spatial dims that do not flatten


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: the kernel under the interpreter
@pytest.mark.parametrize("activation", [None, "silu"])
def test_second_order_gradients_match_pytorch(dtype, activation):
    """create_graph=True (gradient penalties): gradients of gradients as PyTorch's own group norm gives them."""
    x, w, b = torch.randn(2, 6, 5, dtype=dtype), torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)

    def reference(t, w, b):
        y = F.group_norm(t, 3, w, b)
        return F.silu(y) if activation else y

    def penalty(norm, tensors):
        x, w, b = (t.detach().clone().requires_grad_() for t in tensors)
        gx, gw = torch.autograd.grad(norm(x * 1.5, w, b).pow(3).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.sum(), (x, w, b))

    ours = penalty(lambda t, w, b: group_norm(t, 3, w, b, activation=activation), (x, w, b))
    expected = penalty(reference, [t.double() for t in (x, w, b)])
    for got, ref in zip(ours, expected):
        assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-12)
    x64 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w64, b64 = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(lambda t, w, b: group_norm(t, 2, w, b, activation=activation), (x64, w64, b64))
