"""CachedLauncher: which launches reuse a kept compiled kernel, and what reaches its launcher.

The fast path needs CUDA, so these tests drive it with a stand-in kernel that records what Triton
would have been asked (the first launch per signature) and what the compiled kernel's launcher
receives (every later one). The GPU run of the real kernels is in ``benchmarks/host_overhead.py``
and in the correctness stages of the kernel benchmarks, which launch each kernel many times.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from slipstream.ops.kernels.cached_launch import CachedLauncher  # noqa: E402

STREAM = 1234


def _kernel_body(x_ptr, out_ptr, n, scale, flag, BLOCK, MODE=3):  # the stand-in kernel's parameters
    pass


class _Compiled:
    def __init__(self, log: list):
        self.function, self.packed_metadata, self.log = object(), (4, 1, 0), log

    def _init_handles(self) -> None:
        pass

    def run(self, *args) -> None:
        self.log.append(("run", args))


class _Kernel:
    """What CachedLauncher uses of a JITFunction: ``[grid](...)``, ``signature`` and ``arg_names``."""

    signature = inspect.signature(_kernel_body)
    arg_names = list(signature.parameters)
    constexprs = [5, 6]  # BLOCK, MODE

    def __init__(self):
        self.log: list = []
        self.compiled: list[_Compiled] = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            self.compiled.append(_Compiled(self.log))
            return self.compiled[-1]

        return launch


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = _Kernel()
    return kernel, CachedLauncher(kernel, stream_of=lambda device: STREAM)


def _args(n=100, x=None, flag=True):
    x = torch.randn(64) if x is None else x
    return x, torch.empty_like(x), n, 0.5, flag


def test_first_launch_goes_to_triton_later_ones_to_the_compiled_kernel(launcher):
    kernel, launch = launcher
    first = _args()
    launch[(3,)](*first, BLOCK=64, num_warps=4)
    assert kernel.log == [("triton", (3,), first, {"BLOCK": 64, "num_warps": 4})]
    second = _args()
    launch[(5, 2)](*second, BLOCK=64, num_warps=4)
    # every parameter in order: positional ones, then BLOCK from the keywords and MODE's default
    compiled = kernel.compiled[0]
    assert kernel.log[1] == ("run", (5, 2, 1, STREAM, compiled.function, compiled.packed_metadata,
                                     None, None, None, *second, 64, 3))
    assert launch.cached_signatures() == 1


@pytest.mark.parametrize(
    "change",
    [
        "misaligned tensor",
        "other dtype",
        "int equal to 1",
        "int not divisible by 16",
        "int past int32",
        "int past int64",
        "other constexpr",
        "other launch option",
        "bool for a float",
    ],
)
def test_each_specialization_change_gets_its_own_compiled_kernel(launcher, change):
    kernel, launch = launcher
    base = dict(args=_args(n=96), meta=dict(BLOCK=64, num_warps=4))
    launch[(1,)](*base["args"], **base["meta"])
    args, meta = list(_args(n=96)), dict(base["meta"])
    if change == "misaligned tensor":
        args[0] = torch.randn(65)[1:]
    elif change == "other dtype":
        args[0] = torch.randn(64, dtype=torch.float64)
    elif change == "int equal to 1":
        args[2] = 1
    elif change == "int not divisible by 16":
        args[2] = 97
    elif change == "int past int32":
        args[2] = 2**32
    elif change == "int past int64":
        args[2] = 2**63 + 16
    elif change == "other constexpr":
        meta["BLOCK"] = 128
    elif change == "other launch option":
        meta["num_warps"] = 8
    elif change == "bool for a float":
        args[3] = True
    launch[(1,)](*args, **meta)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]
    launch[(1,)](*args, **meta)  # now cached too
    assert kernel.log[-1][0] == "run"
    assert launch.cached_signatures() == 2


def test_same_signature_with_other_values_reuses_the_kernel(launcher):
    kernel, launch = launcher
    launch[(1,)](*_args(n=32), BLOCK=64)
    launch[(1,)](*_args(n=48, x=torch.randn(80)), BLOCK=64)  # 48 is also a multiple of 16
    assert [entry[0] for entry in kernel.log] == ["triton", "run"]


def test_unknown_argument_types_always_take_triton_path(launcher):
    kernel, launch = launcher
    args = list(_args())
    args[2] = torch.tensor(5).numpy()[()]  # a numpy integer: not a type the signature covers
    for _ in range(2):
        launch[(1,)](*args, BLOCK=64)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]
    assert launch.cached_signatures() == 0


def test_constexpr_passed_by_position_always_takes_triton_path(launcher):
    kernel, launch = launcher
    for block in (64, 128):  # same int flags: only the value tells the two kernels apart
        launch[(1,)](*_args(), block)
        launch[(1,)](*_args(), block)
    assert [entry[0] for entry in kernel.log] == ["triton"] * 4
    assert [entry[2][-1] for entry in kernel.log] == [64, 64, 128, 128]


def test_installed_launch_hook_takes_triton_path(launcher):
    kernel, launch = launcher
    launch[(1,)](*_args(), BLOCK=64)
    hook = lambda *a, **k: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch[(1,)](*_args(), BLOCK=64)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch[(1,)](*_args(), BLOCK=64)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton", "run"]


def test_real_jit_functions_have_what_the_launcher_reads():
    """The attributes CachedLauncher uses exist on Triton's JITFunction (not the interpreter's)."""

    def body(x_ptr, n, BLOCK: "tl.constexpr" = 16):  # noqa: F821
        pass

    jit = JITFunction(body)
    assert jit.arg_names == ["x_ptr", "n", "BLOCK"]
    assert jit.constexprs == [2]
    assert jit.signature.parameters["BLOCK"].default == 16
    assert hasattr(knobs.runtime.launch_enter_hook, "calls") and hasattr(knobs.runtime.launch_exit_hook, "calls")


def test_eager_launch_setting(monkeypatch):
    from slipstream import config
    from slipstream.ops import _triton_op

    monkeypatch.setattr(_triton_op, "interpreting", lambda: False)  # as on a CUDA machine
    kernel = _Kernel()
    monkeypatch.setattr(config, "eager_launch", "triton")
    assert _triton_op.launcher(False)(kernel) is kernel
    monkeypatch.setattr(config, "eager_launch", "cached")
    assert isinstance(_triton_op.launcher(False)(kernel), CachedLauncher)
    monkeypatch.setattr(config, "eager_launch", "fast")
    with pytest.raises(ValueError, match="eager_launch must be 'cached' or 'triton'"):
        _triton_op.launcher(False)


def test_keyed_launches_read_only_the_tensors_after_the_first(launcher):
    kernel, launch = launcher
    meta = dict(BLOCK=64, num_warps=4)
    launch.launch_keyed((2,), "config-a", _args(n=96), meta)
    second = _args(n=96)
    launch.launch_keyed((3,), "config-a", second, meta)
    compiled = kernel.compiled[0]
    assert [entry[0] for entry in kernel.log] == ["triton", "run"]
    assert kernel.log[1] == ("run", (3, 1, 1, STREAM, compiled.function, compiled.packed_metadata,
                                     None, None, None, *second, 64, 3))
    # a tensor of another alignment or dtype under the same key: Triton chooses again
    launch.launch_keyed((2,), "config-a", _args(n=96, x=torch.randn(65)[1:]), meta)
    launch.launch_keyed((2,), "config-a", _args(n=96, x=torch.randn(64, dtype=torch.float64)), meta)
    assert [entry[0] for entry in kernel.log] == ["triton", "run", "triton", "triton"]


def test_keyed_and_plain_launches_share_compiled_kernels(launcher):
    kernel, launch = launcher
    launch[(1,)](*_args(n=96), BLOCK=64)
    launch.launch_keyed((1,), ("config-b", 96), _args(n=96), dict(BLOCK=64))  # same signature: no compile
    launch.launch_keyed((1,), ("config-b", 96), _args(n=96), dict(BLOCK=64))
    assert [entry[0] for entry in kernel.log] == ["triton", "run", "run"]
    assert launch.cached_signatures() == 1


def test_keyed_launch_with_a_hook_takes_triton_path(launcher):
    kernel, launch = launcher
    launch.launch_keyed((1,), "config-c", _args(), dict(BLOCK=64))
    hook = lambda *a, **k: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch.launch_keyed((1,), "config-c", _args(), dict(BLOCK=64))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch.launch_keyed((1,), "config-c", _args(), dict(BLOCK=64))
    assert [entry[0] for entry in kernel.log] == ["triton", "triton", "run"]
