"""FusedLayerNorm module, apply_fused_layernorm surgery and the FusedLayerNorm algorithm."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slipstream.functional as sf
from slipstream.algorithms import Event, FusedLayerNorm as FusedLayerNormAlgorithm, State
from slipstream.nn import FusedLayerNorm, FusedLayerNorm2d
from slipstream.surgery import NoEffectWarning, SurgeryWarning


class TinyTransformer(nn.Module):
    """Pre-norm transformer: embedding, two blocks (attention + MLP), final norm, head."""

    def __init__(self, vocab=50, width=48, heads=4, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.LayerNorm(width), attn=nn.MultiheadAttention(width, heads, batch_first=True),
                norm2=nn.LayerNorm(width), mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                                             nn.Linear(4 * width, width)),
            )))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            a = block["norm1"](h)
            h = h + block["attn"](a, a, a, need_weights=False)[0]
            h = h + block["mlp"](block["norm2"](h))
        return self.head(self.norm(h))


def randomize_norms(model):
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)


def test_surgery_keeps_outputs_gradients_and_parameters():
    torch.manual_seed(0)
    model = TinyTransformer()
    randomize_norms(model)
    reference = copy.deepcopy(model)
    params_before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    replaced = sf.apply_fused_layernorm(model, optimizers=optimizer)

    assert len(replaced) == 5 and all(type(new) is FusedLayerNorm for new in replaced.values())
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == reference.state_dict().keys()
    tokens = torch.randint(0, 50, (3, 11))
    out, ref = model(tokens), reference(tokens)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert float((p.grad - p_ref.grad).norm() / p_ref.grad.norm()) < 1e-4, name
    before = model.norm.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.norm.weight, before)  # the optimizer built before surgery still updates it


def test_autocast_output_dtype_and_gradient_dtypes():
    """Under autocast: input read as it arrives (fp32), output in the autocast dtype, grads in their own dtypes."""
    ln = FusedLayerNorm(40)
    nn.init.normal_(ln.weight, 1.0, 0.3)
    x = (torch.randn(6, 40) * 2 + 1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.layer_norm(x.detach().double(), (40,), ln.weight.double(), ln.bias.double())
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and ln.weight.grad.dtype == torch.float32
    assert ln(x).dtype == torch.float32  # outside autocast: the input's dtype, as nn.LayerNorm


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_from_module_copies_the_configuration(affine, bias):
    original = nn.LayerNorm((3, 8), eps=1e-3, elementwise_affine=affine, bias=bias)
    fused = FusedLayerNorm.from_module(original)
    assert isinstance(fused, nn.LayerNorm)
    assert (fused.normalized_shape, fused.eps, fused.elementwise_affine) == ((3, 8), 1e-3, affine)
    assert fused.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, 8) * 4
    assert torch.allclose(fused(x), original(x), atol=1e-5)


def test_no_layernorm_warns_no_effect():
    with pytest.warns(NoEffectWarning):
        assert sf.apply_fused_layernorm(nn.Sequential(nn.Linear(4, 4))) == {}


def test_algorithm_swaps_at_init():
    state = State(model=TinyTransformer(blocks=1))
    algorithm = FusedLayerNormAlgorithm()
    assert algorithm.match(Event.INIT, state) and not algorithm.match(Event.BATCH_END, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm.apply(Event.INIT, state, logger=None)
    assert sum(isinstance(m, FusedLayerNorm) for m in state.model.modules()) == 3


def test_compiled_model_has_no_graph_breaks():
    model = TinyTransformer(blocks=1)
    sf.apply_fused_layernorm(model)
    tokens = torch.randint(0, 50, (2, 7))
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0


def timm_like(name, forward, fast_norm=False):
    """A stand-in for a timm norm class (timm cannot be installed here): timm's qualified name."""
    cls = type(name, (nn.LayerNorm,), {"forward": forward})
    cls.__module__ = "timm.layers.norm"
    original_init = cls.__init__

    def __init__(self, channels, eps=1e-6):
        original_init(self, channels, eps=eps)
        self._fast_norm = fast_norm

    cls.__init__ = __init__
    return cls


def channels_first_forward(self, x):  # timm's LayerNorm2d.forward with fast norm off
    x = x.permute(0, 2, 3, 1)
    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_timm_layer_norm_2d_becomes_fused_layer_norm_2d(channels_last):
    LayerNorm2d = timm_like("LayerNorm2d", channels_first_forward)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), LayerNorm2d(6), nn.Conv2d(6, 5, 1), nn.LayerNorm(5))
    randomize_norms(model)
    reference = copy.deepcopy(model)
    replaced = sf.apply_fused_layernorm(model)
    assert [type(new) for new in replaced.values()] == [FusedLayerNorm2d, FusedLayerNorm]
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, ref = model(x), reference(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(out, list(model.parameters()), dy)
    ref_grads = torch.autograd.grad(ref, list(reference.parameters()), dy)
    assert all(torch.allclose(g, r, atol=1e-4, rtol=1e-4) for g, r in zip(grads, ref_grads))


def test_fused_layer_norm_2d_checks_rank_and_matches_float64():
    norm = FusedLayerNorm2d(5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = (torch.randn(2, 5, 3, 4) * 2 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias)]
    ref = F.layer_norm(leaves64[0].permute(0, 2, 3, 1), (5,), leaves64[1], leaves64[2]).permute(0, 3, 1, 2)
    out = norm(x)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, norm.weight, norm.bias), dy)
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    for got, expected in zip(grads, ref_grads):  # dx, dW, dB
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
    with pytest.raises(ValueError, match="NCHW"):
        norm(torch.randn(2, 5))


def test_timm_fast_norm_is_left_alone():
    LayerNorm = timm_like("LayerNorm", lambda self, x: F.layer_norm(
        x, self.normalized_shape, self.weight, self.bias, self.eps), fast_norm=True)
    model = nn.Sequential(LayerNorm(4), nn.LayerNorm(4))
    with pytest.warns(SurgeryWarning, match="fast norm"):
        replaced = sf.apply_fused_layernorm(model)
    assert len(replaced) == 1 and type(model[0]) is LayerNorm and type(model[1]) is FusedLayerNorm


def test_module_checks_its_input():
    """The module path checks only the input (its parameters are valid by construction), with clear errors."""
    ln = FusedLayerNorm(8)
    with pytest.raises(ValueError, match="last dimensions"):
        ln(torch.randn(2, 6))
    with pytest.raises(TypeError, match="dtype"):
        ln(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path of LPLayerNorm runs on CUDA")
def test_lp_layernorm_uses_kernel_on_cuda():
    """Under autocast on CUDA, LPLayerNorm reads the fp32 residual stream and writes bf16 in one kernel."""
    from slipstream.nn import LPLayerNorm

    ln = LPLayerNorm(48).cuda()
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.5), ln.bias.normal_()
    x = torch.randn(4, 7, 48, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    w64, b64 = ln.weight.detach().double().requires_grad_(), ln.bias.detach().double().requires_grad_()
    ref = F.layer_norm(x64, (48,), w64, b64, ln.eps)
    assert float((y.detach().double() - ref.detach()).norm() / ref.detach().norm()) < 2e-2
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    for got, expected in ((x.grad, x64.grad), (ln.weight.grad, w64.grad), (ln.bias.grad, b64.grad)):
        assert got.dtype == torch.float32
        assert float((got.double() - expected).norm() / expected.norm()) < 2e-2


def test_norm_modules_follow_autocast_on_meta_and_float64_inputs():
    """Meta tensors (shape tracing, deferred init) work, and autocast leaves a float64 input float64."""
    from slipstream.nn import FusedGroupNorm, LPGroupNorm, LPLayerNorm

    layer_norms = (FusedLayerNorm(8), LPLayerNorm(8))
    group_norms = (FusedGroupNorm(2, 8), LPGroupNorm(2, 8))
    for module in layer_norms + group_norms:
        assert module.to("meta")(torch.empty(3, 8, 4 if module in group_norms else 8, device="meta")).is_meta
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for module in (FusedLayerNorm(8), LPLayerNorm(8), FusedGroupNorm(2, 8), LPGroupNorm(2, 8)):
            module.double()
            reference = (nn.LayerNorm(8) if isinstance(module, nn.LayerNorm) else nn.GroupNorm(2, 8)).double()
            reference.load_state_dict(module.state_dict())
            y = module(x)
            assert y.dtype == torch.float64
            assert float((y - reference(x)).detach().abs().max()) < 1e-12


def test_torch_func_transforms_run_the_pytorch_math():
    """vmap and grad over the fused norms (per-sample gradients, functional training) equal PyTorch's norms."""
    from torch.func import functional_call, grad, vmap

    from slipstream.nn import FusedGroupNorm

    cases = ((FusedLayerNorm(8), lambda p, t: F.layer_norm(t, (8,), p["weight"], p["bias"]), (5, 3, 8)),
             (FusedGroupNorm(2, 4, activation="silu"),
              lambda p, t: F.silu(F.group_norm(t, 2, p["weight"], p["bias"])), (5, 3, 4, 6)))
    for module, reference, shape in cases:
        with torch.no_grad():
            module.weight.normal_(), module.bias.normal_()
        params = {name: p.detach() for name, p in module.named_parameters()}
        x = torch.randn(shape)
        assert torch.allclose(vmap(module)(x), vmap(lambda t: reference(params, t))(x), atol=1e-6)

        def per_sample_loss(p, t, fn):
            return fn(p, t).pow(2).sum()

        ours = vmap(grad(per_sample_loss), in_dims=(None, 0, None))(
            params, x, lambda p, t: functional_call(module, p, (t,)))
        expected = vmap(grad(per_sample_loss), in_dims=(None, 0, None))(params, x, reference)
        for name in params:
            assert torch.allclose(ours[name], expected[name], atol=1e-5)
