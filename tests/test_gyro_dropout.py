import copy
import datetime
import os
import time
import warnings

import pytest
import torch
from torch import nn

import slipstream.functional as sf
from slipstream.algorithms import Event, State
from slipstream.algorithms import GyroDropout as GyroDropoutAlgorithm
from slipstream.nn import GyroDropout, load_run_state, save_run_state
from slipstream.surgery import NoEffectWarning
from slipstream.time import Time


def rel_err(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def expected_output(module: GyroDropout, x: torch.Tensor, step: int) -> torch.Tensor:
    """Float64 reference: a per-sample mask from the group each sample falls in, written out in full."""
    rows = module.schedule[(step // module.iter_num) % module.schedule.shape[0]]
    batch = x.shape[0]
    size, larger = divmod(batch, module.tau)
    group_of_sample = []
    for group in range(module.tau):
        group_of_sample += [group] * (size + (group < larger))
    mask = module.masks[rows[group_of_sample]].double() / (1 - module.p)
    return x.double() * mask.view(batch, *([1] * (x.dim() - 2)), x.shape[-1])


def make_gyro(**kwargs):
    config = dict(p=0.4, sigma=12, tau=4, iters_per_epoch=5, max_epoch=6, seed=3)
    config.update(kwargs)
    return GyroDropout(**config)


# ----- forward / backward -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,tau", [
    ((8, 13), 4),         # even groups
    ((11, 13), 4),        # B % tau != 0: groups 3, 3, 3, 2
    ((3, 9), 5),          # B < tau: one sample per group
    ((1, 7), 4),          # a single sample
    ((10, 5, 11), 3),     # [B, T, F]
    ((7, 2, 3, 9), 4),    # [B, H, T, F], uneven
])
def test_forward_and_grad_match_float64_reference(shape, tau):
    drop = make_gyro(tau=tau)
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    y = drop(x)
    ref = expected_output(drop, x, step=0)
    assert y.shape == x.shape and rel_err(y, ref) < 1e-6
    grad = torch.randn(shape)
    y.backward(grad)
    assert rel_err(x.grad, expected_output(drop, grad, step=0)) < 1e-6


def test_each_group_uses_its_own_active_mask():
    drop = make_gyro(p=0.5, sigma=16, tau=4, seed=0)
    y = drop(torch.ones(8, 33))
    rows = drop.active_indices
    for group in range(4):
        expected = drop.masks[rows[group]].float() * 2
        assert torch.equal(y[2 * group], expected) and torch.equal(y[2 * group + 1], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_values_are_rounded_once(dtype):
    """x / (1 - p) computed wide and rounded once, forward and backward, as nn.Dropout does (no bias)."""
    drop = make_gyro(p=0.1)
    x = torch.randn(9, 6, 10, dtype=dtype, requires_grad=True)
    y = drop(x)
    assert y.dtype == dtype
    assert torch.equal(y, expected_output(drop, x, step=0).to(dtype))
    grad = torch.randn(9, 6, 10, dtype=dtype)
    y.backward(grad)
    assert torch.equal(x.grad, expected_output(drop, grad, step=0).to(dtype))


def test_one_dimensional_input_is_one_sample():
    drop = make_gyro()
    x = torch.randn(10) + 2
    assert rel_err(drop(x), expected_output(drop, x.unsqueeze(0), step=0)[0]) < 1e-6


def test_gradcheck_float64():
    drop = make_gyro(advance_on_forward=False)
    x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(drop, (x,))


def test_eval_is_identity_and_does_not_advance():
    drop = make_gyro()
    drop(torch.randn(4, 6))
    drop.eval()
    x = torch.randn(4, 6)
    assert torch.equal(drop(x), x)
    assert drop.step == 1


def test_no_batch_sized_tensor_is_saved_for_backward():
    drop = make_gyro(tau=4)
    x = torch.randn(64, 8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        drop(x).sum().backward()
    assert saved and max(saved) <= drop.tau * 32


def test_feature_width_must_stay_fixed():
    drop = make_gyro()
    drop(torch.randn(4, 6))
    with pytest.raises(ValueError, match="fixed feature width"):
        drop(torch.randn(4, 7))


# ----- schedule -----------------------------------------------------------------------------------

def test_iter_num_formula_and_never_zero():
    assert GyroDropout(iters_per_epoch=196, max_epoch=100).iter_num == (196 * 100 // 256) * 16
    assert GyroDropout(sigma=256, tau=16, iters_per_epoch=3, max_epoch=2).iter_num == 1
    assert GyroDropout(sigma=8, tau=8, iters_per_epoch=1, max_epoch=1).iter_num == 1


@pytest.mark.parametrize("sigma,tau", [(12, 4), (10, 4), (7, 3), (5, 5)])
def test_schedule_walks_permutations_without_replacement(sigma, tau):
    drop = make_gyro(sigma=sigma, tau=tau, iters_per_epoch=sigma * 7, max_epoch=1)
    drop(torch.randn(tau, 6))
    rows = drop.schedule.tolist()
    assert all(len(set(row)) == tau for row in rows)  # no mask twice in one active set
    flat = [i for row in rows for i in row]
    for start in range(0, len(flat) - sigma + 1, sigma):  # each cycle is a permutation
        assert sorted(flat[start:start + sigma]) == list(range(sigma))


def test_active_set_changes_every_iter_num_steps():
    drop = make_gyro(sigma=12, tau=4, iters_per_epoch=10, max_epoch=4)  # iter_num = 3 * 4 = 12
    assert drop.iter_num == 12
    seen = []
    for _ in range(drop.iter_num * 3):
        drop(torch.randn(8, 6))
        seen.append(tuple(drop.active_indices))
    changes = [step for step in range(1, len(seen)) if seen[step] != seen[step - 1]]
    assert changes == [11, 23, 35]  # after each 12th step (the indices shown are for the next step)


def test_manual_mode_advances_only_when_told():
    drop = make_gyro(iters_per_epoch=3, max_epoch=1, advance_on_forward=False)  # iter_num 1
    x = torch.randn(8, 6)
    first = drop(x)
    assert torch.equal(drop(x), first) and drop.step == 0
    drop.advance()
    assert drop.step == 1 and not torch.equal(drop(x), first)
    assert rel_err(drop(x), expected_output(drop, x, step=1)) < 1e-6


# ----- run state / resume -----------------------------------------------------------------------------

def make_net(init_seed=0, **gyro):
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), make_gyro(**gyro), nn.Linear(16, 3))


def train(net, opt, batches):
    outs = []
    for x in batches:
        out = net(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize("stop", [0, 5])
def test_resume_from_checkpoint_uses_the_same_masks(stop):
    gyro = dict(sigma=6, tau=3, iters_per_epoch=2, max_epoch=3)  # iter_num 3: several set changes
    batches = [torch.randn(7, 6) for _ in range(14)]
    whole = make_net(**gyro)
    expected = train(whole, torch.optim.SGD(whole.parameters(), lr=0.1), batches)

    first = make_net(**gyro)
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    train(first, opt, batches[:stop])
    checkpoint = copy.deepcopy({"model": first.state_dict(), "run": save_run_state(first), "opt": opt.state_dict()})

    resumed = make_net(init_seed=1, **dict(gyro, seed=99))  # a fresh, different module
    resumed.load_state_dict(checkpoint["model"])
    load_run_state(resumed, checkpoint["run"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    opt.load_state_dict(checkpoint["opt"])
    got = train(resumed, opt, batches[stop:])
    for a, b in zip(got, expected[stop:]):
        assert torch.equal(a, b)
    assert torch.equal(resumed[2].masks, whole[2].masks) and resumed[2].step == whole[2].step


def test_loading_a_different_config_is_refused():
    drop = make_gyro(sigma=12)
    drop(torch.randn(4, 6))
    with pytest.raises(ValueError, match="sigma"):
        make_gyro(sigma=16).load_run_state(drop.run_state())


def test_checkpoints_load_strictly_both_ways():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3), nn.Linear(6, 2))
    model = copy.deepcopy(plain)
    sf.apply_gyro_dropout(model, sigma=8, tau=2, iters_per_epoch=4, max_epoch=2)
    model(torch.randn(4, 6))  # masks drawn: run state exists, state_dict keys stay the plain ones
    assert model[1].materialized and list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


# ----- argument validation ------------------------------------------------------------------------

BAD = [
    (dict(sigma=0), ValueError, "sigma"),
    (dict(tau=0), ValueError, "tau"),
    (dict(sigma=4, tau=8), ValueError, "tau must be <= sigma"),
    (dict(p=1.0), ValueError, r"\[0, 1\)"),
    (dict(p=-0.1), ValueError, r"\[0, 1\)"),
    (dict(sigma=8.0), TypeError, "sigma"),
    (dict(p="0.5"), TypeError, "p must"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_arguments_are_rejected_everywhere(kwargs, error, message):
    config = dict(p=0.5, sigma=16, tau=4)
    config.update(kwargs)
    with pytest.raises(error, match=message):
        GyroDropout(**config)
    with pytest.raises(error, match=message):
        sf.apply_gyro_dropout(nn.Sequential(nn.Dropout()), **config)
    with pytest.raises(error, match=message):
        GyroDropoutAlgorithm(**config)


def test_bad_run_length_is_rejected():
    for max_epoch in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_epoch"):
            GyroDropout(max_epoch=max_epoch)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        GyroDropout(iters_per_epoch=0)
    # The functional API checks them before looking at the model, so a model without Dropout fails too.
    with pytest.raises(ValueError, match="iters_per_epoch"):
        sf.apply_gyro_dropout(nn.Sequential(nn.Linear(2, 2)), iters_per_epoch=-5)


# ----- functional API -----------------------------------------------------------------------------

def test_apply_keeps_each_p_and_seeds_layers_apart():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 2))
    model.eval()
    replaced = sf.apply_gyro_dropout(model, sigma=16, tau=4, iters_per_epoch=10, max_epoch=2)
    assert len(replaced) == 2
    assert [model[1].p, model[3].p] == [0.1, 0.3]
    assert not model[1].training and model[1].seed != model[3].seed
    fixed = nn.Sequential(nn.Dropout(0.1))
    sf.apply_gyro_dropout(fixed, sigma=16, tau=4, p=0.5)
    assert fixed[0].p == 0.5


def test_apply_without_dropout_warns():
    with pytest.warns(NoEffectWarning):
        assert sf.apply_gyro_dropout(nn.Sequential(nn.Linear(2, 2))) == {}


# ----- algorithm ----------------------------------------------------------------------------------

class Loader:
    def __init__(self, length, batch_size):
        self.length, self.batch_size = length, batch_size

    def __len__(self):
        return self.length


@pytest.mark.parametrize("duration,total", [("3ep", 30), ("25ba", 25), ("640sp", 40)])
def test_algorithm_plans_from_trainer_state(duration, total):
    state = State(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)), train_dataloader=Loader(10, 8),
                  dataloader_len=10, max_duration=Time.parse(duration), world_size=2)
    algorithm = GyroDropoutAlgorithm(sigma=8, tau=2)
    for event in (Event.INIT, Event.FIT_START):
        assert algorithm.match(event, state)
        algorithm.apply(event, state, logger=None)
    gyro = state.model[1]
    assert isinstance(gyro, GyroDropout) and gyro.p == 0.2 and gyro.total_steps == total
    assert not gyro.advance_on_forward


def test_algorithm_advances_once_per_batch_not_per_micro_batch():
    state = State(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)), dataloader_len=4,
                  max_duration=Time.parse("2ep"))
    algorithm = GyroDropoutAlgorithm(sigma=4, tau=2)
    algorithm.apply(Event.INIT, state, None)
    algorithm.apply(Event.FIT_START, state, None)
    for _ in range(3):
        for micro_batch in torch.randn(2, 6, 4):  # gradient accumulation: two forwards per step
            state.model(micro_batch).sum().backward()
        algorithm.apply(Event.BATCH_END, state, None)
    assert state.model[1].step == 3


def test_algorithm_needs_a_duration():
    state = State(model=nn.Sequential(nn.Dropout()), dataloader_len=4)
    algorithm = GyroDropoutAlgorithm(sigma=4, tau=2)
    algorithm.apply(Event.INIT, state, None)
    with pytest.raises(ValueError, match="max_duration"):
        algorithm.apply(Event.FIT_START, state, None)


# ----- torch.compile ------------------------------------------------------------------------------

def test_compile_has_no_graph_break_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = make_net(iters_per_epoch=2, max_epoch=3, sigma=6, tau=3, advance_on_forward=False)  # iter_num 3
    x = torch.randn(7, 6)
    model(x)  # the first training forward builds the masks (outside any graph)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for _ in range(8):  # crosses two active-set changes
        out = compiled(x)
        out.sum().backward()
        assert torch.equal(out, model(x))
        model[2].advance()
    assert counter.frame_count == 1  # a new active set needs no recompile


# ----- DDP ----------------------------------------------------------------------------------------

def _ddp_rank(rank, world_size, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(rank)  # ranks differ in everything but the Gyro seed
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    sf.apply_gyro_dropout(model, sigma=8, tau=2, iters_per_epoch=2, max_epoch=2)  # iter_num 2
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(5):
        ddp(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        mine = (model[1].masks.tolist(), model[1].active_indices, model[1].step)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        assert all(other == everyone[0] for other in everyone), "ranks disagree on Gyro masks or active set"
    del ddp, opt  # release DDP's reducer while the process group is alive, else its teardown can hang
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_ranks_share_masks_and_active_sets(tmp_path, monkeypatch):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init")), nprocs=2, join=False)
        deadline = time.monotonic() + 150
        while not ranks.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail("the DDP ranks did not finish within 150 s")
