import pytest
import torch

from slipstream.precision import autocast_dtype, validate_precision
from slipstream.time import Time, TimeUnit, Timestamp


def test_precision_strings():
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("amp_fp16") is torch.float16
    assert autocast_dtype("amp_bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="allowed values: 'fp32', 'amp_fp16', 'amp_bf16'"):
        validate_precision("fp16")


@pytest.mark.parametrize("text,value,unit", [("1ep", 1, TimeUnit.EPOCH), ("500ba", 500, TimeUnit.BATCH),
                                             (" 64sp ", 64, TimeUnit.SAMPLE)])
def test_time_parse(text, value, unit):
    t = Time.parse(text)
    assert (t.value, t.unit) == (value, unit)
    assert Time.parse(t) is t


@pytest.mark.parametrize("bad", ["0ep", "3tok", "ep", "-1ba", "1.5ep"])
def test_time_parse_errors_name_units(bad):
    with pytest.raises(ValueError, match="'ep', 'ba', 'sp'"):
        Time.parse(bad)
    with pytest.raises(TypeError):
        Time.parse(3)


def test_timestamp_roundtrip():
    ts = Timestamp(epoch=2, batch=17, sample=544, batch_in_epoch=3)
    other = Timestamp()
    other.load_state_dict(ts.state_dict())
    assert other == ts and other.get(TimeUnit.SAMPLE) == 544
