"""Surgery rules shared by the dropout replacements."""

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
