"""A failed attempt in one line: which ranks failed, on which node, and in what, from what Ray
Train knows. Ray Train's own console logging (a full dict per report, several tracebacks per
failure) is turned down to errors that end the run (``RUN_LOG_LEVEL``); everything it logs,
tracebacks included, still goes to its log files (``logs/train/`` in the Ray session directory),
and ``train --verbose`` puts them back on the console."""

from __future__ import annotations

import re
from typing import Any

from ray.train import UserCallback

# Ray Train's console level for the `ray.train` loggers (RunConfig's LoggingConfig).
QUIET_LOG_LEVEL, VERBOSE_LOG_LEVEL = "CRITICAL", "INFO"
LONGEST = 160  # characters of an error message shown in the line


class FailureLines(UserCallback):
    """Runs in Ray Train's controller, whose output reaches the driver's console."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        del run_context
        print(attempt_failed(worker_exceptions), flush=True)


def attempt_failed(worker_exceptions: dict[int, BaseException]) -> str:
    ranks = "; ".join(describe(rank, worker_exceptions[rank]) for rank in sorted(worker_exceptions))
    return f"Attempt failed: {ranks} (full tracebacks: train --verbose)"


def describe(rank: int, error: BaseException) -> str:
    """``rank 1 (pid 42 on 10.0.0.2) died: <why>`` for a worker whose process ended, else
    ``rank 0 in train_step (training/worker/step.py:52): RuntimeError: <message>``."""
    text = str(error)
    exit_type = re.search(r"Worker exit type: (\w+)(?: Worker exit detail: ([^\n]*))?", text)
    if exit_type:
        pid, node = re.search(r"\bpid[=:] ?(\d+)", text), re.search(r"node_ip='([^']+)'", text)
        where = f" (pid {pid.group(1)}" if pid else ""
        where += f" on {node.group(1)})" if node and pid else (")" if pid else "")
        # Ray's detail goes on with a list of what might have killed a process: not this one.
        detail = (exit_type.group(2) or "").split(" Some common causes")[0]
        return f"rank {rank}{where} died: {exit_type.group(1)} {_short(detail)}".rstrip()
    lines = [line for line in text.splitlines() if line.strip()]
    frames = re.findall(r'File "[^"]*/(training/[^"]+)", line (\d+), in (\w+)', text)
    where = f" in {frames[-1][2]} ({frames[-1][0]}:{frames[-1][1]})" if frames else ""
    last = lines[-1].strip() if lines else type(error).__name__
    if not frames and ":" not in last.split(" ", 1)[0]:
        last = f"{type(error).__name__}: {last}"
    return f"rank {rank}{where}: {_short(last)}"


def _short(message: str) -> str:
    return message if len(message) <= LONGEST else message[: LONGEST - 3] + "..."
