"""One process of the 2-process gloo job that tests/test_trainer_distributed.py starts through torchrun.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_dist_worker.py
MODE OUT_DIR``. ``train`` writes ``OUT_DIR/rank<r>.json`` with the trained weights, the evaluation
and the timestamp; ``die`` makes rank 1 fail at its third batch; ``save_on_rank0_only`` gives rank 1
no save folder; ``dropout_full``, ``dropout_first_epoch`` and ``dropout_resume`` train with
LowMemoryDropout (seeds drawn per rank), uninterrupted, for one epoch with a checkpoint, and resumed
from it, writing each rank's losses to ``OUT_DIR/<mode>_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from slipstream.algorithms import Algorithm, Event, LowMemoryDropout
from slipstream.trainer import JSONLinesLogger
from trainer_helpers import LossRecorder, classification_data, loader, mlp, quiet_trainer

#: Shared with the test, which repeats the run in one process with twice the batch.
TRAIN_SAMPLES, EVAL_SAMPLES, BATCH_PER_RANK, LR = 96, 97, 8, 0.1


def eval_loader() -> torch.utils.data.DataLoader:
    """97 samples in batches of 5, dropping the partial one: 95 evaluated, by one process or by two."""
    return torch.utils.data.DataLoader(classification_data(EVAL_SAMPLES, seed=1), batch_size=5, drop_last=True)


class DieOnRankOne(Algorithm):
    def match(self, event, state):
        return event == Event.BATCH_START and state.rank == 1 and state.timestamp.batch == 2

    def apply(self, event, state, logger):
        raise RuntimeError("rank 1 died on purpose")


def dropout_run(mode: str, out: str) -> None:
    torch.manual_seed(0)
    model = mlp(dropout=0.3)
    recorder = LossRecorder()
    folder = os.path.join(out, "dropout_checkpoints")
    trainer = quiet_trainer(
        model=model, train_dataloader=loader(classification_data(TRAIN_SAMPLES), batch_size=BATCH_PER_RANK),
        max_duration="1ep" if mode == "dropout_first_epoch" else "2ep", seed=5, dist_timeout=60,
        optimizers=torch.optim.SGD(model.parameters(), lr=LR), algorithms=[recorder, LowMemoryDropout()],
        save_folder=folder if mode == "dropout_first_epoch" else None,
        load_path=folder if mode == "dropout_resume" else None,
    )
    trainer.fit()
    with open(os.path.join(out, f"{mode}_rank{trainer.state.rank}.json"), "w") as file:
        json.dump(recorder.losses, file)


@record
def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode.startswith("dropout_"):
        return dropout_run(mode, out)
    torch.manual_seed(0)
    model = mlp()
    trainer = quiet_trainer(
        model=model, train_dataloader=loader(classification_data(TRAIN_SAMPLES), batch_size=BATCH_PER_RANK),
        eval_dataloader=eval_loader(), max_duration="2ep", optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        seed=0, save_folder=None if mode == "save_on_rank0_only" and int(os.environ["RANK"]) == 1
        else os.path.join(out, "checkpoints"), loggers=[JSONLinesLogger(os.path.join(out, "log.jsonl"))],
        algorithms=[DieOnRankOne()] if mode == "die" else [], dist_timeout=60,
    )
    trainer.fit()
    state = trainer.state
    result = {
        "world_size": state.world_size, "dataloader_len": state.dataloader_len,
        "timestamp": state.timestamp.state_dict(), "eval": state.eval_metrics,
        "weights": {name: value.tolist() for name, value in model.state_dict().items()},
    }
    with open(os.path.join(out, f"rank{state.rank}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
