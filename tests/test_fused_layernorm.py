"""FusedLayerNorm module, apply_fused_layernorm surgery and the FusedLayerNorm algorithm."""

import copy
import warnings

import pytest
import torch
from torch import nn

import slipstream.functional as sf
from slipstream.algorithms import Event, FusedLayerNorm as FusedLayerNormAlgorithm, State
from slipstream.nn import FusedLayerNorm
from slipstream.surgery import NoEffectWarning


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
