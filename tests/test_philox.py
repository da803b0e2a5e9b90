"""The PyTorch Philox stream equals Triton's tl.philox bit for bit (under the interpreter)."""

import os

import pytest
import torch

from slipstream.ops.philox import MASK32, philox, split_u64

requires_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 to run Triton on CPU"
)


def test_known_answer():
    # Philox-4x32-10 known-answer vector (Random123 kat_vectors: counter all ones, key all ones).
    ones = torch.tensor([MASK32])
    out = philox(-1, ones, ones, ones, ones)  # seed -1: both key words 0xFFFFFFFF
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_split_u64():
    lo, hi = split_u64(torch.tensor([2**40 + 7]))
    assert int(lo) == 7 and int(hi) == 2**8


@requires_interpreter
@pytest.mark.parametrize("seed", [0, 987654321, 2**45 + 3])
def test_matches_triton(seed):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out, seed, base, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        g = base + i.to(tl.int64)
        lo = (g & 0xFFFFFFFF).to(tl.uint32)
        hi = (g >> 32).to(tl.uint32)
        zero = lo * 0
        r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
        for k, r in enumerate((r0, r1, r2, r3)):
            tl.store(out + i * 4 + k, r.to(tl.int64) & 0xFFFFFFFF)

    base = 2**33 + 11
    out = torch.empty(32 * 4, dtype=torch.int64)
    kernel[(1,)](out, seed, base, BLOCK=32)
    lo, hi = split_u64(torch.arange(32) + base)
    assert torch.equal(out, torch.stack(philox(seed, lo, hi), dim=1).reshape(-1))
