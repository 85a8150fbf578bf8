"""The comparison point: the same model, data, global batch and steps in a plain torchrun script.

    torchrun --standalone --nproc-per-node 2 [--max-restarts N] benchmarks/torchrun_baseline.py \
        --config training/configs/local.yaml --set KEY=VALUE ... --run-dir DIR

Each global step and each evaluation is the project's own (``train_step``,
``evaluate``, ``close_interval`` on log steps, through ``runtime.LocalRuntime``): the same
samples, micro-batches, precision, clipping, optimizer and LR schedule as under Ray Train, so a
ratio measures what Ray Train and the project's fault tolerance cost, not two copies of a step.
Evaluation is the user's workload, not the price of fault tolerance, so both sides do it. It
leaves out what the project adds around the step: the run log's ledger, Prometheus gauges, the
two-phase checkpoint with its manifest, the save on failure and ``ray.train.report``.

It has its own simple checkpointing (rank 0 ``torch.save`` + rename every
``checkpoint.every_n_steps``) and resumes from the newest one, so ``torchrun --max-restarts``
can recover from a killed worker. With ``scaling.use_gpu`` each process trains on
``cuda:LOCAL_RANK`` over NCCL, under ``training.precision`` (fp32 or bf16 autocast), as the Ray
loop does. Rank 0 writes the same JSON-lines events as the project's run
log (``<run dir>/runlog/<attempt>.jsonl``: start/step/checkpoint/end), so one analysis serves
both; ``start`` also carries ``process_started`` (before torch was imported) and ``restore_s``.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports: start-up includes them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from training.driver.settings import load_config  # noqa: E402
from training.worker.attempt import build_worker  # noqa: E402
from training.worker.cadence import close_interval  # noqa: E402
from training.worker.context import Worker, unwrap  # noqa: E402
from training.worker.evaluation import evaluate  # noqa: E402
from training.worker.runtime import LocalRuntime  # noqa: E402
from training.worker.step import train_step  # noqa: E402

CKPT = re.compile(r"^checkpoint_(\d{9})\.pt$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    run_dir = Path(args.run_dir)
    # A fresh file rendezvous per torchrun restart: with the agent's shared TCP store, gloo's
    # full-mesh connect of a restarted worker group hung here (torch 2.13, --standalone).
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    (run_dir / "rdzv").mkdir(parents=True, exist_ok=True)
    if cfg.scaling.use_gpu:  # NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        "nccl" if cfg.scaling.use_gpu else "gloo",
        init_method=f"file://{run_dir / 'rdzv' / f'attempt-{restart}'}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    # The device, the model in DDP, as the Ray loop has them (the process group exists: the
    # runtime only reads rank and device).
    worker = build_worker(cfg, cfg.model_dump(), LocalRuntime(cfg))
    rank, world = worker.rank, worker.world_size
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{rank}").write_text(str(os.getpid()))

    ckpt_dir = run_dir / "ckpt"
    restore_started = time.perf_counter()
    start_step, resumed_attempt = 0, None
    newest = newest_checkpoint(ckpt_dir)
    if newest is not None:
        state = torch.load(newest, map_location="cpu", weights_only=True)
        unwrap(worker.model).load_state_dict(state["model"])
        worker.optimizer.load_state_dict(state["optimizer"])
        worker.scheduler.load_state_dict(state["scheduler"])
        start_step, resumed_attempt = state["global_step"], state["attempt"]
    restore_s = time.perf_counter() - restore_started

    attempt = worker.comm.broadcast_object(
        f"{time.time_ns()}-{uuid.uuid4().hex[:6]}" if rank == 0 else None
    )
    worker.attempt = attempt
    log = RunLog(run_dir, attempt) if rank == 0 else None
    total = worker.plan.total_steps
    if log:
        # The settings it ran under, where the harness reads them for a Ray run too.
        (run_dir / "run_config.json").write_text(cfg.model_dump_json(indent=1))
        log.write(
            "start",
            world_size=world,
            resumed_from_step=start_step if newest is not None else None,
            resumed_from_attempt=resumed_attempt,
            steps_per_epoch=worker.plan.steps_per_epoch,
            total_steps=total,
            global_batch_size=cfg.training.global_batch_size,
            train_samples=len(worker.train),
            process_started=PROCESS_STARTED,
            restore_s=restore_s,
            nice=os.getpriority(os.PRIO_PROCESS, 0),
            threads=torch.get_num_threads(),
        )

    for global_step in range(start_step + 1, total + 1):
        started = time.perf_counter()
        lr = train_step(worker, global_step)
        elapsed = time.perf_counter() - started
        checkpoint_due = global_step % cfg.checkpoint.every_n_steps == 0 or global_step == total
        step_metrics = {}
        # The interval's totals, summed over the ranks on log steps (one host sync), as the loop.
        if global_step % cfg.training.log_every_n_steps == 0 or checkpoint_due:
            step_metrics, _ = close_interval(worker, global_step, lr)
        if log:
            log.write(
                "step",
                global_step=global_step,
                epoch=worker.plan.position(global_step)[0],
                loss=step_metrics.get("loss"),
                step_s=round(elapsed, 6),
                world_size=world,
            )
        if cfg.eval.due(global_step, checkpoint_due):
            val_metrics = evaluate(worker, global_step)
            if log:
                log.write("eval", global_step=global_step, **val_metrics)
        if rank == 0 and checkpoint_due:
            blocked = time.perf_counter()
            save(ckpt_dir, worker, global_step, attempt)
            log.write(
                "checkpoint", global_step=global_step, blocked_s=time.perf_counter() - blocked
            )
    if log:
        log.write("end", global_step=total)
        log.file.close()
    worker.comm.barrier()  # every rank has finished before any exits
    # Out without tearing anything down. Freeing the DDP model after destroy_process_group
    # deadlocked one rank in about one run in ten under load (py-spy: the Reducer's dealloc,
    # holding the GIL, joins gloo's thread, which waits for the GIL to free a finished work's
    # tensors; torch 2.13). Nothing is left to flush but stdio.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    found = sorted(p for p in ckpt_dir.iterdir() if CKPT.match(p.name))
    return found[-1] if found else None


def save(ckpt_dir: Path, worker: Worker, global_step: int, attempt: str) -> None:
    """torch.save to a temp name, then rename: a kill mid-write never leaves a torn file."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    target = ckpt_dir / f"checkpoint_{global_step:09d}.pt"
    tmp = target.with_suffix(".tmp")
    state = {
        "model": unwrap(worker.model).state_dict(),
        "optimizer": worker.optimizer.state_dict(),
        "scheduler": worker.scheduler.state_dict(),
        "global_step": global_step,
        "attempt": attempt,
    }
    torch.save(state, tmp)
    os.replace(tmp, target)
    for old in sorted(p for p in ckpt_dir.iterdir() if CKPT.match(p.name))[:-2]:
        old.unlink(missing_ok=True)


class RunLog:
    def __init__(self, run_dir: Path, attempt: str):
        path = run_dir / "runlog" / f"{attempt}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt = attempt
        self.file = path.open("a", buffering=1)  # line-buffered, like the project's run log

    def write(self, event: str, **fields) -> None:
        line = {"event": event, "attempt": self.attempt, "time": time.time(), **fields}
        self.file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
