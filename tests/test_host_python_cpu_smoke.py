"""benchmarks/host_python_cpu.py runs (in a subprocess: it patches slipstream's modules) and times every op,
forward and forward + backward."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def test_times_every_eager_op_with_launches_stubbed():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # the launches go through CachedLauncher, which reads jitted kernels
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_python_cpu.py")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    times = dict(re.findall(r"^(\w+ forward(?:\+backward)?): ([\d.]+) us per call$", out, flags=re.M))
    assert set(times) == {f"{op} {passes}" for op in ("layer_norm", "dropout", "group_norm")
                          for passes in ("forward", "forward+backward")}
    assert all(0 < float(v) < 10_000 for v in times.values())
