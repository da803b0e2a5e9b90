"""The compiled path of LayerNorm and seeded dropout: triton_op bodies traced into kernel launches.

No GPU here, so the CUDA bodies are traced on fake CUDA tensors (with a symbolic row count, as
automatic dynamic shapes give), under functionalization as AOTAutograd traces them. That needs
Triton's JIT kernels, not the interpreter's, so it runs in a subprocess without TRITON_INTERPRET.
What runs on the GPU (Inductor's launches and their numerics) is checked by
benchmarks/compile_overhead.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from slipstream.ops._backend import interpreting, triton_available, use_triton
from slipstream.ops._triton_op import body_uses_triton, launcher
from slipstream.ops.dropout import seeded_dropout
from slipstream.ops.layer_norm import layer_norm


def trace_on_fake_cuda() -> dict:
    """Trace the four ops on fake CUDA tensors; the graph's op names and launched kernels."""
    import logging

    from torch._dynamo.source import ConstantSource
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    import slipstream.ops  # noqa: F401  (registers the ops)
    import slipstream.ops.kernels.layer_norm as kernels

    # No CUDA driver: Inductor's mutation analysis cannot compile the kernels and says so at length.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    kernels._multiprocessors = lambda device: 132  # the H100's count; no device to ask

    def step(x, w, b, seeds, seed):
        y, stats = torch.ops.slipstream.layer_norm_fwd(x, w, b, 1, 1e-5, None)
        y = torch.ops.slipstream.seeded_dropout_rows(torch.ops.slipstream.seeded_dropout(y, 0.1, seed), 0.2, seeds)
        return y, torch.ops.slipstream.layer_norm_bwd(y, x, w, stats, 1, torch.float32)

    mode = FakeTensorMode(shape_env=ShapeEnv())
    rows = mode.from_tensor(
        torch.empty(10, 1), source=ConstantSource("rows"),
        symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]),
    ).shape[0]
    with mode:
        args = (
            torch.empty(rows, 768, dtype=torch.bfloat16, device="cuda"),
            torch.empty(768, device="cuda"),
            torch.empty(768, device="cuda"),
            torch.empty(rows, dtype=torch.int64, device="cuda"),
            torch.empty((), dtype=torch.int64),
        )
    graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(*args).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    launched = [
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        for node in graph.nodes
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)
    ]
    return {"targets": targets, "kernels": launched}


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_compiled_path_traces_into_kernel_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    traced = json.loads(run.stdout.strip().splitlines()[-1])
    assert not any("slipstream" in target for target in traced["targets"])  # no opaque op left
    assert traced["kernels"] == [
        "_forward_rows_kernel",
        "_seeded_dropout_kernel",
        "_seeded_dropout_kernel",
        "_backward_rows_kernel",
    ]


def test_body_backend_choice_on_cpu():
    x = torch.randn(3, 5)
    assert body_uses_triton(x) == use_triton(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        # Interpreted kernels cannot be traced: fake CPU tensors always take the fallback.
        assert not body_uses_triton(fake)
    if interpreting():  # interpreted kernels launch as they are; compiled ones through a cached launcher
        assert launcher(False)(len) is len


@pytest.mark.parametrize("layer_norm_path", ["inductor", "kernel"])
def test_compiled_cpu_code_matches_eager(monkeypatch, layer_norm_path):
    """Compiled CPU code (LayerNorm as PyTorch math, or the traced op bodies) gives eager's values."""
    monkeypatch.setattr("slipstream.config.compiled_layer_norm", layer_norm_path)
    monkeypatch.setattr("slipstream.config.compiled_dropout", "kernel")  # the path whose masks are eager's
    x = (torch.randn(5, 3, 33) * 2 + 1).requires_grad_()
    w, b = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)

    def block(x, w, b):
        return seeded_dropout(layer_norm(x, 33, w, b), 0.25, 7).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x, w, b), block(x, w, b)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), dy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), dy)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-5) for g, r in zip(grads, ref_grads))


def test_unknown_compiled_layer_norm_path_is_an_error(monkeypatch):
    monkeypatch.setattr("slipstream.config.compiled_layer_norm", "fast")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer_norm(x, 8), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="compiled_layer_norm must be 'inductor' or 'kernel', got 'fast'"):
        compiled(torch.randn(2, 8))


if __name__ == "__main__":
    print(json.dumps(trace_on_fake_cuda()))
