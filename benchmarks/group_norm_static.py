"""Static cost of the GroupNorm kernels, on any machine: registers, spills and SASS instructions.

Device time is scarce, and some questions about a kernel variant need no GPU: how many registers
a thread needs (which bounds how many programs an SM holds), whether it spills, and how many
instructions it issues per element. For each case the launchers of
:mod:`slipstream.ops.kernels.group_norm` run on CPU tensors with every launch recorded instead of
made (the arguments, constexprs and warps the GPU would get; the fused strategy as on a 132-SM
H200), and each recorded launch is compiled by Triton for sm_90 with the ``nvdisasm`` and
``cuobjdump`` that Triton ships. These are static counts: they show what a change does to the
code, not how fast it runs (the SASS of a loop counts once; the GroupNorm kernels have none in
their per-element work).

Run (repo root, no GPU needed)::

    PYTHONPATH=. python benchmarks/group_norm_static.py
    PYTHONPATH=. python benchmarks/group_norm_static.py --cases 16x256x64x64:32:channels_last:bf16 \\
        --settings MIN_RUN_BYTES=256
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from benchmarks import group_norm as bench
from benchmarks.common import Table

# Streaming multiprocessors of the H200 (the fused barrier's set limit).
SMS = 132
_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


@dataclass
class StaticCost:
    """What the compiled code of one launch needs."""

    registers: int
    spill_bytes: int  # per thread: local memory the compiler spilled to
    instructions: int  # SASS instructions of the whole kernel
    elements_per_thread: Optional[float]  # of the tile a thread holds; None where there is no tile


def record_launches(x: torch.Tensor, num_groups: int) -> list[Launch]:
    """The launches a forward and a backward of ``x`` (on CPU) would make on an H200, recorded."""
    from slipstream.ops.kernels import group_norm as kernels

    launches: list[Launch] = []

    def recorder(traceable: bool):
        def wrap(kernel):
            class _Grid:
                def __getitem__(self, grid):
                    return lambda *args, **meta: launches.append(Launch(kernel, grid, args, meta))

            return _Grid()

        return wrap

    def record_keyed(kernel, grid, key, args, meta):
        recorder(False)(kernel)[grid](*args, **meta)

    saved = kernels.launcher, kernels.launch_keyed, kernels.interpreting, kernels._max_fused_set
    kernels.launcher, kernels.launch_keyed = recorder, record_keyed
    kernels.interpreting, kernels._max_fused_set = lambda: False, lambda index: SMS
    try:
        w = torch.ones(x.shape[1], dtype=x.dtype)
        b = torch.zeros(x.shape[1], dtype=x.dtype)
        y, mean, rstd = kernels.forward(x, w, b, num_groups, bench.EPS, False, x.dtype)
        kernels.backward(torch.empty_like(x), x, w, b, mean, rstd, num_groups, False)
    finally:
        kernels.launcher, kernels.launch_keyed, kernels.interpreting, kernels._max_fused_set = saved
    return launches


def _specialization(kernel: Any, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attributes) for a launch, as its launch path would make them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        value = args[i] if i < len(args) else meta.get(name, param.default)
        specialized = not param.do_not_specialize
        if param.is_constexpr or value is None or (specialized and type(value) is int and value == 1):
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif type(value) is bool:
            signature[name], aligned = "i1", False
        elif type(value) is int:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = specialized and value % 16 == 0
        elif type(value) is float:
            signature[name], aligned = "fp32", False
        else:
            raise TypeError(f"argument {name} of {kernel.__name__}: {type(value).__name__} is not covered")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: this Triton build does not ship {name}")
    return path


def static_cost(launch: Launch) -> StaticCost:
    """Compile ``launch`` for sm_90 and read its registers, spills and SASS instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(launch.kernel, "params"):
        raise RuntimeError("kernels imported under TRITON_INTERPRET=1 cannot be compiled: run without it")
    meta = dict(launch.meta)
    num_warps = meta.pop("num_warps", 4)
    signature, constexprs, attrs = _specialization(launch.kernel, launch.args, meta)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, flags=re.M))
    tile = None
    if {"GB", "CB", "SB", "CW", "CL"} <= meta.keys():
        tile = meta["SB"] * meta["CW"] if meta["CL"] else meta["GB"] * meta["CB"] * meta["SB"]
    return StaticCost(registers, spill, instructions, tile / (32 * num_warps) if tile else None)


def _pass_name(launch: Launch) -> str:
    flags = [flag for flag in ("STATS", "APPLY", "WAIT", "COMBINE") if launch.meta.get(flag)]
    return f"{launch.kernel.__name__.strip('_')} {'+'.join(flags)}".strip()


def static_table(cases: Sequence[tuple[tuple[int, ...], int, str, str]]) -> Table:
    """One row per launch of each case's forward and backward."""
    table = Table(["shape", "G", "layout", "dtype", "launch", "warps", "registers", "spill B", "SASS",
                   "SASS / element"])
    for shape, num_groups, layout, dtype in cases:
        x = torch.empty(shape, dtype=bench.DTYPES[dtype]).to(memory_format=bench.LAYOUTS[layout])
        for launch in record_launches(x, num_groups):
            cost = static_cost(launch)
            per_element = f"{cost.instructions / cost.elements_per_thread:.1f}" if cost.elements_per_thread else "-"
            table.add("x".join(map(str, shape)), num_groups, layout, dtype, _pass_name(launch),
                      launch.meta.get("num_warps", 4), cost.registers, cost.spill_bytes, cost.instructions,
                      per_element)
            print(table.rows[-1], flush=True)
    return table


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=lambda text: [bench.parse_case(t) for t in text.split(",")], default=None,
                        help="comma list of SHAPE:G:LAYOUT:DTYPE (default: the benchmark's shapes, both layouts, bf16)")
    parser.add_argument("--settings", default="", help="comma list of NAME=INT kernel settings, as in group_norm.py")
    args = parser.parse_args(argv)
    bench.apply_settings(args.settings)
    cases = args.cases or [(shape, groups, layout, "bf16")
                           for shape, groups in bench.SHAPES for layout in bench.LAYOUTS]
    print(static_table(cases).markdown())


if __name__ == "__main__":
    main()
