"""CUDA graphs: what replays correctly and what refuses to be captured.

``torch.compile(mode="reduce-overhead")`` replays the compiled step as CUDA graphs; SeededDropout's
seed is computed inside the graph, so each replay must draw the next mask of its stream. Eager capture
(``torch.cuda.graph``) keeps the launch arguments of the capture: the norms replay correctly, while the
dropouts, which draw on the host, refuse to be captured instead of repeating one mask.
All but the first test need a GPU; CI (CPU) skips them.
"""

import pytest
import torch
import torch.nn.functional as F

from slipstream import config
from slipstream.nn import FusedGroupNorm, FusedLayerNorm, GyroDropout, SeededDropout
from slipstream.nn._capture import refuse_eager_cuda_graph_capture
from slipstream.nn.seed_stream import stream_seed
from slipstream.ops.dropout import keep_threshold, seeded_dropout_reference
from slipstream.ops.hashed_dropout import hashed_keep_mask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CapturedInput:
    """Stands in for a CUDA tensor on a CPU-only machine: the guard reads ``is_cuda`` only."""

    is_cuda = True


def test_the_capture_guard_raises_only_while_the_stream_is_captured(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    refuse_eager_cuda_graph_capture("SeededDropout", CapturedInput())
    capturing[0] = True
    with pytest.raises(RuntimeError, match="SeededDropout cannot be captured into a CUDA graph in eager mode"):
        refuse_eager_cuda_graph_capture("SeededDropout", CapturedInput())
    refuse_eager_cuda_graph_capture("SeededDropout", torch.ones(2))  # a CPU tensor is never captured


def expected_keep(path: str, key: int, call: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask of call ``call`` of a SeededDropout keyed by ``key`` on the compiled ``path``."""
    seed = stream_seed(key, call)
    if path == "inductor":
        return hashed_keep_mask(torch.tensor(seed), keep_threshold(p), x.numel(), device=x.device)[0].view(x.shape)
    return seeded_dropout_reference(torch.ones_like(x), p, seed) != 0


@needs_cuda
@pytest.mark.parametrize("path", ["inductor", "kernel"])
def test_reduce_overhead_draws_the_next_mask_of_the_stream_every_replay(monkeypatch, path):
    monkeypatch.setattr(config, "compiled_dropout", path)
    torch._dynamo.reset()
    key, p = 977, 0.3
    drop = SeededDropout(p, seed=key).cuda()
    compiled = torch.compile(drop, mode="reduce-overhead")
    x = (torch.rand(48, 257, device="cuda") + 0.5).requires_grad_()  # no zeros: a zero reads as dropped
    masks = []
    for call in range(5):  # the first calls record the graphs, the later ones replay them
        torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x)
        y.backward(torch.ones_like(y))
        keep = expected_keep(path, key, call, x, p)
        assert torch.equal(y != 0, keep), f"forward mask of call {call}"
        assert torch.equal(x.grad != 0, keep), f"backward mask of call {call}"
        assert torch.allclose(y[keep], x.detach()[keep] / (1 - p))
        masks.append(keep)
        x.grad = None
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))
    assert drop.run_state()["calls"] == 5


@needs_cuda
@pytest.mark.parametrize("make", [lambda: SeededDropout(0.2, seed=5),
                                  lambda: GyroDropout(0.2, sigma=4, tau=2, iters_per_epoch=2, max_epoch=2, seed=5)])
def test_eager_capture_of_a_dropout_that_draws_on_the_host_is_an_error(make):
    drop = make().cuda()
    x = torch.randn(8, 16, device="cuda")
    drop(x)  # warm-up outside the capture (GyroDropout builds its masks)
    with pytest.raises(RuntimeError, match="cannot be captured into a CUDA graph in eager mode"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            drop(x)
    drop.eval()
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # evaluation draws nothing: capturing it is fine
        drop(x)


def _float64_grads(norm, x, dy):
    """Output and input/weight/bias gradients of ``norm``'s math in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    b64 = norm.bias.detach().double().requires_grad_()
    if isinstance(norm, FusedLayerNorm):
        y = F.layer_norm(x64, norm.normalized_shape, w64, b64, norm.eps)
    else:
        y = F.group_norm(x64, norm.num_groups, w64, b64, norm.eps)
    y.backward(dy.double())
    return y, x64.grad, w64.grad, b64.grad


@needs_cuda
@pytest.mark.parametrize("make, shape", [(lambda: FusedLayerNorm(300), (5, 7, 300)),
                                         (lambda: FusedGroupNorm(6, 30), (3, 30, 9, 7))])
def test_norms_replay_forward_and_backward_in_an_eager_cuda_graph(make, shape):
    """Capture one forward + backward, then replay it on new inputs copied into the captured ones."""
    torch.manual_seed(0)
    norm = make().cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    static_x = torch.randn(shape, device="cuda", requires_grad=True)
    static_dy = torch.randn(shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up launches (compiles and caches the kernels) before capture
        norm(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = norm.weight.grad = norm.bias.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = norm(static_x)
        static_y.backward(static_dy)
    for _ in range(2):
        x, dy = torch.randn(shape, device="cuda") * 2 + 0.3, torch.randn(shape, device="cuda")
        with torch.no_grad():
            static_x.copy_(x)
            static_dy.copy_(dy)
        graph.replay()
        got = (static_y, static_x.grad, norm.weight.grad, norm.bias.grad)
        for value, want in zip(got, _float64_grads(norm, x, dy)):
            error = (value.double() - want).norm() / want.norm()
            assert error < 1e-5, error
