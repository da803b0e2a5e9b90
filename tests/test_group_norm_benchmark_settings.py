"""benchmarks/group_norm.py's kernel-settings plumbing (CPU): --settings, --sweep-setting and the
choice of the fastest value, with the GPU timing replaced by a table of known times."""

import argparse
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the script imports benchmarks.* from the repository root
    sys.path.insert(0, str(REPO))
from benchmarks import group_norm as bench  # noqa: E402
from slipstream.ops.kernels import group_norm as kernels  # noqa: E402


@pytest.fixture
def restore_settings(monkeypatch):
    for name in ("FORWARD_TILE", "BACKWARD_TILE", "MIN_RUN_BYTES"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name))


def test_settings_set_integer_kernel_constants(restore_settings):
    bench.apply_settings("FORWARD_TILE=2048,MIN_RUN_BYTES=128")
    assert (kernels.FORWARD_TILE, kernels.MIN_RUN_BYTES) == (2048, 128)


@pytest.mark.parametrize("text", ["interpreting=1", "FORWARD_TILE=big", "NO_SUCH_SETTING=3"])
def test_settings_reject_unknown_names_and_non_integers(restore_settings, text):
    with pytest.raises(SystemExit, match="FORWARD_TILE"):  # the message lists the allowed names
        bench.apply_settings(text)


def test_sweep_setting_values_parse():
    assert bench._setting_values("BACKWARD_TILE=2048,4096") == ("BACKWARD_TILE", [2048, 4096])
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=INT"):
        bench._setting_values("BACKWARD_TILE=2k")


def test_sweep_setting_keeps_the_value_with_the_best_geometric_mean(restore_settings, monkeypatch):
    # forward 10 us, backward 20 us at 4096 for every case; 2048 halves the backward of one case only,
    # 8192 doubles every forward: 2048 has the best geometric mean.
    def fake_times(shape, groups, layout):
        slow = kernels.FORWARD_TILE == 8192
        fast = kernels.FORWARD_TILE == 2048 and shape == bench.SHAPES[0][0] and layout == "contiguous"
        return (0.02 if slow else 0.01), (0.01 if fast else 0.02)

    monkeypatch.setattr(bench, "_kernel_times", fake_times)
    text = bench.sweep_setting(4000.0, "FORWARD_TILE", [4096, 2048, 8192], list(bench.LAYOUTS))
    assert kernels.FORWARD_TILE == 2048
    assert "Chosen: FORWARD_TILE=2048" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * len(bench.SHAPES) + 1  # header, every shape in both layouts, geomean
    assert "10.0 / 10.0" in rows[1] and "20.0 / 20.0" in rows[1]  # 2048's and 8192's cells of case one


def test_run_case_parses_shape_groups_layout_and_dtype():
    assert bench.parse_case("16x256x64x64:32:channels_last:bf16") == ((16, 256, 64, 64), 32, "channels_last", "bf16")


@pytest.mark.parametrize("text", ["16x256x64x64:32:channels_last", "16x256x64x64:30:contiguous:bf16",
                                  "16x256:32:contiguous:bf16", "16x256x64x64:32:nhwc:bf16",
                                  "16x256x64x64:32:contiguous:int8"])
def test_run_case_rejects_malformed_cases(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--run-case"):
        bench.parse_case(text)


def test_sweep_setting_of_an_unknown_name_fails_before_any_work():
    with pytest.raises(SystemExit, match="--sweep-setting: NO_SUCH .*FORWARD_TILE"):
        bench.main(["--sweep-setting", "NO_SUCH=1,2"])


def _result(impl: str, fwd_bwd_gbs: float, **extra) -> dict:
    return dict(shape=[2, 4, 3, 3], groups=2, dtype="bf16", layout="contiguous", silu=False, impl=impl,
                fwd_gbs=fwd_bwd_gbs, fwd_bwd_gbs=fwd_bwd_gbs, err_y=1e-3, err_dx=1e-3, ok=True, **extra)


def test_tables_give_slipstream_share_of_the_size_floor():
    rows = [_result("slipstream", 600.0, floor_fwd_gbs=1200.0, floor_fwd_bwd_gbs=1500.0), _result("eager", 200.0)]
    text = bench.norm_tables(rows, copy_gbs=3000.0)
    forward_and_backward = text.split("### forward\n")[0]
    # slipstream 600 GB/s: 20% of copy, 40% of its 1500 GB/s size floor, 3x eager.
    assert "| 20% | 1500 | 40% | 3 |" in forward_and_backward
    assert "| 20% | 1200 | 50% | 3 |" in text.split("### forward\n")[1]


def test_tables_of_results_without_floors_say_so():
    text = bench.norm_tables([_result("slipstream", 600.0), _result("eager", 200.0)], copy_gbs=3000.0)
    assert "| 20% | n/a | n/a | 3 |" in text
