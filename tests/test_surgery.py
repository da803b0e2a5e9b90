import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slipstream.nn import LPGroupNorm, LPLayerNorm
from slipstream.surgery import SurgeryWarning, register_same_math, replace_module_classes

LN_POLICY = {nn.LayerNorm: lambda m, i: LPLayerNorm.from_module(m)}


class PlainSubclassLN(nn.LayerNorm):
    """Adds nothing to forward: same math, so it is swapped."""

    extra = 1


class ChannelsFirstLN(nn.LayerNorm):
    """Normalizes dim 1 of NCHW (like timm's LayerNorm2d): different math, never swapped."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class RegisteredLN(nn.LayerNorm):
    """Overrides forward with identical math and is registered as such."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


register_same_math(RegisteredLN, nn.LayerNorm)


def small_model():
    return nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3), nn.LayerNorm(3))


def test_replaces_exact_class_and_returns_mapping():
    model = small_model()
    olds = [model[1], model[4]]
    replaced = replace_module_classes(model, LN_POLICY)
    assert set(replaced) == set(olds)
    assert isinstance(model[1], LPLayerNorm) and isinstance(model[4], LPLayerNorm)
    assert replaced[olds[0]] is model[1]


def test_adopts_same_parameter_objects_mode_and_dtype():
    model = small_model().to(torch.float64).eval()
    weight, bias = model[1].weight, model[1].bias
    replace_module_classes(model, LN_POLICY)
    assert model[1].weight is weight and model[1].bias is bias
    assert model[1].training is False
    assert model[1].weight.dtype == torch.float64


def test_optimizer_built_before_surgery_still_moves_parameters():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_module_classes(model, LN_POLICY, optimizers=opt)
    before = model[1].weight.detach().clone()
    model(torch.randn(5, 6)).square().sum().backward()
    opt.step()
    assert not torch.equal(before, model[1].weight.detach())


def test_state_dict_identical_and_checkpoints_load_both_ways():
    model = small_model()
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_module_classes(model, LN_POLICY)
    sd_after = model.state_dict()
    assert list(sd_before) == list(sd_after)
    for key in sd_before:
        assert torch.equal(sd_before[key], sd_after[key])

    # saved before surgery -> loads after, and vice versa, through a real serialization
    plain = small_model()
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    model.load_state_dict(torch.load(buf))
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), plain(x))

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = small_model()
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), model(x))


def test_shared_module_replaced_once_for_both_parents():
    shared = nn.LayerNorm(4)
    a, b = nn.Sequential(nn.Linear(4, 4), shared), nn.Sequential(shared)
    model = nn.ModuleDict({"a": a, "b": b})
    replaced = replace_module_classes(model, LN_POLICY)
    assert len(replaced) == 1
    assert model["a"][1] is model["b"][0]
    assert isinstance(model["b"][0], LPLayerNorm)


def test_root_module_can_be_replaced():
    root = nn.LayerNorm(5)
    replaced = replace_module_classes(root, LN_POLICY)
    new_root = replaced.get(root, root)
    assert isinstance(new_root, LPLayerNorm) and new_root.weight is root.weight


def test_subclass_rules():
    model = nn.Sequential(PlainSubclassLN(4), ChannelsFirstLN(4), RegisteredLN(4))
    with pytest.warns(SurgeryWarning, match="ChannelsFirstLN"):
        replaced = replace_module_classes(model, LN_POLICY)
    assert len(replaced) == 2
    assert isinstance(model[0], LPLayerNorm)
    assert type(model[1]) is ChannelsFirstLN
    assert isinstance(model[2], LPLayerNorm)


def test_timm_names_are_registered_same_math():
    # timm cannot be installed here; a class with timm's qualified name stands in for it.
    TimmLayerNorm = type("LayerNorm", (nn.LayerNorm,), {"forward": lambda self, x: F.layer_norm(
        x, self.normalized_shape, self.weight, self.bias, self.eps)})
    TimmLayerNorm.__module__ = "timm.layers.norm"
    TimmGroupNorm = type("GroupNorm", (nn.GroupNorm,), {"forward": lambda self, x: F.group_norm(
        x, self.num_groups, self.weight, self.bias, self.eps)})
    TimmGroupNorm.__module__ = "timm.layers.norm"
    TimmLayerNorm2d = type("LayerNorm2d", (nn.LayerNorm,), {"forward": ChannelsFirstLN.forward})
    TimmLayerNorm2d.__module__ = "timm.layers.norm"
    model = nn.Sequential(TimmLayerNorm(4), TimmGroupNorm(2, 4), TimmLayerNorm2d(4))
    with pytest.warns(SurgeryWarning, match="LayerNorm2d"):
        replaced = replace_module_classes(
            model, {**LN_POLICY, nn.GroupNorm: lambda m, i: LPGroupNorm.from_module(m)}
        )
    assert len(replaced) == 2
    assert isinstance(model[0], LPLayerNorm) and isinstance(model[1], LPGroupNorm)


def test_policy_returning_none_skips_and_index_counts_swaps():
    seen = []

    def policy(module, index):
        seen.append(index)
        return LPLayerNorm.from_module(module) if module.normalized_shape == (6,) else None

    model = small_model()
    replaced = replace_module_classes(model, {nn.LayerNorm: policy})
    assert seen == [0, 1]  # model[1] is the first match; model[4] the second
    assert len(replaced) == 1
    assert isinstance(model[1], LPLayerNorm) and type(model[4]) is nn.LayerNorm


def test_hooks_carried_over():
    model = small_model()
    calls = []
    model[1].register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    replace_module_classes(model, LN_POLICY)
    model(torch.randn(2, 6))
    assert calls == [torch.Size([2, 6])]


def test_every_hook_kind_is_carried_and_old_handles_still_remove_them():
    model = small_model()
    calls = []
    handles = [
        model[1].register_forward_hook(lambda mod, inp, out: calls.append("forward")),
        model[1].register_forward_pre_hook(lambda mod, inp: calls.append("pre")),
        model[1].register_full_backward_hook(lambda mod, gin, gout: calls.append("backward")),
        model[1].register_full_backward_pre_hook(lambda mod, gout: calls.append("backward pre")),
    ]
    replace_module_classes(model, LN_POLICY)
    model(torch.randn(2, 6, requires_grad=True)).sum().backward()
    assert sorted(calls) == ["backward", "backward pre", "forward", "pre"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(torch.randn(2, 6, requires_grad=True)).sum().backward()
    assert calls == []


class CountingLN(nn.LayerNorm):
    """Same forward, but state of its own (a buffer): swapping it would drop a state_dict key."""

    def __init__(self, n):
        super().__init__(n)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))


class ExtraStateLN(nn.LayerNorm):
    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


def _with_load_hook(module):
    module.register_load_state_dict_pre_hook(lambda *args: None)
    return module


@pytest.mark.parametrize("make, reason", [
    (lambda: torch.nn.utils.parametrize.register_parametrization(nn.LayerNorm(6), "weight", nn.Tanh()),
     "parametrizations"),
    (lambda: CountingLN(6), r"buffers \['calls'\]"),
    (lambda: ExtraStateLN(6), "get_extra_state"),
    (lambda: _with_load_hook(nn.LayerNorm(6)), "load_state_dict hooks"),
])
def test_modules_whose_state_the_replacement_cannot_hold_are_left_alone(make, reason):
    model = nn.Sequential(nn.Linear(6, 6), make())
    keys, x = list(model.state_dict()), torch.randn(3, 6)
    expected = model(x)
    with pytest.warns(SurgeryWarning, match=reason):
        replaced = replace_module_classes(model, LN_POLICY)
    assert replaced == {} and list(model.state_dict()) == keys
    assert torch.equal(model(x), expected)


def test_a_policy_that_raises_leaves_the_model_unchanged_and_names_the_module():
    model = nn.Sequential(nn.LayerNorm(6), nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)))
    before = [type(m) for m in model.modules()]

    def policy(module, index):
        if index == 1:
            raise ValueError("no replacement for this one")
        return LPLayerNorm.from_module(module)

    with pytest.raises(ValueError, match=r"^1\.1 \(LayerNorm\): no replacement for this one"):
        replace_module_classes(model, {nn.LayerNorm: policy})
    assert [type(m) for m in model.modules()] == before


def test_new_parameters_join_optimizer():
    class WithScale(nn.LayerNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = nn.Parameter(torch.ones(()))

    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replaced = replace_module_classes(
        model, {nn.LayerNorm: lambda m, i: WithScale(m.normalized_shape)}, optimizers=[opt]
    )
    scales = {id(new.scale) for new in replaced.values()}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert scales <= in_opt


def test_refuses_wrapped_and_bad_arguments():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group needed to test the isinstance refusal
            nn.Module.__init__(self)

    with pytest.raises(TypeError, match="before wrapping"):
        replace_module_classes(FakeDDP(), LN_POLICY)
    with pytest.raises(TypeError, match="model must be"):
        replace_module_classes("not a model", LN_POLICY)
    with pytest.raises(TypeError, match="policies keys"):
        replace_module_classes(small_model(), {"LayerNorm": lambda m, i: m})
    with pytest.raises(TypeError, match="subclass must be"):
        register_same_math(nn.Linear, nn.LayerNorm)


def test_no_warning_for_unrelated_modules():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_module_classes(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), LN_POLICY)
