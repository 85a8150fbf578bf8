"""Streamed vs in-memory tabular training on the same table, side by side (issue #15).

    python -m benchmarks.streaming                      # 417 MB table, 2 workers, 3 pairs
    python -m benchmarks.streaming --rows 100000 --repeats 1   # smaller and faster

For each mode (``task.options.stream`` false, then true; alternating, ``--repeats`` pairs, so
that load from other jobs on a shared machine hits both alike) it trains the same table on an
embedded local Ray with 2 CPU workers, SIGKILLs rank 1 before step ``--kill-at`` (chaos) and
lets the run resume, then reads the run log:
  steps/s     warm throughput of the first attempt: steps after ``--warmup`` over their wall
              time (step events' timestamps), and over the summed per-step timer (``step_s``);
  restart     the second attempt: worker start -> first step (the in-memory mode reads the
              whole table here), and the last step before the kill -> first step after it;
  reads       streamed: what each worker of the resumed attempt read (its log line).
Ratios are per pair, reported as median [min-max]. Every figure is printed next to the
settings that produced it; the JSON goes to ``benchmarks/results/streaming.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from training.core import runlog
from training.tasks import tabular

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000, help="table rows")
    parser.add_argument("--features", type=int, default=256, help="float32 feature columns")
    parser.add_argument("--row-group-rows", type=int, default=4096, help="rows per row group")
    parser.add_argument("--window", type=int, default=4, help="row groups shuffled together")
    parser.add_argument("--batch", type=int, default=1024, help="global batch size")
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (two layers)")
    parser.add_argument("--steps", type=int, default=300, help="global steps per run")
    parser.add_argument("--kill-at", type=int, default=220, help="SIGKILL rank 1 before this step")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of steps/s")
    parser.add_argument("--repeats", type=int, default=3, help="in-memory/streamed pairs")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    return parser.parse_args()


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "table": f"{args.rows} rows x {args.features} float32 features, "
        f"{args.row_group_rows}-row row groups",
        "workers": "2 CPU workers, embedded Ray",
        "model": f"MLP [{args.hidden}, {args.hidden}]",
        "global_batch_size": args.batch,
        "window": args.window,
        "steps": args.steps,
        "kill": f"rank 1 SIGKILLed before step {args.kill_at}, checkpoint every 100",
        "cpus": os.cpu_count(),
    }


def train(args: argparse.Namespace, runs: Path, table: Path, name: str, stream: bool) -> Path:
    overrides = {
        "run.name": name,
        "storage.path": str(runs),
        "data.path": str(table),
        "data.create_demo_if_missing": "false",
        "task.options.stream": str(stream).lower(),
        "task.options.window": str(args.window),
        "task.options.mlp.hidden_sizes": f"[{args.hidden}, {args.hidden}]",
        "training.global_batch_size": str(args.batch),
        "training.max_steps": str(args.steps),
        "training.log_every_n_steps": "50",
        "training.report_every_n_steps": "100000",
        "eval.batches": "2",
        "checkpoint.every_n_steps": "100",
        "chaos.faults": f"[{{kind: kill, rank: 1, step: {args.kill_at}}}]",
    }
    command = [sys.executable, "-m", "training", "train", "--config"]
    command.append(str(REPO / "training" / "configs" / "local.yaml"))
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DEDUP_LOGS"] = "0"  # every worker's streaming summary line
    log = runs / f"{name}.log"
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code.returncode != 0:
        raise SystemExit(f"{name} run failed ({code.returncode}); see {log}")
    return runs / name


READ_LINE = re.compile(r"streaming: read (\d+) row groups \((\d+) MB decoded\)")


def reads(log: Path) -> list[dict[str, int]]:
    """Row groups and decoded MB each worker of the last attempt read (their summary lines)."""
    found = READ_LINE.findall(log.read_text())
    return [{"row_groups": int(groups), "decoded_mb": int(mb)} for groups, mb in found]


def measure(run_dir: Path, warmup: int) -> dict[str, float]:
    events = runlog.read_events(pafs.LocalFileSystem(), str(run_dir))
    starts = [e for e in events if e["event"] == "start"]
    first, second = starts[0]["attempt"], starts[1]["attempt"]
    steps = [e for e in events if e["event"] == "step" and e["attempt"] == first][warmup:]
    after = [e for e in events if e["event"] == "step" and e["attempt"] == second]
    before_kill = max(e["time"] for e in events if e["event"] == "step" and e["attempt"] == first)
    wall = steps[-1]["time"] - steps[0]["time"]
    return {
        "steps_per_s_wall": (len(steps) - 1) / wall,
        "steps_per_s_step_timer": len(steps) / sum(e["step_s"] for e in steps),
        "restart_worker_start_to_first_step_s": after[0]["time"] - starts[1]["began"],
        "restart_kill_to_first_step_s": after[0]["time"] - before_kill,
    }


def main() -> int:
    args = parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-streaming-"))
    table = root / "table.parquet"
    if not table.exists():
        tabular.write_sharded_demo(
            pafs.LocalFileSystem(), str(table), args.rows, args.features, args.row_group_rows
        )
    results: dict[str, Any] = {"settings": settings(args), "table_mb": table.stat().st_size / MB}
    # Fresh run names every time: a run left by an earlier invocation would be resumed.
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=root))
    for repeat in range(args.repeats):
        for mode in ("memory", "stream"):  # A B A B: drifting load hits both modes alike
            name, started = f"{mode}-{repeat}", time.perf_counter()
            measured = measure(train(args, runs, table, name, mode == "stream"), args.warmup)
            if mode == "stream":
                measured["reads_per_worker"] = reads(runs / f"{name}.log")
            results.setdefault(mode, []).append(measured)
            print(f"{name}: {time.perf_counter() - started:.0f} s {json.dumps(measured)}")
    results["ratios"] = {key: spread(results, key) for key in RATIOS}
    print(json.dumps(results, indent=1))
    out = REPO / "benchmarks" / "results" / "streaming.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


MB = 2**20
RATIOS = (
    "steps_per_s_wall",
    "steps_per_s_step_timer",
    "restart_worker_start_to_first_step_s",
    "restart_kill_to_first_step_s",
)


def spread(results: dict[str, Any], key: str) -> dict[str, float]:
    """Streamed / in memory for each pair: median, min, max."""
    pairs = zip(results["memory"], results["stream"], strict=True)
    ratios = sorted(s[key] / m[key] for m, s in pairs)
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


if __name__ == "__main__":
    sys.exit(main())
