"""CPU smoke run of benchmarks/training_agreement.py on a tiny GPT-2 (kernels under the interpreter)."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def test_every_run_trains_and_the_kernels_agree_with_fallbacks(tmp_path):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import training_agreement

    body = training_agreement.run("gpt2", steps=2, every=1, check_every=2, quick=True)
    curves, checks = body.split("Kernels against fallbacks")
    rows = [line.split("|")[1:-1] for line in curves.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    header = [h.strip() for h in curves.splitlines()[2].split("|")[1:-1]]
    assert header[1:] == [*training_agreement.RUNS, training_agreement.INTERLEAVED]
    losses = [float(v) for row in rows for v in row[1:]]
    # Tiny GPT-2 over a 256-token vocabulary: every run's loss is finite and near ln 256.
    assert all(1.0 < v < math.log(256) + 1 for v in losses)
    check = [line.split("|")[1:-1] for line in checks.splitlines() if line.startswith("| 0 ")][0]
    kernels, fallback = (float(v) for v in check[1].split("/"))
    assert abs(kernels - fallback) < 2e-3 * fallback
    # The whole gradient, and the parameter that differs most (a wrong dB of one norm shows only there).
    assert float(check[2]) < 5e-2 and float(check[4]) < 5e-2 and check[5].strip() == "0"
