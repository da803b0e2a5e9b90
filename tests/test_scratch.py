"""slipstream.ops.kernels.scratch: buffers reused per (device, stream), grown on demand, fresh while capturing;
barrier words come with a new generation each time."""

import pytest
import torch

pytest.importorskip("triton")

from slipstream.ops.kernels import scratch as scratch_module  # noqa: E402
from slipstream.ops.kernels.scratch import barrier_words, scratch  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_buffers(monkeypatch):
    monkeypatch.setattr(scratch_module, "_scratch", {})
    monkeypatch.setattr(scratch_module, "_barriers", {})
    monkeypatch.setattr(scratch_module, "_generations", {})


def test_scratch_is_reused_and_grows_geometrically():
    first = scratch(CPU, 100)
    assert first.dtype == torch.float32 and first.numel() == 100
    assert scratch(CPU, 37) is first
    grown = scratch(CPU, 101)
    assert grown is not first and grown.numel() == 200  # doubled: a slowly growing size reallocates rarely
    assert scratch(CPU, 1000).numel() == 1000


def test_barrier_words_start_zero_are_reused_and_come_with_a_new_generation_each_time():
    words, first = barrier_words(CPU, 9)
    assert words.dtype == torch.int32 and words.numel() == 9 and not words.any()
    again, second = barrier_words(CPU, 3)
    assert again is words and second == first + 1
    grown, third = barrier_words(CPU, 10)
    assert grown.numel() == 18 and not grown.any() and third == second + 1


def test_generations_that_run_out_start_over_on_fresh_zeros(monkeypatch):
    words, _ = barrier_words(CPU, 4)
    words.fill_(7)  # flags that hold generations
    monkeypatch.setattr(scratch_module, "_LAST_GENERATION", 2)  # the next one, 2, is past the last
    fresh, generation = barrier_words(CPU, 4)
    assert generation == 1 and fresh is not words and not fresh.any()


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
        captured_scratch, (captured_words, generation) = scratch(device, 64), barrier_words(device, 64)
    assert generation == 1  # the capture's own zeroed words
    assert captured_scratch is not scratch(device, 64) and captured_words is not barrier_words(device, 64)[0]
