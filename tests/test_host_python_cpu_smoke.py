"""benchmarks/host_python_cpu.py runs (in a subprocess: it patches slipstream's modules) and times every op."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def test_times_every_eager_forward_with_launches_stubbed():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_python_cpu.py")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    times = dict(re.findall(r"^(\w+ forward): ([\d.]+) us per call$", out, flags=re.M))
    assert set(times) == {"layer_norm forward", "dropout forward", "group_norm forward"}
    assert all(0 < float(v) < 10_000 for v in times.values())
