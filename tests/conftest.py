"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws its own random inputs, reproducibly per test name."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
