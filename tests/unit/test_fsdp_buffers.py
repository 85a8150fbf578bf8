"""Buffers under ``training.parallelism: fsdp`` are kept in step across ranks, as DDP keeps them:
every rank takes rank 0's buffers after each step (``step.state_buffers``,
``Collectives.broadcast_in_place``). The task is a user's with a BatchNorm (``two_head_task``),
whose forward moves its running statistics and counter on each rank's own samples.

- after a run every rank holds rank 0's buffers bit for bit, and the checkpoint holds them too;
- a rank killed inside a step's forward, resumed: every rank's buffers are the uninterrupted
  run's, bit for bit (before this, a resume gave every rank the one copy DCP had saved);
- the language model has no buffer to keep in step (its causal mask is not state): no collective.

Two ranks in plain processes (gloo), a few seconds a run."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch
from in_process import TWO_HEAD_STEPS, run_function, two_heads_under_fsdp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from two_head_task import TwoHeads, write_csv

from training.core import checkpoint
from training.tasks.language_model import BytesGPT, LanguageModelOptions
from training.worker.step import state_buffers

FS = pafs.LocalFileSystem()
BUFFERS = ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked")


def _train_and_dump_buffers(config: dict, out: str) -> None:
    """One spawned rank: the real attempt; once it has finished, this rank's buffers to
    ``out.<rank>``."""
    from training.worker import attempt

    run_attempt = attempt.run_attempt

    def and_dump(worker, progress) -> None:
        run_attempt(worker, progress)
        torch.save(dict(worker.model.named_buffers()), f"{out}.{worker.rank}")

    attempt.run_attempt = and_dump
    attempt.train_in_process(config, timeout_s=30, init_method=os.environ["INIT_METHOD"])


def run(cfg: dict, out) -> list[int]:
    return run_function(_train_and_dump_buffers, 2, 30, cfg, str(out))


def buffers_by_rank(out) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    storage = tmp_path_factory.mktemp("buffers")
    write_csv(storage / "points.csv")
    assert run(
        two_heads_under_fsdp(storage / "points.csv", storage, "whole"), storage / "dump"
    ) == [0, 0]
    return storage, buffers_by_rank(storage / "dump")


def test_every_rank_holds_rank_0s_buffers_and_so_does_the_checkpoint(uninterrupted):
    storage, (rank0, rank1) = uninterrupted
    assert rank0["body.1.num_batches_tracked"] == TWO_HEAD_STEPS  # one forward per step
    assert rank0["body.1.running_mean"].abs().sum() > 0  # moved from its initial zeros
    assert rank0.keys() == rank1.keys() == set(BUFFERS)
    for name in BUFFERS:
        assert torch.equal(rank0[name], rank1[name]), name
    newest = checkpoint.newest_valid(FS, str(storage / "whole"))
    assert newest is not None and newest.step == TWO_HEAD_STEPS
    dcp_to_torch_save(newest.path, storage / "whole.pt")
    saved = torch.load(storage / "whole.pt", weights_only=False)["model"]
    for name in BUFFERS:
        assert torch.equal(saved[name], rank0[name]), name


def test_a_rank_killed_in_forward_resumes_with_every_ranks_buffers_bitwise_equal(
    uninterrupted, tmp_path
):
    """Rank 1 is SIGKILLed inside step 9's forward (its buffers have moved); the run resumes
    from step 7's checkpoint and every rank ends with the uninterrupted run's buffers."""
    storage, expected = uninterrupted
    fault = {"kind": "kill", "rank": 1, "step": 9, "during": "forward"}
    cfg = two_heads_under_fsdp(storage / "points.csv", tmp_path, "killed", [fault])
    assert run(cfg, tmp_path / "dump") == [1, -9]
    assert checkpoint.newest_valid(FS, str(tmp_path / "killed")).step == 7
    assert run(cfg, tmp_path / "dump") == [0, 0]
    for rank, got in enumerate(buffers_by_rank(tmp_path / "dump")):
        for name in BUFFERS:
            assert torch.equal(got[name], expected[rank][name]), (rank, name)


def test_only_buffers_a_checkpoint_holds_are_kept_in_step():
    """BatchNorm's three are; the language model's causal mask (non-persistent, a constant) is
    not, so a step of the language model under fsdp issues no collective for buffers."""
    two_heads = TwoHeads(3, 16)
    assert [b.data_ptr() for b in state_buffers(two_heads)] == [
        b.data_ptr() for name, b in two_heads.named_buffers() if name in BUFFERS
    ]
    language_model = BytesGPT(LanguageModelOptions(block_size=8, d_model=16, n_heads=2))
    assert [name for name, _ in language_model.named_buffers()] == ["causal"]
    assert state_buffers(language_model) == []
