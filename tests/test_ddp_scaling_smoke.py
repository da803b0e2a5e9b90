"""CPU smoke run of benchmarks/ddp_scaling.py: tiny GPT-2 through the Trainer under torchrun (gloo), 1 and 2
processes, methods off and on; plus the report's arithmetic and the launcher's environment."""

import json
import os
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts import benchmarks.* from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks import ddp_scaling  # noqa: E402
from benchmarks.torchrun_launcher import MULTICAST_OFF, job_environment  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp_scaling.md"
    results = ddp_scaling.main(["--tiny", "--device", "cpu", "--nprocs", "1,2", "--steps", "3", "--warmup", "1",
                                "--batch-per-gpu", "2", "--out", str(out)])
    return results, out


def test_every_job_ran_and_measured(smoke_run):
    results, _ = smoke_run
    assert [(r["world_size"], r["methods"]) for r in results] == [(1, "off"), (1, "on"), (2, "off"), (2, "on")]
    for result in results:
        assert result["timed_steps"] == 2 and len(result["step_ms"]) == 2  # 3 steps, the first untimed
        assert result["samples_per_s"] > 0 and result["step_ms_median"] > 0
        assert result["precision"] == "amp_bf16" and result["sample_shape"] == [32] and result["batch_per_gpu"] == 2
        assert result["peak_memory_bytes"] == [None] * result["world_size"]  # one entry per rank; CPU has none
        # Random 256-token vocabulary: the loss starts near ln 256 and stays finite.
        assert 1.0 < result["final_loss"] < math.log(256) + 1
        assert result["multicast_env"] == MULTICAST_OFF  # the jobs ran with NVLink multicast off


def test_methods_replace_the_norms_and_dropouts(smoke_run):
    results, _ = smoke_run
    for result in results:
        if result["methods"] == "on":
            # Tiny GPT-2: 2 blocks x (ln_1, ln_2) + ln_f; 2 x (attn, resid, mlp) dropouts + the embedding's.
            assert result["modules_replaced"] == {"LowPrecisionLayerNorm": 5, "LowMemoryDropout": 7}
            assert result["algorithms"] == ["LowPrecisionLayerNorm()", "LowMemoryDropout(seed=None)"]
        else:
            assert result["modules_replaced"] == {} and result["algorithms"] == []


def test_report_files(smoke_run):
    results, out = smoke_run
    text = out.read_text()
    assert text.startswith("## Trainer: DDP scaling of gpt2 training")
    assert "| GPUs | methods | samples/s |" in text
    assert sum(line.startswith(("| 1 |", "| 2 |")) for line in text.splitlines()) == 4
    assert json.loads(out.with_suffix(".json").read_text()) == {"results": results, "failed": []}


def _row(n, methods, speed, peaks):
    return {"world_size": n, "methods": methods, "samples_per_s": speed, "items_per_sample": 512, "unit": "tok/s",
            "step_ms_median": 10.0, "peak_memory_bytes": peaks, "final_loss": 5.0, "sample_shape": [512],
            "modules_replaced": {"LowPrecisionLayerNorm": 25} if methods == "on" else {}}


def test_efficiency_speed_up_and_peak_memory_arithmetic():
    gib = 1024**3
    rows = [_row(1, "off", 100.0, [2 * gib]), _row(1, "on", 120.0, [gib]),
            _row(2, "off", 190.0, [2 * gib, 3 * gib]), _row(2, "on", 216.0, [gib, gib])]
    table = ddp_scaling.results_table(rows)
    column = {name: i for i, name in enumerate(table.columns)}
    by_row = {(r[0], r[1]): r for r in table.rows}
    assert by_row[("2", "on")][column["efficiency vs 1 GPU"]] == "0.9"  # 216 / (2 x 120)
    assert by_row[("2", "off")][column["efficiency vs 1 GPU"]] == "0.95"
    assert by_row[("1", "on")][column["methods speed-up"]] == "1.2"
    assert by_row[("2", "on")][column["methods speed-up"]] == "1.14"  # 216 / 190
    assert by_row[("2", "off")][column["peak GiB/GPU (max over ranks)"]] == "3"  # the largest rank's
    assert "90.0% at 2 GPUs, met" in ddp_scaling._target_line(rows)


def test_nprocs_parsing_and_gpu_limit():
    assert ddp_scaling.parse_nprocs("8,1,2,4,2") == [1, 2, 4, 8]
    for bad in ("0,1", "1,x", ""):
        with pytest.raises(ValueError, match="--nprocs"):
            ddp_scaling.parse_nprocs(bad)
    assert ddp_scaling.runnable_nprocs([1, 2, 4, 8], "cuda", gpus=2) == ([1, 2], [4, 8])
    assert ddp_scaling.runnable_nprocs([1, 2], "cpu", gpus=0) == ([1, 2], [])


def test_job_environment_forces_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    env = job_environment({"TORCH_SYMM_MEM_DISABLE_MULTICAST": "0"})
    assert {name: env[name] for name in MULTICAST_OFF} == MULTICAST_OFF
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_a_failed_job_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def fake_torchrun(script, argv, processes, timeout_s=None):
        methods = argv[argv.index("--methods") + 1]
        if (processes, methods) == (2, "on"):
            raise RuntimeError("torchrun failed:\n  ValueError: planted\n=====")
        return _row(processes, methods, 100.0 * processes, [None] * processes)

    monkeypatch.setattr(ddp_scaling, "run_torchrun", fake_torchrun)
    out = tmp_path / "ddp.md"
    with pytest.raises(SystemExit, match="1 of 4 jobs failed"):
        ddp_scaling.main(["--device", "cpu", "--nprocs", "1,2", "--out", str(out)])
    text = out.read_text()
    assert "Failed: N = 2, methods on: ValueError: planted" in text
    assert sum(line.startswith(("| 1 |", "| 2 |")) for line in text.splitlines()) == 3
    assert json.loads(out.with_suffix(".json").read_text())["failed"] == ["N = 2, methods on: ValueError: planted"]


def test_error_summary_names_the_cause():
    assert ddp_scaling.error_summary("Traceback:\n  File x\n  ValueError: bad\n=====\n") == "ValueError: bad"
    assert ddp_scaling.error_summary("  traceback : Signal 9 (SIGKILL) received by PID 7\n---") == \
        "Signal 9 (SIGKILL) received by PID 7"
    assert ddp_scaling.error_summary("Command 'x' timed out after 5 seconds") == "Command 'x' timed out after 5 seconds"
