import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slipstream.functional as sf
from slipstream.algorithms import Event, LowPrecisionGroupNorm, LowPrecisionLayerNorm, State
from slipstream.nn import LPGroupNorm, LPLayerNorm
from slipstream.surgery import NoEffectWarning

BF16_TOL = 2e-2  # relative error of a bf16 norm against float64


def rel_err(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def make_ln(affine=True, bias=True):
    ln = LPLayerNorm(24, elementwise_affine=affine, bias=bias)
    if affine:
        nn.init.normal_(ln.weight)
        if bias:
            nn.init.normal_(ln.bias)
    return ln


def make_gn(affine=True):
    gn = LPGroupNorm(3, 12, affine=affine)
    if affine:
        nn.init.normal_(gn.weight)
        nn.init.normal_(gn.bias)
    return gn


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_lp_layernorm_under_autocast_matches_float64(affine, bias):
    ln = make_ln(affine, bias)
    x = torch.randn(5, 7, 24) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    w = None if ln.weight is None else ln.weight.double()
    b = None if ln.bias is None else ln.bias.double()
    ref = F.layer_norm(x.double(), (24,), w, b, ln.eps)
    assert rel_err(y, ref) < BF16_TOL


@pytest.mark.parametrize("affine", [True, False])
def test_lp_groupnorm_under_autocast_matches_float64(affine):
    gn = make_gn(affine)
    x = torch.randn(4, 12, 5, 3) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x)
    assert y.dtype == torch.bfloat16
    w = None if gn.weight is None else gn.weight.double()
    b = None if gn.bias is None else gn.bias.double()
    ref = F.group_norm(x.double(), 3, w, b, gn.eps)
    assert rel_err(y, ref) < BF16_TOL


def test_outside_autocast_exactly_torch_module():
    ln, gn = make_ln(), make_gn()
    x = torch.randn(3, 24)
    assert torch.equal(ln(x), F.layer_norm(x, (24,), ln.weight, ln.bias, ln.eps))
    xg = torch.randn(2, 12, 4)
    assert torch.equal(gn(xg), F.group_norm(xg, 3, gn.weight, gn.bias, gn.eps))
    assert isinstance(ln, nn.LayerNorm) and isinstance(gn, nn.GroupNorm)


def test_gradients_reach_the_original_parameters():
    # Groups of 16 elements: bf16 rounding of groups of a few elements changed their variance by up to 15%.
    model = nn.Sequential(nn.Linear(24, 24), nn.LayerNorm(24), nn.Linear(24, 48), nn.Unflatten(1, (12, 4)),
                          nn.GroupNorm(3, 12))
    reference = copy.deepcopy(model)  # the same model with PyTorch's norms (fp32 under autocast)
    ln_weight, gn_weight = model[1].weight, model[4].weight
    sf.apply_low_precision_layernorm(model)
    sf.apply_low_precision_groupnorm(model)
    x, weights = torch.randn(6, 24), torch.randn(6, 12, 4)
    for net in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # A random projection: squares of normalized outputs would leave earlier layers gradients
            # that nearly cancel, whose relative error says nothing.
            loss = (net(x).float() * weights).sum()
        loss.backward()
    assert model[1].weight is ln_weight and model[4].weight is gn_weight
    for p in (ln_weight, gn_weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    # Every gradient as the fp32 norms give it, up to bf16 rounding of the norms' inputs and outputs.
    for got, expected in zip(model.parameters(), reference.parameters()):
        assert float((got.grad - expected.grad).norm() / expected.grad.norm()) < 3e-2  # measured: at most 1.0e-2


def test_functional_returns_mapping_and_counts():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4))
    replaced = sf.apply_low_precision_layernorm(model, precision="amp_bf16")
    assert len(replaced) == 2 and all(isinstance(m, LPLayerNorm) for m in replaced.values())


def test_fp32_or_nothing_to_replace_warns_and_changes_nothing():
    model = nn.Sequential(nn.LayerNorm(4), nn.GroupNorm(2, 4))
    with pytest.warns(NoEffectWarning, match="fp32"):
        assert sf.apply_low_precision_layernorm(model, precision="fp32") == {}
    with pytest.warns(NoEffectWarning, match="fp32"):
        assert sf.apply_low_precision_groupnorm(model, precision="fp32") == {}
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is nn.GroupNorm
    with pytest.warns(NoEffectWarning, match="found no LayerNorm"):
        sf.apply_low_precision_layernorm(nn.Linear(2, 2))
    with pytest.warns(NoEffectWarning, match="found no GroupNorm"):
        sf.apply_low_precision_groupnorm(nn.Linear(2, 2))


@pytest.mark.parametrize("bad", ["amp", "bf16", "", None, 16])
def test_bad_precision_lists_allowed_values(bad):
    fn = sf.apply_low_precision_groupnorm
    if bad is None:  # None is allowed: the norms follow the autocast dtype at run time
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fn(nn.Sequential(nn.GroupNorm(1, 2)), precision=None)
        return
    with pytest.raises(ValueError, match="'fp32', 'amp_fp16', 'amp_bf16'"):
        fn(nn.Sequential(nn.GroupNorm(1, 2)), precision=bad)
    with pytest.raises(ValueError, match="precision="):
        sf.apply_low_precision_layernorm(nn.Sequential(nn.LayerNorm(2)), precision=bad)


def test_algorithms_apply_at_init_with_state_precision():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.Unflatten(1, (4, 1)), nn.GroupNorm(2, 4))
    state = State(model=model, precision="amp_bf16")
    for algo in (LowPrecisionLayerNorm(), LowPrecisionGroupNorm()):
        assert algo.match(Event.INIT, state)
        assert not algo.match(Event.BATCH_END, state)
        algo.apply(Event.INIT, state, logger=None)
    assert isinstance(model[0], LPLayerNorm) and isinstance(model[3], LPGroupNorm)


def test_algorithm_replaces_root_in_state():
    state = State(model=nn.LayerNorm(4), precision="amp_fp16")
    LowPrecisionLayerNorm().apply(Event.INIT, state, logger=None)
    assert isinstance(state.model, LPLayerNorm)


def test_algorithm_fp32_state_warns():
    state = State(model=nn.Sequential(nn.LayerNorm(4)), precision="fp32")
    with pytest.warns(NoEffectWarning):
        LowPrecisionLayerNorm().apply(Event.INIT, state, logger=None)
    assert type(state.model[0]) is nn.LayerNorm
