"""The Trainer under torchrun: a 2-process gloo job equals one process with twice the batch; a dying rank fails fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from trainer_dist_worker import BATCH_PER_RANK, LR, TRAIN_SAMPLES, eval_loader
from trainer_helpers import classification_data, loader, mlp, quiet_trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def torchrun(mode: str, out: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "trainer_dist_worker.py"), mode, out]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path):
    done = torchrun("train", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    assert ranks[0]["eval"] == ranks[1]["eval"]  # metrics reduced across ranks
    assert ranks[0]["world_size"] == 2 and ranks[0]["dataloader_len"] == TRAIN_SAMPLES // (2 * BATCH_PER_RANK)
    assert ranks[0]["timestamp"]["sample"] == 2 * TRAIN_SAMPLES  # samples count over both ranks

    torch.manual_seed(0)
    model = mlp()
    single = quiet_trainer(
        model=model, train_dataloader=loader(classification_data(TRAIN_SAMPLES), batch_size=2 * BATCH_PER_RANK),
        eval_dataloader=eval_loader(),
        max_duration="2ep", optimizers=torch.optim.SGD(model.parameters(), lr=LR), seed=0)
    single.fit()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(ranks[0]["weights"][name]), value, rtol=1e-5, atol=1e-6)
    # Each eval sample counted once, and with drop_last the same 95 samples as one process evaluates.
    assert ranks[0]["eval"]["accuracy"] == single.state.eval_metrics["accuracy"]
    assert ranks[0]["eval"]["loss"] == pytest.approx(single.state.eval_metrics["loss"], rel=1e-5)

    # Rank 0 alone logs and saves.
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum("hyperparameters" in line for line in lines) == 1
    assert lines[0]["hyperparameters"]["world_size"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ep1-ba6.pt", "ep2-ba12.pt", "latest.pt"]
    assert len(torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["ranks"]) == 2


@pytest.mark.parametrize("mode, message", [
    ("die", "rank 1 died on purpose"),  # a dying rank fails the job fast
    ("save_on_rank0_only", "save_folder given must be the same on every rank"),  # an error, not a hang
])
def test_a_failing_job_fails_fast_with_a_clear_error(tmp_path, mode, message):
    started = time.monotonic()
    done = torchrun(mode, str(tmp_path), timeout=90)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert time.monotonic() - started < 60


def test_each_rank_resumes_its_own_dropout_seeds(tmp_path):
    """LowMemoryDropout draws its seeds from each rank's RNG: a resumed job must take each rank's own."""
    for mode in ("dropout_full", "dropout_first_epoch", "dropout_resume"):
        done = torchrun(mode, str(tmp_path))
        assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        full, first, resumed = (json.loads((tmp_path / f"{mode}_rank{rank}.json").read_text())
                                for mode in ("dropout_full", "dropout_first_epoch", "dropout_resume"))
        assert first + resumed == full  # exactly, float for float
