"""SeededDropout: nn.Dropout drop-in, seed stream as run state, checkpoint replay, torch.compile,
apply_low_memory_dropout and the LowMemoryDropout algorithm."""

import copy
import pickle
import shutil
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import slipstream.functional as sf
from slipstream.algorithms import Event, LowMemoryDropout, State
from slipstream.nn import SeededDropout, load_run_state, save_run_state
from slipstream.nn.seed_stream import SeedStream, stream_seed, stream_seed_of_state
from slipstream.surgery import NoEffectWarning


def is_dropout_of(out, x, p):
    """Every element is 0 or x / (1 - p)."""
    return bool(((out == 0) | torch.isclose(out, x / (1 - p))).all())


# ----- the module -----------------------------------------------------------------------------------


def test_training_forward_is_dropout_and_backward_uses_the_same_mask():
    drop = SeededDropout(0.3, seed=1)
    x = (torch.randn(20, 33) + 4).requires_grad_()
    out = drop(x)
    assert is_dropout_of(out, x, 0.3)
    assert 0.6 < (out != 0).float().mean() < 0.8
    dy = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dy)
    assert torch.allclose(dx, (out != 0) * dy / 0.7)


def test_eval_and_p_zero_are_the_identity_and_p_one_is_zeros():
    x = torch.randn(5, 7)
    assert SeededDropout(0.5).eval()(x) is x
    assert SeededDropout(0.0)(x) is x
    assert torch.equal(SeededDropout(1.0)(x), torch.zeros_like(x))


@pytest.mark.parametrize("p,error", [(-0.01, ValueError), (1.01, ValueError), ("0.1", TypeError), (None, TypeError)])
def test_bad_p(p, error):
    with pytest.raises(error, match="p"):
        SeededDropout(p)


@pytest.mark.parametrize("seed,error", [(1.0, TypeError), ("1", TypeError), (2**63, ValueError)])
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        SeededDropout(0.5, seed=seed)


def test_fresh_seed_per_call_and_reproducible_from_seed_or_manual_seed():
    x = torch.randn(16, 40)
    drop = SeededDropout(0.5, seed=7)
    first, second = drop(x), drop(x)
    assert not torch.equal(first != 0, second != 0)
    again = SeededDropout(0.5, seed=7)
    assert torch.equal(again(x), first) and torch.equal(again(x), second)
    torch.manual_seed(3)
    a = SeededDropout(0.5)(x)
    torch.manual_seed(3)
    assert torch.equal(SeededDropout(0.5)(x), a)


def test_run_state_resumes_the_stream():
    x = torch.randn(8, 30)
    model = nn.Sequential(nn.Linear(30, 30), SeededDropout(0.4, seed=11))
    model(x)
    saved = copy.deepcopy((model.state_dict(), save_run_state(model)))
    expected = [model(x) for _ in range(2)]
    resumed = nn.Sequential(nn.Linear(30, 30), SeededDropout(0.4, seed=999))
    resumed.load_state_dict(saved[0])
    load_run_state(resumed, saved[1])
    assert all(torch.equal(resumed(x), e) for e in expected)
    assert saved[1] == {"1": {"key": 11, "calls": 1}}


def test_checkpoints_load_strictly_both_ways():
    before = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.2))
    after = copy.deepcopy(before)
    sf.apply_low_memory_dropout(after, seed=0)
    assert list(after.state_dict()) == list(before.state_dict())
    after.load_state_dict(before.state_dict())
    before.load_state_dict(after.state_dict())


def test_load_run_state_checks_its_input():
    model = nn.Sequential(nn.Linear(6, 6), SeededDropout(0.2, seed=1))
    with pytest.raises(ValueError, match="'key' and 'calls'"):
        load_run_state(model, {"1": {"seed": 1}})
    with pytest.raises(ValueError, match="calls"):
        load_run_state(model, {"1": {"key": 1, "calls": -1}})
    with pytest.raises(ValueError, match=r"missing modules \['1'\], unexpected modules \['2'\]"):
        load_run_state(model, {"2": {"key": 1, "calls": 0}})
    with pytest.raises(TypeError, match="state"):
        load_run_state(model, [1])
    with pytest.raises(TypeError, match="model"):
        save_run_state("model")
    load_run_state(model, {"2": {"key": 1, "calls": 0}}, strict=False)  # nothing fits: nothing changes
    assert save_run_state(model) == {"1": {"key": 1, "calls": 0}}


def test_from_module_copies_p_inplace_and_mode():
    original = nn.Dropout(0.25, inplace=True).eval()
    new = SeededDropout.from_module(original, seed=5)
    assert (new.p, new.inplace, new.training) == (0.25, True, False)
    with pytest.raises(TypeError, match="nn.Dropout"):
        SeededDropout.from_module(nn.Linear(2, 2))


def test_stream_seed_of_state_equals_stream_seed():
    """The tensor version (what torch.compile traces) gives the Python version's seeds, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(-(2**63), 2**63 - 1, (200,), generator=generator).tolist() + [0, -1, 2**63 - 1, -(2**63)]
    indices = torch.randint(0, 2**63 - 2, (len(keys),), generator=generator).tolist()
    indices[:50] = range(50)
    for key, index in zip(keys, indices):
        assert int(stream_seed_of_state(torch.tensor([key, index]))) == stream_seed(key, index)


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler")
def test_stream_seed_of_state_compiled_by_inductor():
    """Inductor's C++ code computes the same seeds (the arithmetic never overflows int64)."""
    torch._dynamo.reset()
    compiled = torch.compile(stream_seed_of_state, backend="inductor", dynamic=False)
    for key, index in [(-5, 0), (2**62 + 12345, 2**40), (-(2**63), 2**63 - 2), (7, 123456789)]:
        assert int(compiled(torch.tensor([key, index]))) == stream_seed(key, index)


def test_stream_seeds_differ_between_nearby_keys_and_indices():
    seeds = {stream_seed(key, index) for key in range(8) for index in range(64)}
    assert len(seeds) == 8 * 64 and all(0 <= s < 2**63 for s in seeds)


# ----- checkpointing --------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, calls: int) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 12)
        self.out = nn.Linear(12, 12)
        self.drop = SeededDropout(0.5)
        self.calls = calls

    def forward(self, x):
        h = torch.tanh(self.linear(x))
        for _ in range(self.calls):
            h = self.drop(h) * 1.5
        return self.out(h)


def snapshot(model):
    """Weights and seed-stream positions, to rewind a model to."""
    return copy.deepcopy((model.state_dict(), save_run_state(model)))


def restore(model, state):
    model.load_state_dict(state[0])
    load_run_state(model, state[1])


def grads(model, state, x, run):
    restore(model, state)
    model.zero_grad()
    run(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def checkpointed(model, reentrant):
    def run(x):
        for block in model:
            x = checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=False)
        return x
    return run


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("calls", [1, 3])
def test_checkpoint_recomputes_the_same_masks(reentrant, calls):
    model = nn.Sequential(Block(calls), Block(calls))
    state = snapshot(model)
    x = torch.randn(5, 12, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no replay warning either
        for _ in range(2):  # the second step starts a new phase of the stream
            plain = grads(model, state, x, model)
            ck = grads(model, state, x, checkpointed(model, reentrant))
            assert all(torch.allclose(a, b) for a, b in zip(plain, ck))
            model(x).sum().backward()  # a step without checkpointing in between


def test_checkpoint_after_no_grad_forward_and_with_retain_graph():
    model = nn.Sequential(Block(2))
    state = snapshot(model)
    x = torch.randn(4, 12, requires_grad=True)
    plain = grads(model, state, x, model)
    restore(model, state)
    model.zero_grad()
    loss = checkpointed(model, False)(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward recomputes again: twice the same gradient
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(model.parameters(), plain))


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_no_grad_training_forward_does_not_shift_the_checkpoint_replay(when):
    """A metrics pass in training mode, in the same phase as a checkpointed forward, draws seeds no backward
    recomputes."""
    model = nn.Sequential(Block(2))
    state = snapshot(model)
    x, stray = torch.randn(4, 12, requires_grad=True), torch.randn(4, 12)

    def metrics_pass():
        with torch.no_grad():
            model(stray)

    if when == "before":  # the plain step's masks come after the stray draws too
        restore(model, state)
        metrics_pass()
        plain = grads(model, snapshot(model), x, model)
    else:
        plain = grads(model, state, x, model)
    restore(model, state)
    model.zero_grad()
    if when == "before":
        metrics_pass()
    loss = checkpointed(model, False)(x).square().sum()
    if when == "after":
        metrics_pass()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.backward()
    assert all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), plain))


def test_a_call_with_gradients_beside_a_reentrant_region_does_not_shift_its_replay():
    """One module inside a reentrant region (drawn without gradients) and after it (with them), in one step."""
    drop, linear = SeededDropout(0.3, seed=1), nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    weights = torch.randn(8, 16)  # a loss whose gradient depends on both masks

    def step(checkpointed):
        drop.load_run_state({"key": 1, "calls": 0})
        linear.zero_grad()
        block = lambda h: drop(linear(h))  # noqa: E731
        h = checkpoint(block, x, use_reentrant=True, preserve_rng_state=False) if checkpointed else block(x)
        out = drop(h)
        (out * weights).sum().backward()
        return out.detach(), linear.weight.grad.clone()

    (plain_out, plain_grad), (ck_out, ck_grad) = step(False), step(True)
    assert torch.equal(plain_out, ck_out) and torch.allclose(plain_grad, ck_grad)


def test_a_phase_keeps_a_bounded_number_of_runs():
    """A module no backward reaches, called alternately with and without gradients, keeps bounded state."""
    from slipstream.nn.seed_stream import MAX_PHASE_RUNS

    stream = SeedStream(key=0)
    for _ in range(MAX_PHASE_RUNS + 10):
        stream.next()
        with torch.no_grad():
            stream.next()
    assert all(len(runs) == MAX_PHASE_RUNS for runs in stream._phase_draws.values())
    assert stream.state_dict()["calls"] == 2 * (MAX_PHASE_RUNS + 10)


def test_a_model_copies_and_pickles_after_a_checkpointed_backward():
    model = nn.Sequential(Block(1))
    x = torch.randn(3, 12, requires_grad=True)
    checkpointed(model, False)(x).sum().backward()
    clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    assert all(save_run_state(clone) == save_run_state(model) for clone in clones)
    expected = model(x)
    assert all(torch.equal(clone(x), expected) for clone in clones)  # the same next seed, so the same mask


def test_checkpoint_of_a_module_shared_by_two_regions_warns():
    block = Block(1)
    x = torch.randn(3, 12, requires_grad=True)
    h = checkpoint(block, x, use_reentrant=False)
    h = checkpoint(block, h, use_reentrant=False)
    with pytest.warns(RuntimeWarning, match="more than one checkpointed region"):
        h.sum().backward()


def test_seed_stream_state_and_replay_bounds():
    stream = SeedStream(key=3)
    assert [int(stream.next()) for _ in range(3)] == [stream_seed(3, i) for i in range(3)]
    assert stream.state_dict() == {"key": 3, "calls": 3}
    with pytest.raises(TypeError, match="key"):
        SeedStream(key=1.5)


# ----- torch.compile --------------------------------------------------------------------------------


# Inductor too: the default backend users get, which must compile the dropout path in seconds on CPU
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks_or_recompiles_and_matches_eager(monkeypatch, backend):
    monkeypatch.setattr("slipstream.config.compiled_dropout", "kernel")  # the path whose masks are eager's
    model = nn.Sequential(nn.Linear(10, 10), SeededDropout(0.3, seed=5), nn.Linear(10, 10), SeededDropout(0.3, seed=6))
    x = torch.randn(6, 10, requires_grad=True)
    state = snapshot(model)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    restore(model, state)
    eager = [model(x) for _ in range(3)]
    dy = torch.randn_like(eager[0])
    (ref,) = torch.autograd.grad(eager[0], x, dy)
    restore(model, state)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [compiled(x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(outs, eager))
    assert model[1].run_state() == {"key": 5, "calls": 3}
    (dx,) = torch.autograd.grad(outs[0], x, dy)
    assert torch.allclose(dx, ref)


@pytest.mark.parametrize("skip_side_effects", [False, True])
def test_compiled_checkpoint_recomputes_the_same_masks(monkeypatch, skip_side_effects):
    monkeypatch.setattr("slipstream.config.compiled_dropout", "kernel")  # the path whose masks are eager's
    model = nn.Sequential(Block(1), Block(2))
    state = snapshot(model)
    x = torch.randn(5, 12, requires_grad=True)
    plain = grads(model, state, x, model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=skip_side_effects):
        got = grads(model, state, x, torch.compile(checkpointed(model, False), backend="aot_eager"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, got))


# ----- surgery and algorithm ------------------------------------------------------------------------


def test_apply_low_memory_dropout_replaces_dropouts_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout2d(0.2), nn.Sequential(nn.Dropout(0.3)))
    model[3].eval()
    replaced = sf.apply_low_memory_dropout(model, seed=10)
    assert len(replaced) == 2
    assert isinstance(model[1], SeededDropout) and isinstance(model[3][0], SeededDropout)
    assert isinstance(model[2], nn.Dropout2d)
    assert (model[1].p, model[3][0].p, model[3][0].training) == (0.1, 0.3, False)
    assert [m.run_state()["key"] for m in (model[1], model[3][0])] == [10, 11]


def test_apply_low_memory_dropout_warns_when_nothing_to_replace_and_checks_seed():
    with pytest.warns(NoEffectWarning):
        assert sf.apply_low_memory_dropout(nn.Linear(3, 3)) == {}
    with pytest.raises(TypeError, match="seed"):
        sf.apply_low_memory_dropout(nn.Dropout(), seed="0")


def test_algorithm_swaps_dropout_at_init():
    state = State(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)))
    algorithm = LowMemoryDropout(seed=1)
    assert algorithm.match(Event.INIT, state) and not algorithm.match(Event.BATCH_END, state)
    algorithm.apply(Event.INIT, state, logger=None)
    assert isinstance(state.model[1], SeededDropout) and state.model[1].p == 0.2
    assert repr(algorithm) == "LowMemoryDropout(seed=1)"
    with pytest.raises(TypeError, match="seed"):
        LowMemoryDropout(seed=1.5)
