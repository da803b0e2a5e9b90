"""slipstream.ops.kernels.scratch: buffers reused per (device, stream), grown on demand, fresh while capturing;
barrier words are two halves that swap on every call."""

import pytest
import torch

pytest.importorskip("triton")

from slipstream.ops.kernels import scratch as scratch_module  # noqa: E402
from slipstream.ops.kernels.scratch import barrier_words, discard_barrier_words, scratch  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_buffers(monkeypatch):
    monkeypatch.setattr(scratch_module, "_scratch", {})
    monkeypatch.setattr(scratch_module, "_barriers", {})


def test_scratch_is_reused_and_grows_geometrically():
    first = scratch(CPU, 100)
    assert first.dtype == torch.float32 and first.numel() == 100
    assert scratch(CPU, 37) is first
    grown = scratch(CPU, 101)
    assert grown is not first and grown.numel() == 200  # doubled: a slowly growing size reallocates rarely
    assert scratch(CPU, 1000).numel() == 1000


def test_barrier_words_are_two_zeroed_halves_that_swap_on_every_call():
    words, next_words = barrier_words(CPU, 9)
    assert words.dtype == torch.int32 and words.numel() == next_words.numel() == 9
    assert not words.any() and not next_words.any() and words.data_ptr() != next_words.data_ptr()
    again, after = barrier_words(CPU, 3)
    assert again is next_words and after is words  # what one launch cleared, the next counts in
    grown, grown_next = barrier_words(CPU, 10)
    assert grown.numel() == grown_next.numel() == 18 and not grown.any() and not grown_next.any()


def test_each_thread_has_its_own_buffers():
    """Barrier words must be used in the order they are handed out: one thread's order, not two threads'."""
    import threading

    mine = barrier_words(CPU, 4)[0], scratch(CPU, 4)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.extend((barrier_words(CPU, 4)[0], scratch(CPU, 4))))
    thread.start()
    thread.join()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(mine, theirs))


def test_discarded_barrier_words_are_replaced_by_fresh_zeros():
    words, next_words = barrier_words(CPU, 4)
    next_words.fill_(3)  # a launch that took its turn and never ran: the next words were not cleared
    discard_barrier_words(CPU)
    fresh, _ = barrier_words(CPU, 4)
    assert fresh is not next_words and not fresh.any()


def test_a_failed_fused_launch_gives_up_its_turn(monkeypatch):
    triton_kernels = pytest.importorskip("slipstream.ops.kernels.group_norm")
    x = torch.randn(2, 4, 3)
    plan = triton_kernels._plan(x, triton_kernels._ncs_strides(x), 2, 4, 0)
    words, next_words = barrier_words(CPU, 4)
    triton_kernels._lose_barrier_turn(x, plan._replace(strategy="fused"))
    assert barrier_words(CPU, 4)[0] is not next_words


def test_scratch_and_barrier_words_are_separate():
    assert scratch(CPU, 4).data_ptr() != barrier_words(CPU, 4)[0].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and graph capture need CUDA")
def test_each_stream_has_its_own_buffers_and_a_capture_gets_fresh_ones():
    device = torch.device("cuda", torch.cuda.current_device())
    on_default = scratch(device, 64)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = scratch(device, 64)
        assert on_side.data_ptr() != on_default.data_ptr() and scratch(device, 64) is on_side
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_scratch, (captured_words, captured_next) = scratch(device, 64), barrier_words(device, 64)
    eager_words = barrier_words(device, 64)
    assert captured_scratch is not scratch(device, 64)
    assert not {captured_words.data_ptr(), captured_next.data_ptr()} & {t.data_ptr() for t in eager_words}
