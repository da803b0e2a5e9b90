"""Surgery rules shared by the dropout replacements."""

import numpy as np
import pytest
from torch import nn

import slipstream.functional as sf
from slipstream.nn import GyroDropout, SeededDropout


@pytest.mark.parametrize(
    "apply,new_class",
    [
        (lambda m: sf.apply_low_memory_dropout(m, seed=3), SeededDropout),
        (lambda m: sf.apply_gyro_dropout(m, sigma=4, tau=2, iters_per_epoch=2, max_epoch=1), GyroDropout),
    ],
)
def test_identity_dropouts_are_left_alone(apply, new_class):
    model = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 4), nn.Dropout(0.2))
    identity, real = model[0], model[2]
    replaced = apply(model)
    assert list(replaced) == [real]
    assert model[0] is identity and isinstance(model[2], new_class)
    assert model[2].p == pytest.approx(0.2)


@pytest.mark.parametrize(
    "apply,new_class",
    [
        (lambda m: sf.apply_low_memory_dropout(m, seed=3), SeededDropout),
        (lambda m: sf.apply_gyro_dropout(m, sigma=4, tau=2, iters_per_epoch=2, max_epoch=1), GyroDropout),
    ],
)
def test_numpy_probabilities_are_taken_as_floats(apply, new_class):
    model = nn.Sequential(nn.Dropout(np.float32(0.25)), nn.Linear(4, 4))
    apply(model)
    assert isinstance(model[0], new_class) and type(model[0].p) is float and model[0].p == 0.25


def test_a_dropout_gyro_cannot_take_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4), nn.Dropout(1.0))
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"^2 \(Dropout\): p must be in \[0, 1\)"):
        sf.apply_gyro_dropout(model, sigma=4, tau=2, iters_per_epoch=2, max_epoch=1)
    assert [type(m) for m in model] == before


def test_seeds_number_the_replaced_modules():
    model = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.0), nn.Dropout(0.2))
    sf.apply_low_memory_dropout(model, seed=7)
    assert [model[0].run_state()["key"], model[2].run_state()["key"]] == [7, 8]
