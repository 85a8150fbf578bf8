"""The comparison point: the same model, data, global batch and steps in a plain torchrun script.

    torchrun --standalone --nproc-per-node 2 [--max-restarts N] benchmarks/torchrun_baseline.py \
        --config training/configs/local.yaml --set KEY=VALUE ... --run-dir DIR

It reuses the project's config, its task (``training.tasks``: data, model, batch, loss) and the
``training.data`` order functions, so each global step consumes exactly the samples the Ray loop's
step does, with the same optimizer and LR schedule (``training/optim.py``, Ray-free), and the same
evaluation (``eval.batches`` held-out global batches at each checkpoint or every
``eval.every_n_steps``): evaluation is the user's workload, not the price of fault tolerance, so
both sides of a comparison do it. It deliberately leaves out what the project adds on top of plain
DDP: the run log's ledger and metrics, Prometheus gauges, the checkpoint manifest and
``ray.train.report``.

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
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from training import data, tasks  # noqa: E402
from training.config import load_config  # noqa: E402
from training.optim import build_optimizer, build_scheduler  # noqa: E402

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
    device = torch.device("cpu")
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if cfg.training.precision == "fp16":  # it would need the loop's GradScaler
        raise SystemExit("torchrun_baseline: training.precision fp16 is not supported")
    dist.init_process_group(
        "nccl" if cfg.scaling.use_gpu else "gloo",
        init_method=f"file://{run_dir / 'rdzv' / f'attempt-{restart}'}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{rank}").write_text(str(os.getpid()))

    task = tasks.build(cfg.task.name, cfg.task.options, tasks.data_source(cfg))
    train, val = task.load()
    per_epoch = data.steps_per_epoch(len(train), cfg.training.global_batch_size)
    total = per_epoch * cfg.training.epochs
    if cfg.training.max_steps is not None:
        total = min(total, cfg.training.max_steps)

    torch.manual_seed(data.derive_seed(cfg.training.seed, "init"))
    model = task.build_model().to(device)
    model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.index is not None else None
    )
    optimizer = build_optimizer(cfg.training.optimizer, model)
    scheduler = build_scheduler(cfg.training.lr_schedule, optimizer, total)

    ckpt_dir = run_dir / "ckpt"
    restore_started = time.perf_counter()
    start_step, resumed_attempt = 0, None
    newest = newest_checkpoint(ckpt_dir)
    if newest is not None:
        state = torch.load(newest, map_location="cpu", weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, resumed_attempt = state["global_step"], state["attempt"]
    restore_s = time.perf_counter() - restore_started

    box = [f"{time.time_ns()}-{uuid.uuid4().hex[:6]}" if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    attempt = box[0]
    log = RunLog(run_dir, attempt) if rank == 0 else None
    if log:
        # The settings it ran under, where the harness reads them for a Ray run too.
        (run_dir / "run_config.json").write_text(cfg.model_dump_json(indent=1))
        log.write(
            "start",
            world_size=world,
            resumed_from_step=start_step if newest is not None else None,
            resumed_from_attempt=resumed_attempt,
            steps_per_epoch=per_epoch,
            total_steps=total,
            global_batch_size=cfg.training.global_batch_size,
            train_samples=len(train),
            process_started=PROCESS_STARTED,
            restore_s=restore_s,
            nice=os.getpriority(os.PRIO_PROCESS, 0),
        )

    orders: dict[int, torch.Tensor] = {}
    batch_size = cfg.training.global_batch_size
    for global_step in range(start_step + 1, total + 1):
        started = time.perf_counter()
        epoch, step_in_epoch = divmod(global_step - 1, per_epoch)
        if epoch not in orders:
            orders = {epoch: data.epoch_order(cfg.training.seed, epoch, len(train))}
        batch = data.global_batch(orders[epoch], step_in_epoch, batch_size)
        ids = data.rank_slice(batch, rank, world)
        data.seed_step(data.derive_seed(cfg.training.seed, "step", global_step, rank), device)
        model.train()
        batch_seed = data.derive_seed(cfg.training.seed, "batch", epoch)
        batch = tasks.to_device(task.batch(train, ids, batch_seed), device)
        with autocast(cfg, device):
            loss = task.step(model, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.training.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - started
        if log:
            log.write(
                "step",
                global_step=global_step,
                epoch=epoch,
                # float() of a GPU tensor waits for the step: on log steps only, as the Ray
                # loop reads its metrics (every step on the CPU, where it costs nothing).
                loss=float(loss.detach()) if log_loss(cfg, device, global_step) else None,
                step_s=round(elapsed, 6),
                world_size=world,
            )
        checkpoint_due = global_step % cfg.checkpoint.every_n_steps == 0 or global_step == total
        if cfg.eval.due(global_step, checkpoint_due):
            val_metrics = evaluate(task, model.module, val, cfg, rank, world, device)
            if log:
                log.write("eval", global_step=global_step, **val_metrics)
        if rank == 0 and checkpoint_due:
            blocked = time.perf_counter()
            save(ckpt_dir, model.module, optimizer, scheduler, global_step, attempt)
            log.write(
                "checkpoint", global_step=global_step, blocked_s=time.perf_counter() - blocked
            )
    if log:
        log.write("end", global_step=total)
    dist.barrier()
    dist.destroy_process_group()


def autocast(cfg, device: torch.device):
    """bf16 autocast as the Ray loop's ``training.precision`` gives it; fp32: a no-op."""
    enabled = cfg.training.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def log_loss(cfg, device: torch.device, global_step: int) -> bool:
    return device.type == "cpu" or global_step % cfg.training.log_every_n_steps == 0


@torch.no_grad()
def evaluate(
    task, model: nn.Module, val, cfg, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """The project's evaluation: the first ``eval.batches`` global batches of val, each sharded
    over the ranks, the task's totals summed over all ranks."""
    size = cfg.training.global_batch_size
    count = min(len(val), cfg.eval.batches * size)
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, count, size):
        ids = data.rank_slice(torch.arange(start, min(start + size, count)), rank, world)
        if len(ids):
            with autocast(cfg, device):
                totals_now = task.step(model, tasks.to_device(task.batch(val, ids, None), device))
            for key, value in totals_now.totals.items():
                totals[key] = totals[key] + value if key in totals else value
    keys = sorted(totals)
    # NCCL reduces device tensors only (a task may count on the CPU).
    summed = torch.stack([totals[k].float().to(device) for k in keys]) if keys else torch.zeros(0)
    dist.all_reduce(summed)
    summed_totals = dict(zip(keys, summed.tolist(), strict=True))
    return {f"val_{k}": v for k, v in task.metrics(summed_totals).items()}


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    found = sorted(p for p in ckpt_dir.iterdir() if CKPT.match(p.name))
    return found[-1] if found else None


def save(ckpt_dir: Path, model, optimizer, scheduler, global_step: int, attempt: str) -> None:
    """torch.save to a temp name, then rename: a kill mid-write never leaves a torn file."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    target = ckpt_dir / f"checkpoint_{global_step:09d}.pt"
    tmp = target.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
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
