"""SparseJL layer: no stored matrix (state_dict holds the seed only), same math as the op, bad input."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from slipstream.nn import SparseJL
from slipstream.ops import sparse_jl, sparse_jl_matrix


def test_forward_is_the_op_and_the_matrix():
    layer = SparseJL(60, 24, seed=17, sparsity=8)
    x = torch.randn(2, 5, 60, dtype=torch.float64)
    assert torch.equal(layer(x), sparse_jl(x, 24, 17, 8))
    assert torch.allclose(layer(x), x @ layer.projection_matrix(torch.float64))
    assert torch.equal(layer.projection_matrix(), sparse_jl_matrix(60, 24, 17, 8))


def test_state_dict_holds_the_seed_only():
    layer = SparseJL(100, 20, seed=2**50 + 3)
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    assert dict(layer.state_dict()) == {"_extra_state": {"seed": 2**50 + 3}}
    other = SparseJL(100, 20, seed=1)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(other(x), layer(x))


def test_round_trips_through_torch_save_and_pickle_inside_a_model():
    model = nn.Sequential(nn.Linear(8, 100), SparseJL(100, 16, seed=5))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Linear(8, 100), SparseJL(100, 16, seed=6))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))
    assert copy.deepcopy(model)[1].seed == 5


def test_seed_none_draws_from_the_global_generator():
    torch.manual_seed(123)
    a = SparseJL(10, 4)
    torch.manual_seed(123)
    b = SparseJL(10, 4)
    c = SparseJL(10, 4)
    assert a.seed == b.seed != c.seed
    assert 0 <= a.seed < 2**63


def test_gradient_flows_to_the_input_only():
    layer = SparseJL(30, 12, seed=9)
    x = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 12, dtype=torch.float64)
    layer(x).backward(dy)
    assert torch.allclose(x.grad, dy @ layer.projection_matrix(torch.float64).T)


def test_compiles_without_graph_breaks():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), SparseJL(64, 8, seed=4))
    x = torch.randn(3, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert torch.allclose(torch.compile(model)(x), model(x))


def test_repr_names_the_configuration():
    assert repr(SparseJL(7, 3, seed=1)) == "SparseJL(in_features=7, out_features=3, seed=1, sparsity=2)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_features=0, out_features=3), "in_features must be a positive int"),
        (dict(in_features=4, out_features=2.5), "out_features must be a positive int"),
        (dict(in_features=True, out_features=3), "in_features must be a positive int"),
        (dict(in_features=4, out_features=3, seed=-1), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
        (dict(in_features=4, out_features=3, seed=2**63), "seed must be an int"),
        (dict(in_features=4, out_features=3, seed="7"), "seed must be an int"),
        (dict(in_features=4, out_features=3, sparsity=4), r"sparsity must be one of \(2, 8\)"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseJL(**kwargs)


def test_bad_input_width_and_bad_loaded_seed():
    layer = SparseJL(10, 4, seed=0)
    with pytest.raises(ValueError, match="last dimension 10"):
        layer(torch.randn(2, 11))
    with pytest.raises(ValueError, match="seed must be an int"):
        layer.load_state_dict({"_extra_state": {"seed": -5}})
