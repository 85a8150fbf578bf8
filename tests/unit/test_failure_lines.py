"""A failed attempt is one line on the console (which rank, where, why), and a run that fails
for good prints one line per failed rank; the full text stays one flag away (``--verbose``).
The errors are Ray Train's own, with the text Ray 2.60 gave for a SIGKILLed rank 1 and its
peer's broken all-reduce."""

from __future__ import annotations

import ray.exceptions
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import (
    UserExceptionWithTraceback,
    WorkerHealthCheckFailedError,
)

from training.driver.cli import _failure_lines
from training.observability import failures

DIED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
    "\tpid: 23015\n\tip: 192.0.2.2\nThe actor is dead because its worker process has died. "
    "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a "
    "connection error code 2. End of file. Some common causes include: (1) the process was "
    "killed by the OOM killer due to high memory usage, (2) ray stop --force is called."
)
WORKER_INFO = (
    "A worker health check failed.\nWorker info: Worker(\n  actor=Actor(RayTrainWorker, 81d0),\n"
    "  metadata=ActorMetadata(\n    hostname='vm',\n    node_ip='192.0.2.2',\n"
    "    pid=23015,\n  ),\n)"
)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/training/worker/attempt.py", line 262, in run_steps\n'
    "    lr = train_step(worker, global_step)\n"
    '  File "/app/training/worker/step.py", line 52, in train_step\n'
    "    worker.scaler.scale(out.loss * (len(chunk) / len(ids))).backward()\n"
    '  File "/venv/torch/autograd/graph.py", line 979, in _engine_run_backward\n'
    "    return Variable._execution_engine.run_backward(\n"
    "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:13234: Connection "
    "reset by peer\n"
)


def killed_and_its_peer() -> dict[int, Exception]:
    died = WorkerHealthCheckFailedError(WORKER_INFO, ray.exceptions.RayError(DIED))
    broken = UserExceptionWithTraceback(RuntimeError("Connection reset by peer"), TRACEBACK)
    return {1: died, 0: broken}


def test_a_failed_attempt_is_one_line_naming_each_rank():
    line = failures.attempt_failed(killed_and_its_peer())
    assert line == (
        "Attempt failed: rank 0 in train_step (training/worker/step.py:52): RuntimeError: "
        "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:13234: Connection reset by "
        "peer; rank 1 (pid 23015 on 192.0.2.2) died: SYSTEM_ERROR Worker unexpectedly exits "
        "with a connection error code 2. End of file. (full tracebacks: train --verbose)"
    )


def test_an_error_without_a_traceback_names_its_type():
    assert failures.describe(2, ValueError("bad")) == "rank 2: ValueError: bad"


def test_a_run_that_fails_for_good_prints_a_line_per_rank_unless_verbose():
    error = WorkerGroupError("[Rank 0 Error Snippet]:\n...", killed_and_its_peer())
    lines = _failure_lines(error, verbose=False)
    assert lines[0] == "Training failed: WorkerGroupError: Training failed due to worker errors:"
    assert lines[1].startswith("  rank 0 in train_step (training/worker/step.py:52)")
    assert lines[2].startswith("  rank 1 (pid 23015 on 192.0.2.2) died: SYSTEM_ERROR")
    assert "--verbose" in lines[3] and len(lines) == 4
    assert _failure_lines(error, verbose=True) == [f"Training failed: WorkerGroupError: {error}"]
    one_line = RuntimeError("the workers died")
    assert _failure_lines(one_line, verbose=False) == [
        "Training failed: RuntimeError: the workers died"
    ]
