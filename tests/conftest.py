"""Shared test fixtures."""

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws its own random inputs, reproducibly per test name (crc32: Python's str hash
    changes between processes)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) % (2**31))
    yield


@pytest.fixture
def launched_kernels(monkeypatch):
    """The names of the Triton kernels the test launches, in order (under ``TRITON_INTERPRET=1``).

    Lets a test check that an op took its kernel path: the fallback gives the same values, so
    comparing outputs alone cannot tell them apart.
    """
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from slipstream.ops._backend import interpreting

    if not interpreting():
        pytest.skip("counts interpreted kernel launches: run with TRITON_INTERPRET=1")
    names: list[str] = []
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            names.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording)
    return names


@pytest.fixture
def pytorch_fallbacks():
    """Every slipstream op on its PyTorch fallback for the test (the kernels' own tests cover them)."""
    from slipstream.ops._backend import pytorch_fallback

    with pytorch_fallback():
        yield
