"""The compiled dropout path ``slipstream.config.compiled_dropout = "inductor"``: the hashed stream,
its statistics, compiled values and gradients, and that the compiler saves the seed, not the mask."""

import math
import shutil

import pytest
import torch
from torch import nn

from slipstream.nn import SeededDropout
from slipstream.nn.seed_stream import stream_seed
from slipstream.ops import seeded_dropout, seeded_dropout_rows
from slipstream.ops.dropout import keep_threshold
from slipstream.ops.hashed_dropout import hashed_dropout, hashed_keep_mask, hashed_numbers

M32 = 0xFFFFFFFF
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def python_mix32(x):
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def python_number(seed, col):
    """The documented stream in plain Python ints (seed as a two's-complement 64-bit word)."""
    seed &= (1 << 64) - 1
    lo, hi = seed & M32, seed >> 32
    key_a = python_mix32(lo ^ python_mix32(hi ^ 0x9E3779B9))
    key_b = python_mix32(key_a ^ hi ^ 0x85EBCA6B)
    return python_mix32(python_mix32((col & M32) ^ key_a) ^ (col >> 32) ^ key_b) >> 16


SEEDS = torch.Generator().manual_seed(2026)  # fixed: the statistical tests give the same answer every run


def random_seed():
    return int(torch.randint(-(2**63), 2**63 - 1, (), generator=SEEDS))


@pytest.fixture
def inductor_dropout(monkeypatch):
    monkeypatch.setattr("slipstream.config.compiled_dropout", "inductor")


# ----- the stream -----------------------------------------------------------------------------------


def test_numbers_follow_the_documented_stream_for_any_seed_and_wide_columns():
    seeds = [random_seed() for _ in range(3)] + [-1, 0, 2**63 - 1, -(2**63)]
    cols = [0, 1, 7, 2**31 - 1, 2**32, 2**32 + 5, 2**45 + 3]
    got = hashed_numbers(torch.tensor(seeds).reshape(-1, 1), torch.tensor(cols))
    assert got.tolist() == [[python_number(s, c) for c in cols] for s in seeds]


def test_mask_is_deterministic_per_seed_and_rows_with_equal_seeds_agree():
    seed, other = random_seed(), random_seed()
    mask = hashed_keep_mask(torch.tensor([seed, other, seed]), keep_threshold(0.5), 999)
    assert mask.shape == (3, 999) and mask.dtype == torch.bool
    assert torch.equal(mask[0], mask[2])
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(hashed_keep_mask(torch.tensor(seed), keep_threshold(0.5), 999)[0], mask[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_neighbour_independence(p):
    n = 200_000
    keep = hashed_keep_mask(torch.tensor(random_seed()), keep_threshold(p), n)[0].double()
    q = 1 - keep_threshold(p) / 2**16  # the exact keep probability
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(float(keep.mean()) - q) < 5 * sigma
    both = float((keep[0::2] * keep[1::2]).mean())  # disjoint neighbour pairs: independent decisions
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n // 2))


def test_masks_of_different_seeds_are_independent():
    n, p = 200_000, 0.5
    a, b = (hashed_keep_mask(torch.tensor(random_seed()), keep_threshold(p), n)[0] for _ in range(2))
    agree = float((a == b).double().mean())  # independent: 1/2
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)


def test_seeds_that_differ_in_a_few_low_bits_give_unrelated_masks():
    # Consecutive seeds (one per sample, or the step number) are what users pass. Were the seed XORed
    # into the column index, their masks would be one mask with permuted columns: equal keep counts.
    n_cols, p = 4096, 0.5
    keep = hashed_keep_mask(torch.arange(256), keep_threshold(p), n_cols)
    counts = keep.sum(dim=1).double()
    binomial_std = math.sqrt(n_cols * p * (1 - p))
    assert 0.7 * binomial_std < float(counts.std()) < 1.3 * binomial_std
    agree = (keep[0::2] == keep[1::2]).double().mean(dim=1)  # seeds 2k and 2k+1
    assert abs(float(agree.mean()) - 0.5) < 5 * math.sqrt(0.25 / (128 * n_cols))


def test_p_zero_keeps_everything_and_p_one_drops_everything():
    x = torch.randn(5, 9) + 3.0
    assert torch.equal(hashed_dropout(x, torch.tensor(random_seed()), keep_threshold(0.0), 1.0), x)
    assert not hashed_dropout(x, torch.tensor(random_seed()), keep_threshold(1.0), 0.0).any()


def test_a_cpu_seed_is_a_scalar_for_a_mask_on_another_device():
    # A 0-d seed enters as a scalar wherever it lives; "meta" stands in for a GPU.
    x = torch.empty(3, 5, device="meta")
    assert hashed_dropout(x, torch.tensor(random_seed()), keep_threshold(0.5), 2.0).device == x.device
    assert hashed_keep_mask(torch.tensor(7), 100, 9, device="meta").shape == (1, 9)


def test_mask_needs_an_int64_tensor():
    with pytest.raises(TypeError, match="seeds must be an int64 tensor, got a torch.float32 tensor"):
        hashed_keep_mask(torch.tensor([1.0]), 100, 4)


# ----- compiled ---------------------------------------------------------------------------------------


def compiled_values_and_grad(fn, x, backend):
    x = x.detach().requires_grad_()
    y = torch.compile(fn, backend=backend, fullgraph=True)(x)
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)  # drawn in fp32: never an exact zero
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dy, dx


# aot_eager only: Inductor's C++ build of this graph takes minutes on a 2-core CPU (the GPU tests
# below run Inductor, whose code is what users get).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_seeded_dropout_applies_the_hashed_mask(inductor_dropout, dtype):
    seed, p = random_seed(), 0.3
    # Drawn in fp32 and cast: torch 2.11's CPU bf16 randn gives exact zeros, which read as dropped.
    x = torch.randn(7, 3, 33).to(dtype)
    y, dy, dx = compiled_values_and_grad(lambda t: seeded_dropout(t, p, seed), x, "aot_eager")
    keep = hashed_keep_mask(torch.tensor(seed), keep_threshold(p), x.numel())[0].view(x.shape)
    scale = 1 / (1 - p)
    expected = torch.where(keep, x.double() * scale, 0.0)
    assert y.dtype == dtype and torch.equal(y == 0, ~keep)
    assert float((y.double() - expected).norm() / expected.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)
    expected_dx = torch.where(keep, dy.double() * scale, 0.0)
    assert torch.equal(dx == 0, ~keep)
    assert float((dx.double() - expected_dx).norm() / expected_dx.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_compiled_rows_key_each_row_on_any_strides(inductor_dropout):
    seeds = torch.tensor([random_seed(), random_seed(), 0])
    seeds[2] = seeds[0]
    x = torch.randn(40, 3).t()  # a transposed view: rows strided
    y, _, _ = compiled_values_and_grad(lambda t: seeded_dropout_rows(t, 0.5, seeds), x, "aot_eager")
    keep = hashed_keep_mask(seeds, keep_threshold(0.5), 40)
    assert torch.equal(y, torch.where(keep, x * 2.0, 0.0))
    assert torch.equal(y[0] == 0, y[2] == 0)


def test_compiled_path_saves_the_seed_not_a_mask(inductor_dropout):
    """What AOT autograd's partitioner keeps for backward: no bool mask, only a few integers. Two
    dropouts of one size: the compiler shares their column indices, which must not be saved."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved = []

    def keep_forward_outputs(graph, inputs):
        (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
        saved.extend(node.meta["val"] for node in outputs if node is not None)
        return graph

    def backend(graph, inputs):
        return aot_module_simplified(graph, inputs, fw_compiler=keep_forward_outputs,
                                     bw_compiler=lambda g, i: g, partition_fn=min_cut_rematerialization_partition)

    lin = nn.Linear(64, 64)
    drop, drop_again = SeededDropout(0.2, seed=5), SeededDropout(0.1, seed=6)
    model = torch.compile(lambda t: lin(drop_again(lin(drop(torch.relu(lin(t)))))).sum(), backend=backend,
                          fullgraph=True)
    x = torch.randn(32, 64, requires_grad=True)
    model(x).backward()
    assert not [t for t in saved if t.dtype == torch.bool]
    # Integers saved: the seed, or the stream state it is computed from (2 numbers), nothing larger.
    integers = [t for t in saved if t.dtype == torch.int64]
    assert integers and all(t.numel() <= 2 for t in integers)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=needs_cxx)])
def test_seeded_dropout_module_compiles_once_and_draws_new_masks(inductor_dropout, backend):
    torch._dynamo.reset()  # SeededDropout.forward may be cached for another backend
    drop = SeededDropout(0.5, seed=11)
    compiled = torch.compile(drop, backend=backend, fullgraph=True)
    x = torch.randn(8, 64) + 2.0
    with torch._dynamo.config.patch(error_on_recompile=True):
        masks = [compiled(x) == 0 for _ in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert drop.run_state()["calls"] == 3


def test_unknown_compiled_dropout_path_is_an_error(monkeypatch):
    monkeypatch.setattr("slipstream.config.compiled_dropout", "fast")
    compiled = torch.compile(lambda t: seeded_dropout(t, 0.5, 3), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="compiled_dropout must be 'kernel' or 'inductor', got 'fast'"):
        compiled(torch.randn(4, 4))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_on_the_gpu_fuses_the_same_stream(inductor_dropout, dtype):
    """Inductor's generated Triton code computes the stream the eager PyTorch ops compute, for a
    SeedStream seed (a 0-d CPU buffer computed in the graph)."""
    torch._dynamo.reset()
    drop = SeededDropout(0.25, seed=random_seed()).cuda()
    calls = drop.run_state()
    x = torch.randn(4, 129, 65, device="cuda").to(dtype)
    y, dy, dx = compiled_values_and_grad(drop, x, "inductor")
    seed = stream_seed(calls["key"], calls["calls"])
    keep = hashed_keep_mask(torch.tensor(seed, device="cuda"), keep_threshold(0.25), x.numel())[0].view(x.shape)
    assert torch.equal(y == 0, ~keep) and torch.equal(dx == 0, ~keep)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(y.float(), torch.where(keep, x.float() / 0.75, 0.0), rtol=rtol)


@needs_cuda
@pytest.mark.parametrize("seed", [3, -(2**62) - 5])
def test_inductor_on_the_gpu_with_a_constant_seed_and_with_row_seeds(inductor_dropout, seed):
    torch._dynamo.reset()
    x = torch.randn(33, 300, device="cuda")
    y, _, dx = compiled_values_and_grad(lambda t: seeded_dropout(t, 0.5, seed), x, "inductor")
    keep = hashed_keep_mask(torch.tensor(seed), keep_threshold(0.5), x.numel())[0].view(x.shape).cuda()
    assert torch.equal(y == 0, ~keep) and torch.equal(dx == 0, ~keep)
    seeds = torch.arange(33, device="cuda") + seed
    y, _, _ = compiled_values_and_grad(lambda t: seeded_dropout_rows(t, 0.5, seeds), x, "inductor")
    assert torch.equal(y == 0, ~hashed_keep_mask(seeds, keep_threshold(0.5), 300))


def test_compiled_activation_checkpointing_recomputes_the_same_hashed_masks(inductor_dropout):
    """A checkpointed region around SeededDropout, compiled as one graph, gives the gradients of the
    same model compiled without checkpointing: the recomputed forward draws the same masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), SeededDropout(0.4, seed=21), nn.Linear(12, 12))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 12)

    def gradients(run):
        model.load_state_dict(weights)
        model[2].load_run_state({"key": 21, "calls": 0})
        model.zero_grad()
        run(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    plain = gradients(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    region = lambda t: torch.utils.checkpoint.checkpoint(model, t, use_reentrant=False)  # noqa: E731
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        checkpointed = gradients(torch.compile(region, backend="aot_eager", fullgraph=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    model.eval()  # without dropout the gradients differ: the masks mattered
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, gradients(model)))
