"""The digits example (the README's main job) runs end to end and learns."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("sklearn")
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_digits.py")


def test_train_digits_example(tmp_path, capsys, pytorch_fallbacks):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        runs = example.run(["--epochs", "3", "--batch-size", "128", "--hidden", "32", "--device", "cpu",
                            "--results", str(tmp_path / "results.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == runs
    assert list(runs) == ["plain", "FusedLayerNorm", "FusedLayerNorm + LowMemoryDropout",
                          "FusedLayerNorm + GyroDropout"]
    assert all(run["accuracy"] > 0.5 for run in runs.values())
    assert runs["FusedLayerNorm + GyroDropout"]["changed"] == (
        "LayerNorm x2, Dropout x2 -> FusedLayerNorm x2, GyroDropout x2")
    assert runs["FusedLayerNorm + LowMemoryDropout"]["changed"] == (
        "LayerNorm x2, Dropout x2 -> FusedLayerNorm x2, SeededDropout x2")
    assert "test acc" in capsys.readouterr().out
