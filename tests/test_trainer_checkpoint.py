"""Trainer checkpoints on CPU: an interrupted-and-resumed run equals the uninterrupted one; bad checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from slipstream.algorithms import Algorithm, Event, GyroDropout, LowMemoryDropout
from slipstream.trainer.checkpoint import LATEST
from trainer_helpers import LossRecorder, classification_data, loader, mlp, quiet_trainer


class NoisyLinear(nn.Linear):
    """Adds noise from a generator it owns while training; the generator's state is module extra state."""

    def __init__(self, features: int):
        super().__init__(features, features)
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            out = out + 0.1 * torch.randn(out.shape, generator=self.generator)
        return out

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])


class BatchCounter(Algorithm):
    """An algorithm with state of its own, which checkpoints must carry."""

    def __init__(self):
        self.count = 0

    def match(self, event, state):
        return event == Event.BATCH_END

    def apply(self, event, state, logger):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class CrashAt(Algorithm):
    """Simulates an interruption: raises when batch ``at`` is about to start."""

    def __init__(self, at=None):
        self.at = at

    def match(self, event, state):
        return event == Event.BATCH_START and state.timestamp.batch == self.at

    def apply(self, event, state, logger):
        raise KeyboardInterrupt("interrupted on purpose")


#: slipstream's dropout replacements, whose masks / seed streams are run state in the checkpoint.
DROPOUT_METHODS = {"dropout": lambda: [], "gyro_dropout": lambda: [GyroDropout(sigma=8, tau=2)],
                   "low_memory_dropout": lambda: [LowMemoryDropout(seed=3)]}


def build_run(seed_of_init: int, dropout: str = "dropout", **kwargs):
    """Model with dropout, its own noise generator and LayerNorm; AdamW + StepLR; shuffled data; eval.

    ``dropout`` names the entry of DROPOUT_METHODS whose algorithm replaces the model's Dropout.
    """
    torch.manual_seed(seed_of_init)
    model = nn.Sequential(NoisyLinear(8), mlp(dropout=0.3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    recorder, counter = LossRecorder(), BatchCounter()
    data = classification_data(samples=80)  # 5 batches of 16 per epoch
    kwargs.setdefault("max_duration", "3ep")
    trainer = quiet_trainer(model=model, train_dataloader=loader(data), eval_dataloader=loader(data),
                            optimizers=optimizer, schedulers=scheduler, seed=17,
                            algorithms=[recorder, counter, CrashAt(kwargs.pop("crash_at", None)),
                                        *DROPOUT_METHODS[dropout]()], **kwargs)
    return trainer, recorder, counter


@pytest.mark.parametrize("dropout", list(DROPOUT_METHODS))
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, dropout, pytorch_fallbacks):
    full, full_run, _ = build_run(seed_of_init=0, dropout=dropout)
    full.fit()

    folder = str(tmp_path / "ckpt")
    interrupted, first_run, _ = build_run(seed_of_init=0, dropout=dropout, save_folder=folder, save_interval="4ba",
                                          crash_at=11)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert sorted(os.listdir(folder)) == ["ep0-ba4.pt", "ep1-ba8.pt", LATEST]  # the last before the crash: batch 8

    # A fresh process would start from a differently initialized model: the checkpoint must overwrite it all.
    resumed, resumed_run, counter = build_run(seed_of_init=123, dropout=dropout, load_path=folder)
    assert resumed.state.timestamp.batch == 8 and resumed.state.timestamp.batch_in_epoch == 3
    resumed.fit()

    assert first_run.losses[:8] + resumed_run.losses == full_run.losses  # exactly, float for float
    assert counter.count == 15 and resumed.state.timestamp.epoch == 3
    assert resumed.state.eval_metrics == full.state.eval_metrics
    for mine, theirs in zip(resumed.state.model.state_dict().values(), full.state.model.state_dict().values()):
        if isinstance(mine, torch.Tensor):
            assert torch.equal(mine, theirs)


def test_checkpoint_contents(tmp_path):
    folder = str(tmp_path)
    trainer, _, _ = build_run(seed_of_init=0, save_folder=folder, max_duration="2ba", save_interval="1ep")
    trainer.fit()  # ends mid-epoch: the final checkpoint is written anyway
    checkpoint = torch.load(os.path.join(folder, LATEST), weights_only=True)
    assert checkpoint["timestamp"] == {"epoch": 0, "batch": 2, "sample": 32, "batch_in_epoch": 2}
    assert set(checkpoint["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert checkpoint["ranks"][0]["loss_window"] == [0.0, 0.0]  # logged at the end of fit(), before the save
    assert "0._extra_state" in checkpoint["model"] and checkpoint["run_state"] == {}
    assert [a["name"] for a in checkpoint["algorithms"]] == ["LossRecorder", "BatchCounter", "CrashAt"]
    assert checkpoint["algorithms"][1]["state"] == {"count": 2}
    assert len(checkpoint["optimizers"]) == 1 and checkpoint["schedulers"][0]["last_epoch"] == 0
    assert checkpoint["data_seed"] == 17 and checkpoint["scaler"] is None


def test_checkpoint_from_another_model_is_an_error(tmp_path):
    folder = str(tmp_path)
    trainer, _, _ = build_run(seed_of_init=0, save_folder=folder, max_duration="1ba")
    trainer.fit()
    with pytest.raises(ValueError, match="another model.*(missing|shape)"):
        quiet_trainer(model=mlp(features=8, classes=5), train_dataloader=loader(classification_data()),
                      max_duration="1ep", load_path=folder)
    with pytest.raises(ValueError, match="trained with algorithms"):
        quiet_trainer(model=trainer.state.model, train_dataloader=loader(classification_data()),
                      max_duration="1ep", load_path=folder)


def test_missing_or_foreign_checkpoint_is_an_error(tmp_path):
    kwargs = dict(model=mlp(), train_dataloader=loader(classification_data()), max_duration="1ep")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        quiet_trainer(load_path=str(tmp_path / "nothing.pt"), **kwargs)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": mlp().state_dict()}, foreign)
    with pytest.raises(ValueError, match="not a slipstream Trainer checkpoint"):
        quiet_trainer(load_path=str(foreign), **kwargs)


def test_the_end_of_training_is_saved_after_a_batch_save_on_the_last_batch(tmp_path):
    """A '5ba' save lands on the epoch's last batch; the epoch's end (scheduler step, epoch count) is saved too."""
    folder = str(tmp_path)
    trainer, _, _ = build_run(seed_of_init=0, save_folder=folder, max_duration="1ep", save_interval="5ba")
    trainer.fit()
    checkpoint = torch.load(os.path.join(folder, LATEST), weights_only=True)
    assert checkpoint["timestamp"]["epoch"] == 1 and checkpoint["schedulers"][0]["last_epoch"] == 1
    with pytest.warns(UserWarning, match="nothing to do"):
        build_run(seed_of_init=0, max_duration="1ep", load_path=folder)[0].fit()


def test_a_resumed_run_logs_the_training_loss_an_uninterrupted_run_logs(tmp_path):
    """Loss sums not yet logged at the save are in the checkpoint, per rank."""
    from slipstream.trainer import InMemoryLogger

    full_log = InMemoryLogger()
    build_run(seed_of_init=0, max_duration="2ep", log_interval="8ba", loggers=[full_log])[0].fit()
    folder = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        build_run(seed_of_init=0, max_duration="2ep", log_interval="8ba", save_folder=folder, save_interval="3ba",
                  crash_at=4)[0].fit()
    resumed_log = InMemoryLogger()
    build_run(seed_of_init=0, max_duration="2ep", log_interval="8ba", load_path=folder, loggers=[resumed_log])[0].fit()
    losses = [(step, metrics["loss/train"]) for step, metrics in resumed_log.records if "loss/train" in metrics]
    assert losses == [(step, metrics["loss/train"]) for step, metrics in full_log.records
                      if "loss/train" in metrics and step > 3]


def test_mid_epoch_resume_of_a_loader_the_trainer_does_not_rebuild_warns(tmp_path):
    class OwnLoader(torch.utils.data.DataLoader):
        pass

    folder = str(tmp_path)
    data = classification_data(samples=80)
    with pytest.raises(KeyboardInterrupt):
        quiet_trainer(model=mlp(), train_dataloader=OwnLoader(data, batch_size=16, shuffle=True),
                      max_duration="1ep", save_folder=folder, save_interval="2ba", algorithms=[CrashAt(3)]).fit()
    resumed = quiet_trainer(model=mlp(), train_dataloader=OwnLoader(data, batch_size=16, shuffle=True),
                            max_duration="1ep", load_path=folder, algorithms=[CrashAt(None)])
    with pytest.warns(UserWarning, match="resuming mid-epoch with a OwnLoader"):
        resumed.fit()


def test_a_checkpoint_of_another_world_size_warns_and_takes_rank_zeros_run_state(tmp_path):
    folder = str(tmp_path)
    build_run(seed_of_init=0, dropout="low_memory_dropout", save_folder=folder, max_duration="2ba")[0].fit()
    checkpoint = torch.load(os.path.join(folder, LATEST), weights_only=True)
    checkpoint["ranks"].append(checkpoint["ranks"][0])  # as if saved by two processes
    torch.save(checkpoint, os.path.join(folder, "two_ranks.pt"))
    with pytest.warns(UserWarning, match="saved by 2 processes, this run has 1"):
        resumed = build_run(seed_of_init=1, dropout="low_memory_dropout", max_duration="3ba",
                            load_path=os.path.join(folder, "two_ranks.pt"))[0]
    from slipstream.nn import save_run_state

    assert str(save_run_state(resumed.state.model)) == str(checkpoint["run_state"])
