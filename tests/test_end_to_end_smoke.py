"""CPU smoke run of benchmarks/end_to_end.py: tiny GPT-2 with the low-precision methods, quick mode."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    if str(REPO) not in sys.path:  # the script imports benchmarks.* from the repository root
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("end_to_end_benchmark", REPO / "benchmarks" / "end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpt2_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    results = _load_benchmark().main([
        "--quick", "--models", "gpt2", "--configs", "eager,methods,all",
        "--methods", "low_precision_layernorm,low_precision_groupnorm",
        "--steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out / "e2e.md"), "--json", str(out / "e2e.json"),
    ])
    return results["models"][0], out


def test_surgery_report_counts_the_layernorms(gpt2_result):
    result, _ = gpt2_result
    # Tiny GPT-2: 2 blocks x (ln_1, ln_2) + ln_f; no GroupNorm, so that method does not apply.
    assert result["surgery"]["low_precision_layernorm"].startswith("5 (LayerNorm->LPLayerNorm x5)")
    assert result["surgery"]["low_precision_groupnorm"].startswith("0")
    assert result["applicable"] == ["low_precision_layernorm"]
    # One applicable method: 'all' is that method alone, so it is not timed twice.
    assert [c["name"] for c in result["configs"]] == ["eager", "all"]


def test_numbers_are_sane(gpt2_result):
    result, out = gpt2_result
    eager, all_methods = result["configs"]
    assert result["loss_steps"] == 1 + 2 * (2 + 2)  # warm-up + rounds x (round warm-up + timed)
    for config in (eager, all_methods):
        assert len(config["round_median_ms"]) == 2
        assert 0 < config["min_ms"] <= config["median_ms"] <= config["max_ms"] < 60_000
        assert config["throughput"] > 0
        assert config["peak_bytes"] is None  # CPU: no CUDA memory statistics
        # Random 256-token vocabulary: the loss starts near ln 256 and stays finite.
        assert 1.0 < config["final_loss"] < math.log(256) + 1
        losses = config["step_losses"]
        assert len(losses) == result["loss_steps"] and all(math.isfinite(v) for v in losses)
    # Same weights and batches; low-precision norms move the loss by rounding, not more (measured: 0.07%;
    # norms that did not normalize moved it 1.9%).
    for with_methods, without in zip(all_methods["step_losses"], eager["step_losses"]):
        assert abs(with_methods - without) < 5e-3 * without
    text = (out / "e2e.md").read_text()
    assert "### gpt2" in text and "| eager |" in text and "all methods vs eager" in text
    assert (out / "e2e.json").stat().st_size > 0


def test_triton_launch_configuration_runs_all_with_triton_launches():
    benchmark = _load_benchmark()
    configs = benchmark._configs(["eager", "all", "all-triton-launch"], ["fused_layernorm", "low_memory_dropout"])
    assert [(c.name, c.methods, c.eager_launch) for c in configs] == [
        ("eager", (), "cached"),
        ("all", ("fused_layernorm", "low_memory_dropout"), "cached"),
        ("all, Triton launch", ("fused_layernorm", "low_memory_dropout"), "triton"),
    ]


def test_final_loss_is_the_median_of_the_last_steps_so_a_two_step_spike_does_not_move_it():
    import torch

    from benchmarks.end_to_end_training import FINAL_LOSS_STEPS, Trainee

    trainee = Trainee.__new__(Trainee)  # only its losses matter here
    window = [6.0 + 0.01 * i for i in range(FINAL_LOSS_STEPS - 2)] + [18.9, 17.7]  # a spike, as GPT-2 has
    trainee.losses = [torch.tensor(v) for v in [1.0] * 3 + window]  # earlier steps are left out
    lower_middle = sorted(window)[(FINAL_LOSS_STEPS - 1) // 2]
    assert trainee.final_loss() == pytest.approx(lower_middle)
    assert trainee.final_loss() < 6.1


def test_kernel_norms_configuration_compiles_all_with_the_kernel_settings():
    benchmark = _load_benchmark()
    configs = benchmark._configs(["all+compile", "all+compile-kernel-norms"], ["fused_layernorm"])
    assert [(c.name, c.compiled, c.compiled_layer_norm, c.compiled_group_norm) for c in configs] == [
        ("all+compile", True, None, None),
        ("all+compile, kernel norms", True, "kernel", "kernel"),
    ]


def test_slipstream_settings_apply_inside_the_block_and_are_restored():
    from benchmarks.common import slipstream_settings
    from slipstream import config

    before = config.compiled_layer_norm, config.eager_launch
    with slipstream_settings(compiled_layer_norm="inductor", eager_launch="triton"):
        assert (config.compiled_layer_norm, config.eager_launch) == ("inductor", "triton")
    assert (config.compiled_layer_norm, config.eager_launch) == before
    with slipstream_settings(compiled_layer_norm=None):
        assert config.compiled_layer_norm == before[0]
    with slipstream_settings(not_a_setting_yet="x"):
        assert config.not_a_setting_yet == "x"
    assert not hasattr(config, "not_a_setting_yet")


@pytest.mark.parametrize("low, high, status", [
    (1.29, 1.30, "met"), (1.00, 1.00, "met"), (0.81, 1.17, "inside the spread: no result"),
    (0.999, 1.0, "inside the spread: no result"), (0.63, 0.64, "missed"),
])
def test_a_target_is_met_or_missed_only_by_the_whole_spread(low, high, status):
    _load_benchmark()
    from benchmarks.end_to_end_report import target_status

    assert target_status(low, high, 1.0) == status


def test_profile_breakdown_sorts_kernels_by_kind():
    from types import SimpleNamespace

    import torch

    from benchmarks.end_to_end_profile import _breakdown, kernel_category

    assert kernel_category("_seeded_dropout_kernel", frozenset({"_seeded_dropout_kernel"})) == "slipstream"
    assert kernel_category("void at::native::vectorized_layer_norm_kernel<float>") == "norm (ATen)"
    assert kernel_category("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_TNT") == "matmul/conv"
    assert kernel_category("something_new") == "other"
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, name="_forward_rows_kernel", device_time_total=300.0),
              SimpleNamespace(device_type=cuda, name="ampere_bf16_gemm", device_time_total=900.0),
              SimpleNamespace(device_type=cpu, name="aten::mm", device_time_total=900.0)]  # an op, not a kernel
    table, busy = _breakdown(events * 2, steps=2, wall_ms=2.0)
    assert busy == pytest.approx(1.2)  # (300 + 900) us a step; the CPU op is not counted again
    assert "| slipstream | 0.30 | 1 |" in table and "| matmul/conv | 0.90 | 1 |" in table
    assert table.splitlines()[-1] == "| wall time of a step (profiled, synchronized) | 2.00 | |"


@pytest.mark.parametrize("build", ["build_gpt2", "build_bert"])
def test_transformer_models_name_their_loss(build, monkeypatch):
    # An unknown loss type makes transformers log a warning inside forward: a torch.compile graph
    # break, even when the logger's level hides the message.
    from transformers import modeling_utils

    from benchmarks import end_to_end_models

    warnings = []
    monkeypatch.setattr(modeling_utils.logger, "warning_once", lambda *args, **kwargs: warnings.append(args))
    model = getattr(end_to_end_models, build)(True)
    assert callable(model.loss_function)
    assert warnings == []


def test_kernel_dropout_configuration_compiles_with_the_kernel_dropout_path():
    benchmark = _load_benchmark()
    configs = benchmark._configs(["compile", "all+compile-kernel-dropout"], ["low_memory_dropout"])
    assert [(c.name, c.methods, c.compiled, c.compiled_dropout) for c in configs] == [
        ("compile", (), True, None),
        ("all+compile, kernel dropout", ("low_memory_dropout",), True, "kernel"),
    ]


def _config(name: str, median: float, low: float, high: float) -> dict:
    return {"name": name, "median_ms": median, "min_ms": low, "max_ms": high}


def test_plot_comparisons_pair_each_configuration_with_its_reference_and_the_later_file_wins():
    # gpt2's comparisons come from `new`, the later file; bert's only from `only_old`
    from benchmarks.end_to_end_plot import comparisons

    old = {"model": "gpt2", "configs": [_config("eager", 50.0, 50.0, 50.0), _config("all", 50.0, 50.0, 50.0),
                                        _config("compile", 25.0, 25.0, 25.0)]}
    new = {"model": "gpt2", "configs": [
        _config("eager", 45.0, 44.0, 46.0), _config("all", 54.0, 48.0, 60.0),
        _config("all+compile", 18.0, 17.0, 20.0), _config("compile", 20.0, 19.0, 22.0),
    ]}
    only_old = {"model": "bert", "configs": [_config("eager", 40.0, 40.0, 40.0), _config("compile", 20.0, 20.0, 20.0)]}
    unet = {"model": "unet", "configs": [_config("compile, CUDA graphs", 31.0, 30.0, 32.0),
                                         _config("all+compile, CUDA graphs", 30.0, 29.0, 31.0)]}
    bars = {(b.model, b.config, b.reference): b for b in comparisons([only_old, old, new, unet])}
    assert set(bars) == {("gpt2", "all", "eager"), ("gpt2", "compile", "eager"), ("gpt2", "all+compile", "compile"),
                         ("unet", "all+compile, CUDA graphs", "compile, CUDA graphs"), ("bert", "compile", "eager")}
    assert bars["gpt2", "compile", "eager"].ratio == pytest.approx(45 / 20)
    assert bars["bert", "compile", "eager"].ratio == pytest.approx(2.0)
    all_vs_eager = bars["gpt2", "all", "eager"]
    assert (all_vs_eager.ratio, all_vs_eager.low, all_vs_eager.high) == pytest.approx((45 / 54, 44 / 60, 46 / 48))
    assert all_vs_eager.target == 1.05
    assert bars["gpt2", "all+compile", "compile"].target is None
    assert bars["unet", "all+compile, CUDA graphs", "compile, CUDA graphs"].ratio == pytest.approx(31 / 30)


def test_plot_writes_a_png_from_result_files(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from benchmarks import end_to_end_plot

    results = {"models": [{"model": "bert", "configs": [_config("eager", 40.0, 39.0, 41.0),
                                                         _config("all", 36.0, 35.0, 38.0)]}]}
    source, png = tmp_path / "r.json", tmp_path / "r.png"
    source.write_text(json.dumps(results))
    end_to_end_plot.main(["--json", str(source), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_files_without_a_comparison(tmp_path):
    import json

    from benchmarks import end_to_end_plot

    source = tmp_path / "r.json"
    source.write_text(json.dumps({"models": [{"model": "bert", "configs": [_config("eager", 40.0, 39.0, 41.0)]}]}))
    with pytest.raises(SystemExit, match="no comparison"):
        end_to_end_plot.main(["--json", str(source), "--png", str(tmp_path / "r.png")])


def test_loss_curve_moving_median_and_spikes():
    from benchmarks.end_to_end_loss_curve import moving_median, spikes

    assert moving_median([4.0, 1.0, 3.0, 2.0, 9.0], 3) == [3.0, 2.0, 3.0]
    assert moving_median([5.0, 7.0], 2) == [5.0]  # the lower middle
    falling = [10.0, 9.0, 8.0, 7.5, 7.2, 7.0, 6.9, 6.9]
    assert spikes(falling, window=3) == []  # a falling curve is not a spike
    assert spikes(falling[:6] + [19.0, 18.5, 6.9, 6.9], window=3) == [7, 8]


def test_loss_curve_judge_ignores_a_spike_but_not_a_shifted_curve():
    from benchmarks.end_to_end_loss_curve import judge

    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)

    def curve(level: float) -> list:
        return (level + 0.01 * torch.randn(60, generator=g)).tolist()

    baseline = {0: curve(6.90), 1: curve(6.92), 2: curve(6.91)}
    spiked = curve(6.90)
    spiked[30:32] = [19.0, 18.0]  # a two-step spike, as GPT-2 has in some runs and not others
    verdict = judge(baseline, {0: spiked, 1: curve(6.92), 2: curve(6.91)}, window=10)
    assert verdict["passed"] and verdict["method_gaps"][0] < verdict["seed_gap"]
    assert verdict["seed_gap"] == pytest.approx(0.02, abs=0.008)  # the largest pair: seeds 0 and 1
    shifted = judge(baseline, {0: curve(6.90), 1: curve(6.92), 2: curve(6.96)}, window=10)
    assert not shifted["passed"] and shifted["method_gaps"][2] > shifted["seed_gap"]


def test_loss_curve_quick_run_reports_every_seed(tmp_path):
    import json

    benchmark = _load_benchmark()
    out, data = tmp_path / "curve.md", tmp_path / "curve.json"
    benchmark.main(["--quick", "--loss-curve", "--curve-steps", "8", "--curve-seeds", "2",
                    "--png", str(tmp_path / "c.png"), "--out", str(out), "--json", str(data)])
    result = json.loads(data.read_text())
    assert set(result["curves"]) == {
        "baseline, seed 0", "baseline, seed 1", "all methods, seed 0", "all methods, seed 1"}
    assert all(len(c) == 8 and all(math.isfinite(v) for v in c) for c in result["curves"].values())
    assert set(result["method_gaps"]) == {"0", "1"} and result["seed_gap"] > 0
    assert "seed noise" in out.read_text()


def test_loss_curve_needs_two_seeds():
    benchmark = _load_benchmark()
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--loss-curve", "--curve-seeds", "1"])
