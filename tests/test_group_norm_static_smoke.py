"""benchmarks/group_norm_static.py compiles the GroupNorm launches of a case for sm_90 on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the script imports benchmarks.* from the repository root
    sys.path.insert(0, str(REPO))
from benchmarks import group_norm_static as static  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def test_records_the_launches_a_gpu_would_get():
    x = torch.empty(2, 64, 64, 64, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    launches = static.record_launches(x, 8)
    assert [launch.kernel.__name__ for launch in launches] == ["_forward_kernel", "_backward_kernel"]
    assert all(launch.meta["CL"] and launch.meta["WAIT"] for launch in launches)  # fused, as on an H200


@pytest.mark.skipif(not all(os.path.exists(os.path.join(TOOLS, t)) for t in ("nvdisasm", "cuobjdump")),
                    reason="this Triton build ships no nvdisasm/cuobjdump")
def test_compiles_each_launch_for_sm90_and_counts_what_it_needs():
    # A process of its own: the kernels must be imported without Triton's interpreter to compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "group_norm_static.py"), "--cases",
                          "2x24x5x7:3:contiguous:fp32,2x24x5x7:3:channels_last:bf16"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    cell = r" \| (\d+)"
    rows = re.findall(r"^\| 2x24x5x7 \| 3 \| (\w+) \| (\w+) \| (.+?)" + 4 * cell + r" \| ([\d.]+) \|$", out, flags=re.M)
    assert len(rows) == 4  # forward and backward of each case (odd sizes: masked tiles, one program a set)
    for layout, dtype, launch, warps, registers, spill, instructions, per_element in rows:
        assert 16 <= int(registers) <= 255 and int(spill) >= 0
        assert int(instructions) > 100 and float(per_element) > 0
