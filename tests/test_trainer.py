"""Trainer on CPU: training, the model contract, events and State, durations, precision, loggers, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slipstream
from slipstream import NoEffectWarning
from slipstream.algorithms import Algorithm, Event, LowPrecisionLayerNorm
from slipstream.nn import LPLayerNorm
from slipstream.trainer import ConsoleLogger, InMemoryLogger, JSONLinesLogger, SlipstreamModel, accuracy_counts
from trainer_helpers import LossRecorder, classification_data, loader, mlp, quiet_trainer


def test_fit_learns_and_evaluates_accuracy_and_loss():
    data = classification_data(samples=120)
    model = mlp()
    trainer = quiet_trainer(model=model, train_dataloader=loader(data), eval_dataloader=loader(data, shuffle=False),
                            max_duration="1ba", seed=0)
    before = trainer.eval()
    trainer = quiet_trainer(model=model, train_dataloader=loader(data), eval_dataloader=loader(data, shuffle=False),
                            max_duration="15ep", seed=0, optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2))
    trainer.fit()
    after = trainer.state.eval_metrics
    assert set(after) == {"accuracy", "loss"}
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > 0.9
    with torch.no_grad():
        inputs, targets = data.tensors
        expected = (model(inputs).argmax(1) == targets).double().mean().item()
        expected_loss = F.cross_entropy(model(inputs).double(), targets).item()
    assert after["accuracy"] == pytest.approx(expected, rel=1e-9)
    assert after["loss"] == pytest.approx(expected_loss, rel=1e-5)


class EventRecorder(Algorithm):
    """Records every event, and what State held at some of them."""

    def __init__(self):
        self.events = []
        self.seen = {}

    def match(self, event, state):
        return True

    def apply(self, event, state, logger):
        self.events.append(event)
        if event == Event.AFTER_LOSS and "loss" not in self.seen:
            self.seen["loss"] = (state.loss.dim(), tuple(state.outputs.shape), tuple(state.batch[0].shape))
        if event == Event.FIT_START:
            self.seen["fit_start"] = (state.dataloader_len, str(state.max_duration), state.precision,
                                      len(state.optimizers), state.model.training)
        if event == Event.BATCH_END:
            self.seen.setdefault("timestamps", []).append((state.timestamp.epoch, state.timestamp.batch,
                                                           state.timestamp.sample, state.timestamp.batch_in_epoch))


def test_events_fire_in_documented_order_and_state_is_filled():
    recorder = EventRecorder()
    data = classification_data(samples=20)
    trainer = quiet_trainer(model=mlp(), train_dataloader=loader(data, batch_size=12),
                            eval_dataloader=loader(data, batch_size=12), max_duration="1ep", algorithms=[recorder])
    trainer.fit()
    per_batch = [Event.BATCH_START, Event.BEFORE_FORWARD, Event.AFTER_FORWARD, Event.BEFORE_LOSS, Event.AFTER_LOSS,
                 Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD, Event.BATCH_END]
    assert recorder.events == [Event.INIT, Event.FIT_START, Event.EPOCH_START, *per_batch, *per_batch,
                               Event.EPOCH_END, Event.EVAL_START, Event.EVAL_END, Event.FIT_END]
    assert list(Event).index(Event.INIT) == 0  # the enum lists events in firing order
    assert recorder.seen["loss"] == (0, (12, 3), (12, 8))
    assert recorder.seen["fit_start"] == (2, "1ep", "fp32", 1, True)
    assert recorder.seen["timestamps"] == [(0, 1, 12, 1), (0, 2, 20, 2)]
    assert trainer.state.timestamp.epoch == 1 and trainer.state.timestamp.batch_in_epoch == 0


@pytest.mark.parametrize("duration,batches,samples", [("5ba", 5, 76), ("40sp", 3, 48), ("2ep", 8, 120)])
def test_max_duration_in_each_unit(duration, batches, samples):
    trainer = quiet_trainer(model=mlp(), train_dataloader=loader(classification_data(samples=60)),
                            max_duration=duration)
    trainer.fit()
    assert (trainer.state.timestamp.batch, trainer.state.timestamp.sample) == (batches, samples)
    with pytest.warns(UserWarning, match="already at max_duration"):
        trainer.fit()


def test_eval_and_log_intervals_and_final_evaluation():
    memory = InMemoryLogger()
    data = classification_data(samples=60)  # 4 batches of 16 per epoch
    trainer = quiet_trainer(model=mlp(), train_dataloader=loader(data), eval_dataloader=loader(data),
                            max_duration="7ba", eval_interval="3ba", log_interval="40sp", loggers=[memory])
    trainer.fit()
    eval_steps = [step for step, metrics in memory.records if "metrics/eval/loss" in metrics]
    loss_steps = [step for step, metrics in memory.records if "loss/train" in metrics]
    assert eval_steps == [3, 6, 7]  # every 3 batches, and once at the end
    assert loss_steps == [3, 6, 7]  # 48 and 92 samples cross multiples of 40; the rest is logged at the end
    assert memory.last("throughput/samples_per_s") > 0 and memory.hyperparameters["max_duration"] == "7ba"


@pytest.mark.parametrize("argument", ["max_duration", "eval_interval", "save_interval", "log_interval"])
@pytest.mark.parametrize("bad", ["3tok", "0ep", "-2ba", "ep"])
def test_bad_time_strings_name_the_units(argument, bad):
    kwargs = {"max_duration": "1ep", argument: bad}
    with pytest.raises(ValueError, match=f"{argument}.*'ep', 'ba', 'sp'"):
        quiet_trainer(model=mlp(), train_dataloader=loader(classification_data()), **kwargs)


def test_dataloader_of_length_zero_is_an_error():
    empty = TensorDataset(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train_dataloader has length 0"):
        quiet_trainer(model=mlp(), train_dataloader=DataLoader(empty, batch_size=4), max_duration="1ep")
    short = DataLoader(classification_data(samples=5), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="train_dataloader has length 0"):
        quiet_trainer(model=mlp(), train_dataloader=short, max_duration="1ep")
    with pytest.raises(ValueError, match="eval_dataloader has length 0"):
        quiet_trainer(model=mlp(), train_dataloader=loader(classification_data()),
                      eval_dataloader=DataLoader(empty), max_duration="1ep")
    with pytest.raises(TypeError, match="must have a length"):
        quiet_trainer(model=mlp(), train_dataloader=iter([]), max_duration="1ep")


class NoLoss(SlipstreamModel):
    def forward(self, batch):
        return batch[0]


class DictModel(nn.Module):
    """A Hugging Face-style model: keyword inputs, an output object with .logits and (with labels) .loss."""

    def __init__(self, with_loss=True):
        super().__init__()
        self.net = mlp()
        self.with_loss = with_loss

    def forward(self, inputs, labels=None):
        logits = self.net(inputs)
        loss = F.cross_entropy(logits, labels) if self.with_loss and labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def dict_loader(samples=48):
    data = classification_data(samples=samples)
    return DataLoader([{"inputs": x, "labels": y} for x, y in data], batch_size=16, shuffle=True)


def test_a_model_without_a_loss_is_an_error():
    with pytest.raises(TypeError, match="does not define loss"):
        quiet_trainer(model=NoLoss(), train_dataloader=loader(classification_data()), max_duration="1ep")
    trainer = quiet_trainer(model=DictModel(with_loss=False), train_dataloader=dict_loader(), max_duration="1ep")
    with pytest.raises(ValueError, match="without a 'loss'.*SlipstreamModel"):
        trainer.fit()
    triples = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long), torch.ones(8)),
                         batch_size=4)
    with pytest.raises(ValueError, match="got a list of length 3"):
        quiet_trainer(model=mlp(), train_dataloader=triples, max_duration="1ep").fit()
    with pytest.raises(ValueError, match="scalar"):
        quiet_trainer(model=mlp(), train_dataloader=loader(classification_data()), max_duration="1ep",
                      loss_fn=lambda outputs, targets: outputs).fit()


def test_bad_precision_device_and_arguments():
    kwargs = dict(model=mlp(), train_dataloader=loader(classification_data()), max_duration="1ep")
    with pytest.raises(ValueError, match="amp_fp16.*needs a CUDA device"):
        quiet_trainer(precision="amp_fp16", **kwargs)
    with pytest.raises(ValueError, match="allowed values: 'fp32', 'amp_fp16', 'amp_bf16'"):
        quiet_trainer(precision="fp16", **kwargs)
    with pytest.raises(ValueError, match="'cpu', 'cuda'"):
        quiet_trainer(device="tpu", **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            quiet_trainer(device="cuda", **kwargs)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        quiet_trainer(**{**kwargs, "model": lambda x: x})
    with pytest.raises(TypeError, match="algorithms must be"):
        quiet_trainer(algorithms=[object()], **kwargs)
    with pytest.raises(ValueError, match="seed"):
        quiet_trainer(seed=-1, **kwargs)
    with pytest.raises(ValueError, match="eval_dataloader"):
        quiet_trainer(**kwargs).eval()


def test_low_precision_algorithm_takes_the_trainers_precision():
    model = mlp()
    trainer = quiet_trainer(model=model, train_dataloader=loader(classification_data()), max_duration="2ba",
                            precision="amp_bf16", algorithms=[LowPrecisionLayerNorm()])
    assert isinstance(trainer.state.model[1], LPLayerNorm)
    trainer.fit()
    assert torch.isfinite(trainer.state.loss) and trainer.state.loss.dtype == torch.float32
    with pytest.warns(NoEffectWarning):
        quiet_trainer(model=mlp(), train_dataloader=loader(classification_data()), max_duration="1ba",
                      precision="fp32", algorithms=[LowPrecisionLayerNorm()])


class Classifier(SlipstreamModel):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, batch):
        return self.net(batch[0])

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1])

    def eval_metrics(self, outputs, batch):
        return {"accuracy": accuracy_counts(outputs, batch[1]),
                "positive_logits": ((outputs > 0).sum(), torch.tensor(outputs.numel()))}


def test_slipstream_model_contract():
    data = classification_data()
    trainer = quiet_trainer(model=Classifier(), train_dataloader=loader(data), eval_dataloader=loader(data),
                            max_duration="2ep")
    trainer.fit()
    assert set(trainer.state.eval_metrics) == {"loss", "accuracy", "positive_logits"}
    assert 0 < trainer.state.eval_metrics["positive_logits"] < 1


def test_hugging_face_style_model():
    recorder = LossRecorder()
    trainer = quiet_trainer(model=DictModel(), train_dataloader=dict_loader(), eval_dataloader=dict_loader(),
                            max_duration="3ep", algorithms=[recorder], optimizers=None)
    trainer.fit()
    assert set(trainer.state.eval_metrics) == {"loss", "accuracy"} and len(recorder.losses) == 9


def test_top_level_export_and_default_optimizer():
    trainer = slipstream.Trainer(model=mlp(), train_dataloader=loader(classification_data()), max_duration="1ba",
                                 loggers=[], progress_bar=False)
    assert [type(o).__name__ for o in trainer.state.optimizers] == ["AdamW"]
    assert trainer.state.device == torch.device("cpu") and trainer.state.precision == "fp32"


def test_schedulers_step_per_epoch_or_per_batch():
    for every_batch, expected_steps in ((False, 2), (True, 12)):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        quiet_trainer(model=model, train_dataloader=loader(classification_data()), max_duration="2ep",
                      optimizers=optimizer, schedulers=scheduler, step_schedulers_every_batch=every_batch).fit()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5**expected_steps)
    with pytest.raises(ValueError, match="pass optimizers too"):
        quiet_trainer(model=model, train_dataloader=loader(classification_data()), max_duration="1ep",
                      schedulers=[scheduler])


def test_console_and_json_lines_loggers_and_progress_bar(tmp_path, capsys):
    path = tmp_path / "logs" / "run.jsonl"
    data = classification_data(samples=40)
    trainer = slipstream.Trainer(model=mlp(), train_dataloader=loader(data), eval_dataloader=loader(data),
                                 max_duration="2ep", log_interval="1ba",
                                 loggers=[ConsoleLogger(), JSONLinesLogger(path)])
    trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["hyperparameters"]["precision"] == "fp32"
    assert [r["step"] for r in records if "loss/train" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "metrics/eval/accuracy" in r] == [3, 6]
    out, err = capsys.readouterr()
    assert "[batch 6] metrics/eval/accuracy=" in out and "[config]" in out
    assert "epoch 2" in err and "3/3" in err  # the tqdm bar, on stderr


def test_a_real_hugging_face_model_with_a_low_precision_method():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    tokens = torch.randint(1, 50, (40, 8))
    samples = [{"input_ids": t, "attention_mask": torch.ones(8, dtype=torch.long), "labels": t[0] % 3} for t in tokens]
    data = DataLoader(samples, batch_size=8, shuffle=True)
    trainer = quiet_trainer(model=model, train_dataloader=data, eval_dataloader=data, max_duration="2ep",
                            precision="amp_bf16", algorithms=[LowPrecisionLayerNorm()])
    trainer.fit()
    assert any(isinstance(m, LPLayerNorm) for m in model.modules())
    assert set(trainer.state.eval_metrics) == {"loss", "accuracy"}
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.state.eval_metrics.values())


def test_causal_lm_accuracy_scores_each_position_against_the_next_token():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=17, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 17, (8, 10))
    batch = {"input_ids": tokens, "labels": tokens}
    trainer = quiet_trainer(model=model, train_dataloader=DataLoader([batch], batch_size=None),
                            eval_dataloader=DataLoader([batch], batch_size=None), max_duration="1ba")
    with torch.no_grad():
        logits = model(**batch).logits
    predicted = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    assert trainer.eval()["accuracy"] == pytest.approx(predicted.double().mean().item())


def test_eval_restores_each_submodules_own_mode():
    """A BatchNorm a user froze (eval mode inside a training model) stays frozen through eval and training."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model[1].eval()
    frozen_mean = model[1].running_mean.clone()
    trainer = quiet_trainer(model=model, train_dataloader=loader(classification_data()),
                            eval_dataloader=loader(classification_data(seed=1)), max_duration="2ep")
    trainer.fit()
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, frozen_mean)
    eval_model = mlp(dropout=0.5).eval()  # a model handed over in eval mode still trains in train mode
    recorder = DropoutModeRecorder()
    quiet_trainer(model=eval_model, train_dataloader=loader(classification_data()), max_duration="1ba",
                  algorithms=[recorder]).fit()
    assert recorder.modes == [True]


class DropoutModeRecorder(Algorithm):
    def __init__(self):
        self.modes = []

    def match(self, event, state):
        return event == Event.BEFORE_FORWARD

    def apply(self, event, state, logger):
        self.modes.append(state.model[3].training)


def test_reduce_lr_on_plateau_is_refused_with_what_to_do():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ReduceLROnPlateau steps on a metric"):
        quiet_trainer(model=model, train_dataloader=loader(classification_data()), max_duration="1ep",
                      optimizers=optimizer, schedulers=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
