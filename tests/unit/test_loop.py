"""The loop's step without Ray (one process, no DDP): micro-batches give the gradient of one pass,
mixed precision trains, evaluation is bounded, a non-finite loss is caught with its step, and the
state saved on failure is the last completed step (or nothing, when saving would be wrong)."""

from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import pytest
import torch
from two_head_task import write_csv

from training.core import checkpoint, data, runlog, stops
from training.core.runlog import RunLog
from training.core.save_protocol import ShutdownBegun
from training.driver.settings import parse_config
from training.tasks import tabular
from training.worker.attempt import build_worker
from training.worker.boundary import StepBoundary
from training.worker.cadence import close_interval, record_step
from training.worker.checkpointer import (
    make_uploader,
    rescue_staged,
    save_and_report,
    save_on_failure,
    wait_for_previous_save,
)
from training.worker.context import Worker
from training.worker.evaluation import evaluate
from training.worker.runtime import LocalRuntime
from training.worker.step import step_completed, train_step

FS = pafs.LocalFileSystem()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "demo.parquet"
    tabular.write_demo_dataset(FS, str(path), rows=640)
    return path


def make_worker(table, **training) -> Worker:
    cfg = parse_config(
        {
            "data": {"path": str(table)},
            "training": {"global_batch_size": 64, **training},
            "eval": {"batches": 2},
            "task": {"options": {"mlp": {"hidden_sizes": [32], "dropout": 0.0}}},
        }
    )
    worker = build_worker(cfg, cfg.model_dump(), LocalRuntime(cfg))
    worker.fs, worker.run_dir, worker.attempt = FS, str(table.parent / "run"), "a1"
    worker.boundary = StepBoundary(worker.model, worker.task)
    return worker


def params(worker: Worker) -> list[torch.Tensor]:
    return [p.detach().clone() for p in worker.model.parameters()]


def test_micro_batches_give_the_gradient_of_one_pass(table):
    whole, micro = make_worker(table), make_worker(table, micro_batch_size=16)
    for step in (1, 2, 3):
        train_step(whole, step)
        train_step(micro, step)
    for a, b in zip(params(whole), params(micro), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # The totals add up to the same interval metrics.
    assert whole.interval.steps == micro.interval.steps == 3
    first = close_interval(whole, 3, lr=0.0)[0]
    second = close_interval(micro, 3, lr=0.0)[0]
    assert math.isclose(first["loss"], second["loss"], rel_tol=1e-5)
    assert first["accuracy"] == second["accuracy"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(table, precision):
    worker = make_worker(table, precision=precision)
    before = params(worker)
    for step in range(1, 6):
        train_step(worker, step)
    step_metrics, _ = close_interval(worker, 5, lr=0.0)
    assert math.isfinite(step_metrics["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, params(worker), strict=True))
    if precision == "fp16":
        assert worker.scaler.state_dict()["scale"] > 0  # checkpointed with the state


def test_evaluation_is_bounded_and_uses_no_randomness(table):
    worker = make_worker(table)
    rng = torch.get_rng_state()
    first = evaluate(worker, global_step=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert set(first) == {"val_loss", "val_accuracy"}
    assert evaluate(worker, global_step=1) == first


def test_steps_and_evaluation_tell_the_task_which_they_are(table):
    """``batch(..., training=True)`` on the training split in a step, ``training=False`` on the
    validation split in evaluation; ``metrics`` gets what ``load`` learned."""
    worker = make_worker(table)
    calls, batch, metrics = [], worker.task.batch, worker.task.metrics

    def recorded_batch(samples, ids, seed, *, training):
        calls.append((samples is worker.train, samples is worker.val, training))
        return batch(samples, ids, seed, training=training)

    def recorded_metrics(totals, info):
        calls.append(info)
        return metrics(totals, info)

    worker.task.batch, worker.task.metrics = recorded_batch, recorded_metrics
    train_step(worker, 1)
    close_interval(worker, 1, lr=0.0)
    evaluate(worker, global_step=1)
    info = tabular.TableInfo(tabular.DEMO_FEATURES, tabular.DEMO_CLASSES)
    assert worker.info == info
    assert calls == [(True, False, True), info, (False, True, False), info]  # val: 1 batch


def test_a_log_line_that_covers_part_of_an_interval_says_which_steps(table, tmp_path, caplog):
    """After a resume (here: from step 3) the first line's metrics cover fewer steps than
    ``log_every_n_steps``: the line names them; a full interval's line does not."""
    worker = make_worker(table, log_every_n_steps=2)
    worker.run_dir = str(tmp_path / "run")
    worker.runlog = RunLog(FS, worker.run_dir, worker.attempt)
    caplog.set_level("INFO", logger="training.worker.cadence")
    for step in (4, 5, 6):  # the steps after the resume; the log cadence closes 4 and 6
        train_step(worker, step)
        if step % 2 == 0:
            close_interval(worker, step, lr=0.0)
    total = worker.plan.total_steps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" loss")[0] for line in lines] == [
        f"step 4/{total} epoch 0 (over steps 4-4 only)",
        f"step 6/{total} epoch 0",
    ]


def test_a_non_finite_loss_is_caught_with_its_step(table):
    worker = make_worker(table)
    train_step(worker, 1)
    worker.interval.watch(2, torch.tensor(float("nan")))
    worker.interval.watch(3, torch.tensor(float("inf")))
    with pytest.raises(stops.NonFiniteLoss, match="at step 2"):
        close_interval(worker, 3, lr=0.0)


def test_state_saved_on_failure_is_the_last_completed_step(table, tmp_path):
    worker = make_worker(table)
    worker.run_dir = str(tmp_path / "run")
    worker.runlog = RunLog(FS, worker.run_dir, worker.attempt)
    for step in (1, 2, 3):
        train_step(worker, step)
        step_completed(worker, step)
        if step < 3:  # step 3 failed after the optimizer step, before its ledger entry
            record_step(worker, step, 0.01, {})
            worker.saves.recorded_step = step
    save_on_failure(worker)

    saved = checkpoint.newest_valid(FS, worker.run_dir)
    assert saved is not None and saved.step == 3
    state = checkpoint.load(FS, saved.path)
    saved_params = list(state["model"].values())
    assert all(torch.equal(a, b) for a, b in zip(params(worker), saved_params, strict=True))
    logged = runlog.read_events(FS, worker.run_dir)
    assert [e["global_step"] for e in logged if e["event"] == "step"] == [1, 2, 3]
    assert [e["global_step"] for e in logged if e.get("failure")] == [3]


@pytest.mark.parametrize("why", ["already saved", "not finite", "not rank 0"])
def test_nothing_is_saved_on_failure_when_it_would_be_wrong(table, tmp_path, why):
    worker = make_worker(table)
    worker.run_dir = str(tmp_path / "run")
    worker.runlog = RunLog(FS, worker.run_dir, worker.attempt)
    train_step(worker, 1)
    step_completed(worker, 1)
    worker.saves.recorded_step = 1
    if why == "already saved":
        worker.saves.saved(1)
    elif why == "not finite":
        next(worker.model.parameters()).data.fill_(float("nan"))
    else:
        worker.rank = 1
    save_on_failure(worker)
    assert checkpoint.scan(FS, worker.run_dir) == []


@pytest.mark.parametrize("upload", ["completes", "fails", "never began"])
def test_save_on_failure_waits_for_the_periodic_upload_in_flight(table, tmp_path, upload):
    """A peer died just after checkpoint 1 was staged. If its upload is running, rank 0 lets it
    finish instead of letting Ray's kill cut it short, and saves the state itself only if that
    upload failed. If Ray never began it (the report's barrier broke on the dead peer), rank 0
    saves at once, and an upload Ray would begin after that refuses to write the same step."""
    worker = make_worker(table)
    worker.run_dir = str(tmp_path / "run")
    worker.runlog = RunLog(FS, worker.run_dir, worker.attempt)
    train_step(worker, 1)
    record_step(worker, 1, 0.01, {})
    step_completed(worker, 1)
    worker.saves.recorded_step = 1
    worker.saves.staged()
    began = upload != "never began" and worker.saves.upload_begins()

    def background_upload():
        time.sleep(0.3)  # the upload thread, still writing when the failure is noticed
        worker.saves.upload_ended(1 if upload == "completes" else None)

    uploader = threading.Thread(target=background_upload)
    if began:
        uploader.start()
    save_on_failure(worker)
    if began:
        assert worker.saves.wait_until_free(0)  # it returned only after the upload ended
        uploader.join()
    else:
        late = make_uploader(worker, 1, {})
        # In a thread of its own, as in Ray: the uploader lowers its thread's CPU priority.
        with ThreadPoolExecutor(1) as upload_thread:
            refused = upload_thread.submit(late)
            with pytest.raises(RuntimeError, match="the attempt failed first"):
                refused.result()
    saved = [c.step for c in checkpoint.scan(FS, worker.run_dir)]
    assert saved == ([] if upload == "completes" else [1])


def test_a_shutdown_while_waiting_for_the_previous_checkpoint_saves_the_newer_step(tmp_path):
    """Checkpoints 1 and 2 came faster than Ray registers them: checkpoint 1 is still staged (its
    report blocked, a peer dead) when the training thread, having completed step 2, waits to
    stage checkpoint 2. Ray's shutdown callback then wakes the thread, whose save on failure
    writes step 2; the rescue of the staged step 1 and a late upload of it are refused. (Before,
    the callback rescued step 1 after its notice window: one checkpoint interval redone.) The
    model is a user's task with BatchNorm: the checkpoint holds step 2's buffers exactly."""
    write_csv(tmp_path / "points.csv")
    cfg = parse_config(
        {
            "data": {"path": str(tmp_path / "points.csv"), "create_demo_if_missing": False},
            "training": {"global_batch_size": 32},
            "task": {"name": "two_head_task:TwoHeadRegression", "options": {"hidden": 16}},
        }
    )
    worker = build_worker(cfg, cfg.model_dump(), LocalRuntime(cfg))
    worker.fs, worker.attempt = FS, "a1"
    worker.boundary = StepBoundary(worker.model, worker.task)
    worker.run_dir = str(tmp_path / "run")
    worker.runlog = RunLog(FS, worker.run_dir, worker.attempt)
    worker.saves.begin_attempt()
    for step in (1, 2):
        train_step(worker, step)
        record_step(worker, step, 0.01, {})
        step_completed(worker, step)
        worker.saves.recorded_step = step
        if step == 1:
            staged = worker.stager.stage({"model": worker.model.state_dict()})
            worker.saves.staged()
    worker.saves.offer_rescue(functools.partial(rescue_staged, worker, 1, staged))
    ended = []

    def training_thread():  # as attempt.run_attempt: a failure of the attempt saves on failure
        try:
            save_and_report(worker, 2, {})
        except ShutdownBegun as exc:
            ended.append(exc)
            save_on_failure(worker)
        finally:
            worker.saves.end_attempt()

    thread = threading.Thread(target=training_thread)
    thread.start()
    assert worker.saves.hold_shutdown(notice_within_s=5, hold_at_most_s=10) == "idle"
    thread.join(timeout=10)
    assert not thread.is_alive() and len(ended) == 1, ended
    saved = checkpoint.scan(FS, worker.run_dir)
    assert [c.step for c in saved] == [2]
    assert not worker.saves.upload_begins()  # checkpoint 1's upload, were Ray to begin it
    model = checkpoint.load(FS, saved[0].path)["model"]
    live = worker.model.state_dict()
    assert "body.1.running_mean" in model and model.keys() == live.keys()
    assert all(torch.equal(model[k], live[k]) for k in live), "not step 2's state"


def test_training_that_waits_for_a_checkpoint_still_in_flight_says_why_once(table, caplog):
    """Ray registers one checkpoint per controller poll: a save that outlasts the interval to
    the next checkpoint makes training wait, and the log names the two ways out, once."""
    worker = make_worker(table)

    def save_in_flight():
        worker.saves.staged()
        worker.saves.upload_begins()
        finisher = threading.Timer(0.1, worker.saves.upload_ended, args=(None,))  # still running
        finisher.start()
        return finisher

    for _ in range(2):
        finisher = save_in_flight()
        with caplog.at_level("WARNING", logger="training.worker.checkpointer"):
            wait_for_previous_save(worker)
        assert worker.saves.wait_until_free(0)
        finisher.join()
    wait_for_previous_save(worker)  # nothing in flight: no wait, no warning
    warnings = [r.getMessage() for r in caplog.records if "previous checkpoint" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "health-check interval" in warnings[0]
    assert "checkpoint.every_n_steps" in warnings[0]


def test_seed_step_draws_what_torch_manual_seed_draws_on_the_cpu():
    dropout = torch.nn.Dropout(0.5)
    torch.manual_seed(1234)
    expected = dropout(torch.ones(64))
    torch.manual_seed(99)
    data.seed_step(1234, torch.device("cpu"))
    assert torch.equal(dropout(torch.ones(64)), expected)
