"""One process of the 2-process gloo job that tests/test_trainer_distributed.py starts through torchrun.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_dist_worker.py
{train|die} OUT_DIR``. ``train`` writes ``OUT_DIR/rank<r>.json`` with the trained weights, the
evaluation and the timestamp; ``die`` makes rank 1 fail at its third batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from slipstream.algorithms import Algorithm, Event
from slipstream.trainer import JSONLinesLogger
from trainer_helpers import classification_data, loader, mlp, quiet_trainer

#: Shared with the test, which repeats the run in one process with twice the batch.
TRAIN_SAMPLES, EVAL_SAMPLES, BATCH_PER_RANK, LR = 96, 97, 8, 0.1


class DieOnRankOne(Algorithm):
    def match(self, event, state):
        return event == Event.BATCH_START and state.rank == 1 and state.timestamp.batch == 2

    def apply(self, event, state, logger):
        raise RuntimeError("rank 1 died on purpose")


@record
def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = mlp()
    trainer = quiet_trainer(
        model=model, train_dataloader=loader(classification_data(TRAIN_SAMPLES), batch_size=BATCH_PER_RANK),
        eval_dataloader=loader(classification_data(EVAL_SAMPLES, seed=1), batch_size=5, shuffle=False),
        max_duration="2ep", optimizers=torch.optim.SGD(model.parameters(), lr=LR), seed=0,
        save_folder=os.path.join(out, "checkpoints"), loggers=[JSONLinesLogger(os.path.join(out, "log.jsonl"))],
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
