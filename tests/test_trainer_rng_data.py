"""The Trainer's generators and samplers on their own: seeding, state round trips, shards."""

import random

import numpy as np
import pytest
import torch

from slipstream.surgery import classes_named, count_module_instances
from slipstream.trainer.data import ShardSampler
from slipstream.trainer.rng import rng_state, seed_everything, set_rng_state


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(123)
    first = _draws()
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    assert all(a != b for a, b in zip(_draws(), first))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    seed_everything(5)
    _draws()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


@pytest.mark.parametrize("size, replicas", [(10, 3), (7, 2), (4, 4), (2, 3)])
def test_shards_without_padding_count_every_sample_once(size, replicas):
    shards = [list(ShardSampler(range(size), replicas, rank, shuffle=True, seed=1, pad=False))
              for rank in range(replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ShardSampler(range(size), replicas, r, shuffle=True, pad=False)) for r in range(replicas)] == [
        len(s) for s in shards]


def test_padded_shards_are_equal_in_length_and_skipping_resumes_mid_epoch():
    samplers = [ShardSampler(range(10), 3, rank, shuffle=True, seed=2) for rank in range(3)]
    shards = [list(s) for s in samplers]
    assert {len(s) for s in shards} == {4} and set().union(*shards) == set(range(10))
    samplers[1].skip_next(3)
    assert list(samplers[1]) == shards[1][3:]
    assert list(samplers[1]) == shards[1]  # the skip applies to one pass only


def test_count_module_instances_and_classes_named():
    from torch import nn

    shared = nn.LayerNorm(4)
    model = nn.Sequential(shared, nn.Linear(4, 4), shared, nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    assert count_module_instances(model, nn.LayerNorm) == 2  # the shared norm counts once
    assert count_module_instances(model, (nn.LayerNorm, nn.ReLU)) == 3
    assert classes_named(model, ["torch.nn.modules.normalization.LayerNorm", "no.such.Class"]) == {nn.LayerNorm}
    with pytest.raises(TypeError, match="model must be"):
        classes_named("not a model", [])
