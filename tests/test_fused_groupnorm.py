"""FusedGroupNorm, SiLU folding, apply_fused_groupnorm, the FusedGroupNorm algorithm, LPGroupNorm on CUDA."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slipstream.functional as sf
from slipstream.algorithms import Event, FusedGroupNorm as FusedGroupNormAlgorithm, State
from slipstream.nn import FusedGroupNorm, LPGroupNorm, fuse_silu_into_group_norms
from slipstream.surgery import NoEffectWarning, SurgeryWarning

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(out, ref):
    return float((out.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def randomize(module):
    for p in module.parameters():
        nn.init.normal_(p)
    return module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_group_norm_forward_and_backward(device, activation):
    gn = randomize(nn.GroupNorm(3, 9)).to(device)
    fused = FusedGroupNorm.from_module(gn, activation=activation)
    fused.load_state_dict(gn.state_dict())
    x = (torch.randn(2, 9, 5, 3, device=device) * 3 + 1).to(memory_format=torch.channels_last).requires_grad_()
    ref = gn(x) if activation is None else F.silu(gn(x))
    out = fused(x)
    assert rel_err(out, ref) < 1e-5 and out.stride() == x.stride()
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, fused.weight, fused.bias), dy)
    expected = torch.autograd.grad(ref, (x, gn.weight, gn.bias), dy)
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(got, expected))


def test_state_dict_and_config_round_trip():
    gn = randomize(nn.GroupNorm(2, 6, eps=1e-3))
    fused = FusedGroupNorm.from_module(gn)
    assert set(fused.state_dict()) == set(gn.state_dict())
    fused.load_state_dict(gn.state_dict())
    gn.load_state_dict(fused.state_dict())
    assert (fused.num_groups, fused.num_channels, fused.eps, fused.affine) == (2, 6, 1e-3, True)
    plain = FusedGroupNorm.from_module(nn.GroupNorm(2, 6, affine=False))
    assert plain.weight is None and plain.bias is None and not plain.state_dict()
    with pytest.raises(ValueError, match="activation"):
        FusedGroupNorm(2, 6, activation="relu")


def test_writes_autocast_dtype_under_autocast():
    fused = randomize(FusedGroupNorm(2, 6, activation="silu"))
    x = torch.randn(3, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    ref = F.silu(F.group_norm(x.double(), 2, fused.weight.double(), fused.bias.double(), fused.eps))
    assert rel_err(y, ref) < 2e-2


def test_apply_keeps_parameters_and_folds_silu():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.SiLU(), nn.Conv2d(6, 6, 1), nn.GroupNorm(3, 6))
    randomize(model)
    before = {name: p for name, p in model.named_parameters()}
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replaced = sf.apply_fused_groupnorm(model, optimizers=optimizer)
    assert len(replaced) == 3  # two norms and one SiLU
    assert isinstance(model[1], FusedGroupNorm) and model[1].activation == "silu"
    assert isinstance(model[2], nn.Identity) and model[4].activation is None
    assert all(p is before[name] for name, p in model.named_parameters())
    assert set(model.state_dict()) == keys
    assert rel_err(model(x), expected) < 1e-5


def test_silu_left_alone_when_folding_could_change_math():
    shared = nn.GroupNorm(2, 4)
    hooked = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    hooked[1].register_forward_hook(lambda module, inputs, output: None)

    class Custom(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) * 2

    model = nn.Sequential(nn.Sequential(shared, nn.SiLU()), shared, hooked, Custom(nn.GroupNorm(2, 4), nn.SiLU()))
    replaced = sf.apply_fused_groupnorm(model)
    assert sum(isinstance(new, nn.Identity) for new in replaced.values()) == 0
    assert all(m.activation is None for m in model.modules() if isinstance(m, FusedGroupNorm))
    assert not fuse_silu_into_group_norms(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))  # not a FusedGroupNorm


def test_apply_without_group_norms_warns():
    with pytest.warns(NoEffectWarning):
        assert not sf.apply_fused_groupnorm(nn.Sequential(nn.Linear(2, 2)))


def test_algorithm_swaps_at_init():
    state = State(model=nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))
    algorithm = FusedGroupNormAlgorithm(fuse_silu=False)
    assert algorithm.match(Event.INIT, state)
    algorithm.apply(Event.INIT, state, logger=None)
    assert isinstance(state.model[0], FusedGroupNorm) and isinstance(state.model[1], nn.SiLU)
    with pytest.raises(TypeError, match="fuse_silu"):
        FusedGroupNormAlgorithm(fuse_silu="yes")


def test_compiled_model_has_no_graph_breaks():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.SiLU())
    sf.apply_fused_groupnorm(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path of LPGroupNorm runs on CUDA")
def test_lp_groupnorm_uses_kernel_on_cuda():
    gn = randomize(LPGroupNorm(4, 12)).cuda()
    x = torch.randn(2, 12, 6, 6, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = gn(x)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()  # fp32 in, bf16 out, layout kept
    ref = F.group_norm(x.double(), 4, gn.weight.double(), gn.bias.double(), gn.eps)
    assert rel_err(y, ref) < 2e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and gn.weight.grad.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gn(x).dtype == torch.float32  # outside autocast: exactly nn.GroupNorm


def test_module_checks_its_input():
    """The module path checks only the input (its parameters are valid by construction), with clear errors."""
    gn = FusedGroupNorm(2, 4)
    with pytest.raises(ValueError, match="4 channels"):
        gn(torch.randn(2, 6, 3))
    with pytest.raises(TypeError, match="floating-point"):
        gn(torch.ones(2, 4, 3, dtype=torch.int64))
    gn.activation = "relu"  # set after construction, past the constructor's check
    with pytest.raises(ValueError, match="activation='relu'"):
        gn(torch.randn(2, 4, 3))


def test_timm_group_norm_with_fast_norm_is_left_alone():
    """timm's GroupNorm is registered as nn.GroupNorm's math, except with its fast norm on (autocast-dtype math)."""
    TimmGroupNorm = type("GroupNorm", (nn.GroupNorm,), {})
    TimmGroupNorm.__module__ = "timm.layers.norm"
    fast, plain = TimmGroupNorm(2, 4), TimmGroupNorm(2, 4)
    fast._fast_norm, plain._fast_norm = True, False
    model = nn.Sequential(fast, plain)
    with pytest.warns(SurgeryWarning, match="fast norm"):
        replaced = sf.apply_fused_groupnorm(model)
    assert list(replaced) == [plain] and model[0] is fast and type(model[1]) is FusedGroupNorm
