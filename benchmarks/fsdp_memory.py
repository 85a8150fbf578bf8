"""DDP vs FSDP2, side by side in one run: per-worker bytes of parameters, gradients and
optimizer state, peak process memory, and steps/s, at 2 and 4 ranks (gloo on CPU).

Each configuration runs the project's own worker (``attempt.build_worker`` + ``step.train_step``:
the same micro-batching, clipping and optimizer step as a training run) in freshly spawned
processes, as ``torchrun`` would start them, on the built-in language model ~57x the default's
size (d_model 512, 8 layers: ~25 M parameters vs ~0.44 M; 64-byte blocks, global batch 8).

    .venv/bin/python -m benchmarks.fsdp_memory            # prints a Markdown table
    .venv/bin/python -m benchmarks.fsdp_memory --steps 4 --world-sizes 2
    .venv/bin/python -m benchmarks.fsdp_memory --world-sizes 2 --save   # + checkpoint pauses

Figures are per rank: rank 0's, and the largest of its peers' process memory (under fsdp rank 0
alone builds the initial model); steps/s is measured after a warm-up step, with the thread count
of each rank printed beside it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch

MODEL = {"block_size": 64, "d_model": 512, "n_heads": 8, "n_layers": 8}
DEFAULT_MODEL = {"d_model": 128, "n_layers": 2}  # the built-in LM's defaults, for the ratio


def config(corpus: Path, storage: Path, parallelism: str, world: int) -> dict:
    from training.driver.settings import parse_config

    return parse_config(
        {
            "storage": {"path": str(storage)},
            "scaling": {"min_workers": world, "max_workers": world},
            "task": {"name": "language_model", "options": MODEL},
            "data": {"path": str(corpus)},
            "training": {"parallelism": parallelism, "global_batch_size": 8},
        }
    ).model_dump()


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def save_pauses(worker, directory: Path) -> dict:
    """fsdp: how long a checkpoint holds the training thread, synchronous (DCP's save and the
    seal: hashes, manifest) vs asynchronous (the staging copy; the rest in the background)."""
    from training.worker import sharded
    from training.worker.collectives import Collectives

    side, fs = Collectives.side_group(), pafs.LocalFileSystem()  # directory is a local path
    started = time.perf_counter()
    sharded.start_save(fs, str(directory / "sync"), worker.model, worker.optimizer, {})
    sharded.seal(fs, str(directory / "sync"), worker.comm, {})
    sync_s = time.perf_counter() - started
    worker.comm.barrier()
    started = time.perf_counter()
    written = sharded.start_save(
        fs, str(directory / "async"), worker.model, worker.optimizer, {}, side.group
    )
    async_s = time.perf_counter() - started
    written.result()
    sharded.seal(fs, str(directory / "async"), side, {})
    return {"sync_pause_s": sync_s, "async_pause_s": async_s,
            "async_total_s": time.perf_counter() - started}  # fmt: skip


def measure(config_dict: dict, steps: int, out: str) -> None:
    from training.core.config import Config
    from training.worker.attempt import build_worker
    from training.worker.runtime import LocalRuntime
    from training.worker.step import train_step

    cfg = Config.model_validate(config_dict)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker = build_worker(cfg, config_dict, LocalRuntime(cfg, init_method=os.environ["INIT"]))
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(worker, 1)  # warm-up: the optimizer state exists from here
    started = time.perf_counter()
    for step in range(2, steps + 2):
        train_step(worker, step)
    elapsed = time.perf_counter() - started
    params = list(worker.model.parameters())
    optimizer_state = [v for s in worker.optimizer.state.values() for v in s.values()]
    row = {
        "params_mb": local_bytes(params) / 2**20,
        "grads_mb": local_bytes(p.grad for p in params if p.grad is not None) / 2**20,
        "optimizer_mb": local_bytes(t for t in optimizer_state if t.dim() > 0) / 2**20,
        "rss_before_mb": rss_before / 1024,
        "rss_built_mb": rss_built / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_per_s": steps / elapsed,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in params) if cfg.training.parallelism == "ddp" else None,
    }
    if cfg.training.parallelism == "fsdp" and os.environ.get("SAVE_DIR"):
        row.update(save_pauses(worker, Path(os.environ["SAVE_DIR"])))
    torch.save(row, f"{out}.{worker.rank}")
    sys.stdout.flush()
    os._exit(0)


def _rank(rank: int, world: int, init: str, threads: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), INIT=init,
        LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads),
    )  # fmt: skip
    torch.set_num_threads(threads)
    measure(*args)


def run(parallelism: str, world: int, steps: int, threads: int, corpus: Path, tmp: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    out = tmp / f"{parallelism}-{world}.pt"
    cfg = config(corpus, tmp / "runs", parallelism, world)
    with tempfile.TemporaryDirectory() as rendezvous:
        init = f"file://{rendezvous}/store"
        ranks = [
            context.Process(target=_rank, args=(r, world, init, threads, (cfg, steps, str(out))))
            for r in range(world)
        ]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join()
    if any(p.exitcode for p in ranks):
        raise RuntimeError(
            f"{parallelism} at {world} ranks: exit codes {[p.exitcode for p in ranks]}"
        )
    rows = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    # Rank 0 may differ from its peers (it builds the initial model alone under fsdp).
    return {
        **rows[0],
        "peers_built_mb": max(r["rss_built_mb"] for r in rows[1:]),
        "peers_peak_mb": max(r["peak_rss_mb"] for r in rows[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--save", action="store_true", help="fsdp: also time a sync and an async checkpoint"
    )
    args = parser.parse_args()
    from training import tasks

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        fs = pafs.LocalFileSystem()
        tasks.build(
            "language_model", {}, tasks.DataSource(fs, str(corpus), str(corpus), 0.1)
        ).write_demo()
        rows = {}
        for world in args.world_sizes:
            for mode in ("ddp", "fsdp"):  # side by side, one after the other
                if args.save:  # the ranks save here (sharded.start_save), then it is deleted
                    os.environ["SAVE_DIR"] = str(tmp / f"saves-{mode}-{world}")
                rows[mode, world] = run(mode, world, args.steps, args.threads, corpus, tmp)
    print_table(rows)


def print_table(rows: dict) -> None:
    parameters = next(r["parameters"] for r in rows.values() if r["parameters"])
    base = 256 * DEFAULT_MODEL["d_model"] + 128 * DEFAULT_MODEL["d_model"]
    base += DEFAULT_MODEL["n_layers"] * 12 * DEFAULT_MODEL["d_model"] ** 2
    print(
        f"model: {parameters / 1e6:.2f} M parameters (~{parameters / base:.0f}x the default LM)\n"
    )
    print("| mode | ranks | params MB | grads MB | optimizer MB | sum MB | peak RSS MB | "
          "RSS before model MB | peak RSS built MB | peers: built / peak MB | steps/s | "
          "threads/rank |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, world), r in rows.items():
        total = r["params_mb"] + r["grads_mb"] + r["optimizer_mb"]
        print(
            f"| {mode} | {world} | {r['params_mb']:.1f} | {r['grads_mb']:.1f} | "
            f"{r['optimizer_mb']:.1f} | {total:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_before_mb']:.0f} | {r['rss_built_mb']:.0f} | "
            f"{r['peers_built_mb']:.0f} / {r['peers_peak_mb']:.0f} | {r['steps_per_s']:.2f} | "
            f"{r['threads']} |"
        )
    for (mode, world), r in rows.items():
        if "sync_pause_s" in r:
            print(
                f"\n{mode} at {world} ranks, checkpoint pause of the training thread (rank 0): "
                f"sync {r['sync_pause_s']:.3f} s, async {r['async_pause_s']:.3f} s "
                f"(written and sealed {r['async_total_s']:.3f} s after it began)"
            )
    for world in sorted({w for _, w in rows}):
        if ("ddp", world) in rows and ("fsdp", world) in rows:
            ratio = rows["fsdp", world]["steps_per_s"] / rows["ddp", world]["steps_per_s"]
            print(f"\nsteps/s fsdp / ddp at {world} ranks: {ratio:.2f}")


if __name__ == "__main__":
    main()
