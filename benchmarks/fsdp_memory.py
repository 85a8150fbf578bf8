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

``--torchrun`` also runs the same model, data and steps under ``torchrun`` with the same torch
threads per rank (``OMP_NUM_THREADS``): the torchrun baseline (``torchrun_baseline.py``: the
project's ``train_step`` in DDP) and a plain user's script (``torchrun_plain.py``: FSDP2 with
``fully_shard`` per block and on the root, and plain DDP), and prints steps/s side by side:

    .venv/bin/python -m benchmarks.fsdp_memory --world-sizes 2 --steps 4 --torchrun
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch
import yaml

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
    save = sharded.start_save(fs, str(directory / "sync"), worker.model, worker.optimizer, {})
    sharded.seal(fs, str(directory / "sync"), worker.comm, {}, save.entries())
    sync_s = time.perf_counter() - started
    worker.comm.barrier()
    started = time.perf_counter()
    save = sharded.start_save(
        fs, str(directory / "async"), worker.model, worker.optimizer, {}, side.group
    )
    async_s = time.perf_counter() - started
    save.wait()
    sharded.seal(fs, str(directory / "async"), side, {}, save.entries())
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
        "load": os.getloadavg()[0],
        "peers_built_mb": max(r["rss_built_mb"] for r in rows[1:]),
        "peers_peak_mb": max(r["peak_rss_mb"] for r in rows[1:]),
    }


BENCHMARKS = Path(__file__).resolve().parent
# (label, script, parallelism): the torchrun side of --torchrun, run after the project's rows.
TORCHRUN = [
    ("torchrun baseline (project's train_step)", "torchrun_baseline.py", "ddp"),
    ("torchrun plain", "torchrun_plain.py", "ddp"),
    ("torchrun plain", "torchrun_plain.py", "fsdp"),
]


def run_torchrun(
    script: str, parallelism: str, world: int, steps: int, threads: int, config_path: Path,
    tmp: Path,
) -> dict:  # fmt: skip
    """One torchrun job of ``steps`` + 1 steps; steps/s over its steps after the first, from
    each step's own timer (``step_s`` in rank 0's run log), as the project's rows time theirs."""
    run_dir = tmp / f"torchrun-{Path(script).stem}-{parallelism}-{world}"
    overrides = [f"training.parallelism={parallelism}", f"training.max_steps={steps + 1}",
                 "eval.batches=0"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), str(BENCHMARKS / script), "--config",
               str(config_path), *(a for o in overrides for a in ("--set", o)),
               "--run-dir", str(run_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{script} {parallelism} at {world} ranks:\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")  # fmt: skip
    events = [json.loads(line) for log in (run_dir / "runlog").glob("*.jsonl")
              for line in log.read_text().splitlines()]  # fmt: skip
    timed = [e["step_s"] for e in events if e["event"] == "step"][1:]  # after one warm-up
    start = next(e for e in events if e["event"] == "start")
    return {"steps_per_s": len(timed) / sum(timed), "threads": start["threads"],
            "load": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--save", action="store_true", help="fsdp: also time a sync and an async checkpoint"
    )
    parser.add_argument(
        "--torchrun", action="store_true",
        help="also time the same steps under torchrun (the baseline's DDP, a plain FSDP2 and "
        "DDP script) with the same threads per rank; steps/s side by side",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="passes over every configuration, in turn (--torchrun: median steps/s [min-max])",
    )  # fmt: skip
    args = parser.parse_args()
    from training import tasks

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i in range(args.repeats):
            (tmp / f"pass-{i}").mkdir()
        corpus = tmp / "corpus.txt"
        fs = pafs.LocalFileSystem()
        tasks.build(
            "language_model", {}, tasks.DataSource(fs, str(corpus), str(corpus), 0.1)
        ).write_demo()
        passes = [one_pass(args, corpus, tmp / f"pass-{i}") for i in range(args.repeats)]
    print_table({key: row for key, row in passes[0].items() if isinstance(key[0], str)})
    if args.torchrun:
        print_steps_table(passes)


def one_pass(args: argparse.Namespace, corpus: Path, tmp: Path) -> dict:
    """Every configuration once, one after the other: the project's ddp and fsdp, then (with
    ``--torchrun``) the torchrun side, at each world size."""
    rows = {}
    for world in args.world_sizes:
        for mode in ("ddp", "fsdp"):  # side by side, one after the other
            if args.save:  # the ranks save here (sharded.start_save), then it is deleted
                os.environ["SAVE_DIR"] = str(tmp / f"saves-{mode}-{world}")
            rows[mode, world] = run(mode, world, args.steps, args.threads, corpus, tmp)
        if args.torchrun:
            config_path = tmp / f"torchrun-{world}.yaml"
            raw = config(corpus, tmp / "runs", "ddp", world)
            raw["checkpoint"]["on_failure"] = None  # unset: ddp's true is refused under fsdp
            config_path.write_text(yaml.safe_dump(raw))
            for label, script, mode in TORCHRUN:
                rows[(label, mode), world] = run_torchrun(
                    script, mode, world, args.steps, args.threads, config_path, tmp
                )
    return rows


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


def print_steps_table(passes: list[dict]) -> None:
    """steps/s of every side, median [min-max] over the passes, with its torch threads per rank
    and the load average (1 min) at the end of its runs, as ratios of medians to the project's
    ddp at the same world size."""
    print(f"\nsteps/s, median [min-max] of {len(passes)} pass(es)\n")
    print("| side | mode | ranks | steps/s | threads/rank | load (1 min) | / project ddp |")
    print("|---|---|---|---|---|---|---|")
    median = {key: statistics.median(p[key]["steps_per_s"] for p in passes) for key in passes[0]}
    for key in passes[0]:
        (side, mode), world = (("project", key[0]), key[1]) if isinstance(key[0], str) else key
        rates = [p[key]["steps_per_s"] for p in passes]
        loads = [p[key]["load"] for p in passes]
        threads = sorted({p[key]["threads"] for p in passes})
        print(f"| {side} | {mode} | {world} | {median[key]:.3f} [{min(rates):.3f}-"
              f"{max(rates):.3f}] | {'/'.join(map(str, threads))} | {min(loads):.1f}-"
              f"{max(loads):.1f} | {median[key] / median['ddp', world]:.2f} |")  # fmt: skip
    for world in sorted({key[1] for key in median}):
        plain = (("torchrun plain", "fsdp"), world)
        if plain not in median:
            continue
        # Within a pass the runs are minutes apart: on a shared machine its ratio is the figure.
        within = [p["fsdp", world]["steps_per_s"] / p[plain]["steps_per_s"] for p in passes]
        print(f"\nsteps/s project fsdp / torchrun plain fsdp at {world} ranks: "
              f"{median['fsdp', world] / median[plain]:.2f} (medians); by pass "
              f"{', '.join(f'{r:.2f}' for r in within)}")  # fmt: skip
        for i, p in enumerate(passes):
            rates = ", ".join(f"{p[k]['steps_per_s']:.3f}" for k in p if k[1] == world)
            print(f"pass {i + 1} at {world} ranks, steps/s in the table's order: {rates}")


if __name__ == "__main__":
    main()
