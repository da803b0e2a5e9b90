"""benchmarks/compiled_dropout.py on the CPU: its variants build; its device-state stream draws the shipped seeds."""

import pytest
import torch
from torch import nn

from benchmarks.compiled_dropout import VARIANTS, DeviceStateStream, IntSeedDropout, dropout_for
from slipstream.nn import SeededDropout
from slipstream.nn.seed_stream import SeedStream


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_a_dropout_with_p(variant):
    module = dropout_for(variant, 0.1, 3, torch.device("cpu"))
    expected = {"native": nn.Dropout, "none": nn.Dropout, "seeded_int": IntSeedDropout}.get(variant, SeededDropout)
    assert isinstance(module, expected)
    assert module.p == (0.0 if variant == "none" else 0.1)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        dropout_for("seeded_gpu", 0.1, 0, torch.device("cpu"))


def test_device_state_stream_draws_the_seeds_of_the_shipped_stream():
    shipped, moved = SeedStream(key=-77), DeviceStateStream(-77, torch.device("cpu"))
    assert [int(moved.next()) for _ in range(4)] == [shipped.next() for _ in range(4)]
    assert moved.state.tolist() == [-77, 4]
