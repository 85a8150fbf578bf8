"""Run every benchmark, side by side, and write ``benchmarks/results/results.{md,json,png}``.

    python -m benchmarks                 # full mode: the numbers (about 35 minutes on 2 cores)
    python -m benchmarks --plan device   # n=3, fewer and shorter scenarios (~9.5 min, 16 cores)
    python -m benchmarks --quick         # CI smoke: tiny sizes, one repetition (a few minutes)
    python -m benchmarks --plan gpu      # one GPU: the table of issue 25 (make gpu-check, ~6 min)
    python -m benchmarks --plan gpu-dry  # the same plan on the CPU, tiny sizes (CI, ~2 min)

Scenarios (see README "Benchmarks"):
  floor     in-memory copy, serialization, raw write bandwidth and load of the checkpoint state
  overhead  the project's loop under Ray Train (the CLI, cold, shipped config) vs the same
            model, data, global batch and steps in plain torchrun DDP, launched alternately;
            start-up and steps/s, for the demo MLP and the language-model task
  cadence   steady-state steps/s for report/checkpoint cadences and the health-check interval
  stall     how long training pauses per checkpoint, sync vs async upload, 10/100/500 MB state
  recovery  worker SIGKILL -> first step after resume, by phase; Ray defaults, a shorter
            health-check interval, and torchrun --max-restarts
  goodput   a worker killed every T seconds from the first step: effective steps x the
            no-failure step period (the overhead scenario's runs of the same config) / wall time
  exact     rank 0 SIGKILLed mid-run (chaos) with training.deterministic: kill -> first step,
            steps redone, final weights bitwise equal to an uninterrupted run, `training verify`

"Project defaults" is the shipped config (training/configs/local.yaml, language_model.yaml)
with nothing forced: the harness sets no RAY_TRAIN_* variable unless a row says so, and every
row states the settings it ran under, read back from the run's own files.
Exits non-zero when any run fails or a scenario cannot be measured (the harness is broken).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import analyze, cpu, floor, launch, report
from benchmarks.analyze import stats
from benchmarks.launch import KillPlan, Watch
from training.driver.settings import load_config

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "training" / "configs" / "local.yaml"
NEVER = 10**9  # a cadence that never fires (a checkpoint is still written at the last step)
HC = analyze.HC

# State of an MLP [h, h] + AdamW is about 12 bytes per parameter, ~h^2 parameters.
SIZES = {
    "tiny": [64, 64],
    "10 MB": [900, 900],
    "100 MB": [2870, 2870],
    "500 MB": [6450, 6450],
    "2 GB": [13100, 13100],  # 2.06 GB
}

# The overhead scenario's workloads: the shipped config of each, and the data file it reads.
TASKS = {
    "mlp": ("demo MLP (tabular)", REPO / "training" / "configs" / "local.yaml", "demo.parquet"),
    "lm": (
        "language model",
        REPO / "training" / "configs" / "language_model.yaml",
        "stdlib-docstrings.txt",
    ),
}

# A plan for one issue's rows: n = 3, every scenario empty unless the plan names it.
ONLY: dict[str, Any] = {
    "reps": 3,
    "floor_sizes": [],
    "overhead": {},
    "cadence_steps": 0,
    "cadence": [],
    "stall_sizes": [],
    "stall_steps": 0,
    "recovery": [],
    "recovery_steps": 0,
    "kill_after_s": 0.0,
    "goodput": [],
    "timeout_s": 900,
}
# Checkpoint pause vs the copy floor at 10/100/500 MB, async upload.
STALL_ROWS: dict[str, Any] = {
    "floor_sizes": ["10 MB", "100 MB", "500 MB"],
    "stall_sizes": ["10 MB", "100 MB", "500 MB"],
    "stall_modes": ["async"],
    "stall_steps": 36,
}

# Issue 25's GPU check: every run on one GPU worker in bf16 (NCCL); the language model scaled to
# keep an H200 busy. The dry run is the same plan on one CPU worker (gloo) at tiny sizes.
ONE_GPU = {
    "scaling.use_gpu": True,
    "scaling.min_workers": 1,
    "scaling.max_workers": 1,
    "training.precision": "bf16",
}
LM_ON_GPU = {
    "task.options.d_model": 512,
    "task.options.n_layers": 8,
    "task.options.n_heads": 8,
    "task.options.block_size": 256,
    "training.global_batch_size": 64,
}
GPU_PLAN: dict[str, Any] = {
    **ONLY,
    "scenarios": ["floor", "overhead", "ray_scenarios"],
    "overrides": {"lm": {**ONE_GPU, **LM_ON_GPU}, "mlp": ONE_GPU},
    "overhead": {"lm": 200},
    # Checkpoints at 100, 200, 300; rank 0 dies before step 280, late enough for the background
    # save of 200 to have ended (a kill during it resumes from 100: the row says what was redone).
    "exact": {"steps": 300, "every": 100, "kill_step": 280},
    "floor_sizes": [],
    "device_floor_sizes": ["2 GB"],
    "stall_sizes": ["2 GB"],
    "stall_modes": ["async"],
    "stall_steps": 18,  # checkpoints at 6, 12, 18: two pauses a run (the last has no step after)
    # cuBLAS is deterministic only with a fixed workspace; set before the Ray session starts,
    # so its workers inherit it (the exact-resume runs).
    "session_env": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "table": True,
    "timeout_s": 300,
    # The whole plan's wall-clock limit: a scenario that would start after it is left out and the
    # run fails by name, so the device call (10 min, 15 min a session) always returns results.
    "deadline_s": 400,
}
ONE_CPU = {**ONE_GPU, "scaling.use_gpu": False}
TINY_LM = {
    "task.options.d_model": 32,
    "task.options.n_layers": 1,
    "task.options.n_heads": 2,
    "task.options.block_size": 32,
    "training.global_batch_size": 8,
}
GPU_DRY_RUN: dict[str, Any] = {
    **GPU_PLAN,
    "reps": 1,
    "overrides": {"lm": {**ONE_CPU, **TINY_LM}, "mlp": ONE_CPU},
    "overhead": {"lm": 30},
    "exact": {"steps": 12, "every": 4, "kill_step": 10},
    "device_floor_sizes": ["tiny"],
    "stall_sizes": ["tiny"],
    "stall_steps": 12,
    "session_env": {},
    "deadline_s": None,  # 2 busy cores: 3.5-6.5 min measured; the dry run checks the plan runs
}

PLANS: dict[str, dict[str, Any]] = {
    "gpu": GPU_PLAN,
    "gpu-dry": GPU_DRY_RUN,
    # Issue 12's rows alone: cold start-up and recovery, Ray Train vs torchrun (~7 min on 2
    # quiet cores).
    "restart": {
        **ONLY,
        "scenarios": ["overhead", "ray_scenarios"],
        "overhead": {"mlp": 300},
        "recovery": ["project", "no_spares"],
        # A failure long after the start: the spares have finished their imports (up to ~12 s
        # on 2 busy cores); each kill's row says whether the new rank 0 ran in one.
        "recovery_steps": 8000,
        "kill_after_s": 20.0,
    },
    # Issue 11's steady-state rows: the shipped configs under Ray Train vs torchrun (~13 min).
    "overhead": {**ONLY, "scenarios": ["overhead"], "overhead": {"mlp": 1500, "lm": 400}},
    # Issue 11's checkpoint pause alone (~5 min).
    "stall": {**ONLY, **STALL_ROWS, "scenarios": ["floor", "ray_scenarios"]},
    # Issue 11's pause and goodput with a worker killed every 60 s, Ray vs torchrun; goodput
    # needs the MLP's no-failure rate from the overhead scenario of the same run (~13 min).
    "pause": {
        **ONLY,
        **STALL_ROWS,
        "scenarios": ["floor", "overhead", "ray_scenarios", "goodput"],
        "overhead": {"mlp": 1500},
        "goodput": [("ray", 60, 180), ("torchrun", 60, 180)],
        "timeout_s": 1500,
    },
    # Goodput alone: a worker killed every 60 s, Ray vs torchrun, with the MLP's no-failure
    # rate from the overhead scenario of the same run (~10 min).
    "goodput": {
        **ONLY,
        "scenarios": ["overhead", "goodput"],
        "overhead": {"mlp": 1500},
        "goodput": [("ray", 60, 180), ("torchrun", 60, 180)],
        "timeout_s": 1500,
    },
    "quick": {
        "reps": 1,
        "floor_sizes": ["10 MB"],
        "overhead": {"mlp": 200},
        "cadence_steps": 40,
        "cadence": ["never", "report_10"],
        "stall_sizes": ["10 MB"],
        "stall_steps": 12,
        "recovery": ["project"],
        "recovery_steps": 1000,
        "kill_after_s": 1.0,
        # (launcher, kill every T s, training seconds to aim for without failures)
        "goodput": [("torchrun", 4, 9)],
        "timeout_s": 420,
    },
    "full": {
        "reps": 3,
        "floor_sizes": ["10 MB", "100 MB", "500 MB"],
        "overhead": {"mlp": 1500, "lm": 400},  # steps
        "cadence_steps": 1000,
        # report_1 exists (see CADENCE) but is left out to keep the full run near 30 minutes:
        # the per-report pause gives its cost.
        "cadence": ["never", "report_10", "local_yaml", "ckpt_10", "local_yaml_hc2"],
        "stall_sizes": ["10 MB", "100 MB", "500 MB"],
        "stall_steps": 36,
        "recovery": ["project", "before"],
        "recovery_steps": 2000,
        "kill_after_s": 4.0,
        "goodput": [("ray", 30, 120), ("ray", 60, 180), ("torchrun", 30, 90)],
        "timeout_s": 1500,
    },
    # For a short session on a quiet 16-core machine (~9.5 min, inside one 10-minute device
    # call): n=3 where it counts, no cadence sweep or goodput, the shipped async upload only,
    # recovery at the project defaults vs torchrun, the kill late enough for the warm spares.
    "device": {
        **ONLY,
        **STALL_ROWS,
        "stall_steps": 24,
        "overhead": {"mlp": 1000},
        "recovery": ["project"],
        "recovery_steps": 5000,
        "kill_after_s": 10.0,
        "timeout_s": 420,
    },
}

# label, overrides, env, steps cap (each sync report waits for the controller's poll, up to
# the health-check interval, so frequent-report runs are kept short). No row sets more than
# it says: the rest is the shipped local.yaml (its health check, checkpoint every 100 with
# async upload, no metrics-only reports); each row's settings column states the values.
CADENCE: dict[str, tuple[str, dict[str, Any], dict[str, str], int | None]] = {
    "never": (
        "no report, no checkpoint until the end",
        {"training.report_every_n_steps": NEVER, "checkpoint.every_n_steps": NEVER},
        {},
        600,
    ),
    "report_1": (
        "report every step",
        {"training.report_every_n_steps": 1, "checkpoint.every_n_steps": NEVER},
        {},
        12,
    ),
    "report_10": (
        "report every 10 steps",
        {"training.report_every_n_steps": 10, "checkpoint.every_n_steps": NEVER},
        {},
        60,
    ),
    "local_yaml": ("shipped local.yaml, nothing forced", {}, {}, None),
    "ckpt_10": (
        "checkpoint every 10 steps",
        {"checkpoint.every_n_steps": 10},
        {},
        60,
    ),
    "local_yaml_hc2": (
        f"shipped local.yaml with Ray's default {HC}=2",
        {},
        {HC: "2"},
        None,
    ),
}
STALL_MODES = ("sync", "async")
# A checkpoint every 6 steps: the background save of the previous one has ended (measured: the
# dip column), so the pause is the checkpoint's own and steps with no save in flight are left to
# compare with.
STALL_EVERY = 6
STALL_FIGURES = ("paused_s", "blocked_s", "save_dip")
# label, env, overrides
RECOVERY: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "project": (
        "project defaults: warm spares, rank 0 saves on failure",
        {},
        {},
    ),
    "no_spares": (
        "project defaults without warm spares (failure.spare_workers: false)",
        {},
        {"failure.spare_workers": False},
    ),
    "before": (
        "periodic checkpoints only (checkpoint.on_failure: false)",
        {},
        {"checkpoint.on_failure": False},
    ),
}


def steady_cpu(sampler: cpu.Sampler, evs: list[dict[str, Any]], run_root: int) -> Any:
    """Cores each group of processes used over the window the steady rate is taken from."""
    runs = analyze.attempts(evs)
    window = analyze.steady_window(runs[0]["steps"]) if runs else []
    if len(window) < 2:
        return None
    return sampler.window(window[0]["time"], window[-1]["time"], run_root)


class Bench:
    def __init__(self, mode: str, workdir: Path, out: Path):
        self.mode, self.plan = mode, PLANS[mode]
        self.workdir, self.out = workdir, out
        self.runs_dir = workdir / "runs"
        self.logs_dir = out / "logs"
        self.data_dir = workdir / "data"
        self.failures: list[str] = []
        self.results: dict[str, Any] = {"mode": mode}
        self.counter = 0
        self.ray_tmp = f"/tmp/etb-ray-{os.getpid()}"

    # ---- plumbing -------------------------------------------------------------------------

    def name(self, tag: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{tag}"

    def overrides(
        self, name: str, steps: int, extra: dict[str, Any], task: str = "mlp"
    ) -> list[str]:
        values = {
            "run.name": name,
            "storage.path": str(self.runs_dir),
            "data.path": str(self.data_dir / TASKS[task][2]),
            "data.create_demo_if_missing": True,
            "training.epochs": 1000,
            "training.max_steps": steps,
            **self.plan.get("overrides", {}).get(task, {}),  # the plan's, e.g. one GPU worker
            **extra,
        }
        return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", PYTHONPATH=str(REPO))
        # A private Ray temp dir: `ray.init()` without an address otherwise joins the newest
        # cluster another process started on this machine with `ray start` (and the CLI then
        # fails: "num_cpus ... must not be provided"). Short: Ray's socket paths are limited.
        env["RAY_TMPDIR"] = self.ray_tmp
        # Nothing else is forced: a run gets the config's health-check interval unless its
        # scenario row sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (and says so).
        env.update(extra or {})
        return env

    def launch(self, cmd: list[str], tag: str, env: dict[str, str] | None = None):
        log = self.logs_dir / f"{tag}.log"
        return launch.Launched(cmd, self.env(env), log, REPO)

    def supervise(self, launched, watches: list[Watch]) -> int:
        rc = launch.run(launched, watches, self.timeout_s())
        for w in watches:
            if w.status != "ok" or rc != 0:
                self.failures.append(f"run {w.name}: status {w.status}, exit code {rc}")
        return rc

    def ray_cli(
        self, steps: int, extra: dict[str, Any], tag: str, task: str = "mlp"
    ) -> tuple[Watch, Any]:
        name = self.name(tag)
        cmd = [sys.executable, "-m", "training", "train", "--config", str(TASKS[task][1])]
        for item in self.overrides(name, steps, extra, task):
            cmd += ["--set", item]
        launched = self.launch(cmd, name)
        watch = Watch(name, self.runs_dir / name, "ray")
        watch.begin = launched.launched_at
        rc = launch.run(launched, [watch], self.timeout_s())
        watch.end, watch.status = time.time(), "ok" if rc == 0 else "failed"
        if rc != 0:
            self.failures.append(f"run {name}: exit code {rc} (log {launched.log_path})")
        return watch, launched

    def torchrun(
        self,
        steps: int,
        extra: dict[str, Any],
        tag: str,
        kill: KillPlan | None = None,
        task: str = "mlp",
    ) -> tuple[Watch, Any]:
        name = self.name(tag)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        config = str(TASKS[task][1])
        # As many processes as Ray's largest worker group: the same config, resolved.
        workers = load_config(config, self.overrides(name, steps, extra, task)).scaling.max_workers
        cmd += ["--nproc-per-node", str(workers), "--max-restarts", "100" if kill else "0"]
        cmd += [str(REPO / "benchmarks" / "torchrun_baseline.py"), "--config", config]
        for item in self.overrides(name, steps, extra, task):
            cmd += ["--set", item]
        cmd += ["--run-dir", str(self.runs_dir / name)]
        launched = self.launch(cmd, name)
        watch = Watch(name, self.runs_dir / name, "torchrun", kill=kill)
        self.supervise(launched, [watch])
        return watch, launched

    def session(self, runs: list[dict[str, Any]], tag: str) -> tuple[list[Watch], Any]:
        """Several Ray runs in one Ray instance; each run dict: tag, steps, overrides, env, kill."""
        specs, watches = [], []
        for r in runs:
            name, task = self.name(r["tag"]), r.get("task", "mlp")
            specs.append(
                {
                    "name": name,
                    "config": str(TASKS[task][1]),
                    "overrides": self.overrides(name, r["steps"], r.get("overrides", {}), task),
                    "env": r.get("env", {}),
                }
            )
            watches.append(Watch(name, self.runs_dir / name, "ray", kill=r.get("kill")))
        spec_path = self.workdir / f"session-{tag}.json"
        spec_path.write_text(json.dumps(specs, indent=1))
        launched = self.launch(
            [sys.executable, "-m", "benchmarks.ray_session", str(spec_path)],
            tag,
            self.plan.get("session_env"),
        )
        self.supervise(launched, watches)
        return watches, launched

    def cleanup(self, watch: Watch) -> None:
        shutil.rmtree(watch.run_dir / "ckpt", ignore_errors=True)
        for path in watch.run_dir.glob("checkpoint_*"):
            shutil.rmtree(path, ignore_errors=True)

    # ---- scenarios ------------------------------------------------------------------------

    def floor(self) -> None:
        reps = max(3, self.plan["reps"]) if self.mode != "quick" else 1
        self.results["floor"] = [
            {"label": label, **floor.measure(SIZES[label], self.workdir / "floor", reps)}
            for label in self.plan["floor_sizes"]
        ]
        self.results["device_floor"] = [
            {"label": label, **floor.device_to_host(SIZES[label], reps)}
            for label in self.plan.get("device_floor_sizes", [])
        ]

    def overhead(self) -> None:
        self.results["overhead"] = {
            task: self.overhead_task(task, steps) for task, steps in self.plan["overhead"].items()
        }

    def overhead_task(self, task: str, steps: int) -> dict[str, Any]:
        """Ray (the CLI, the shipped config) and torchrun on the same workload, alternately."""
        per: dict[str, list[dict[str, Any]]] = {"ray": [], "torchrun": []}
        settings: dict[str, dict[str, Any]] = {}
        for rep in range(self.plan["reps"]):
            order = ["torchrun", "ray"] if rep % 2 == 0 else ["ray", "torchrun"]
            for kind in order:
                run = self.ray_cli if kind == "ray" else self.torchrun
                with cpu.Sampler() as sampler:
                    watch, launched = run(steps, {}, f"overhead-{task}-{kind}", task=task)
                evs = analyze.events(watch.run_dir)
                measured = analyze.no_fault_run(evs, launched.launched_at)
                measured["wall_s"] = (watch.end or time.time()) - launched.launched_at
                measured["cpu"] = steady_cpu(sampler, evs, launched.proc.pid)
                per[kind].append(measured)
                settings[kind] = analyze.settings(watch.run_dir)
                self.cleanup(watch)
        out: dict[str, Any] = {"task": TASKS[task][0], "steps": steps, "runs": per}
        for kind, rows in per.items():
            out[kind] = {
                key: stats([r.get(key) for r in rows])
                for key in ("startup_s", "steps_per_s", "compute_steps_per_s", "wall_s")
            }
            out[kind]["settings"] = analyze.describe(settings.get(kind, {}), kind)
            out[kind]["cpu"] = {
                group: stats([(r.get("cpu") or {}).get(group) for r in rows])
                for group in cpu.GROUPS
            }
        pairs = list(zip(per["ray"], per["torchrun"], strict=False))
        for key, name in (
            ("steps_per_s", "ratio_steps_per_s"),
            ("compute_steps_per_s", "ratio_compute_steps_per_s"),
            ("startup_s", "ratio_startup"),
        ):
            out[name] = stats([_ratio(r.get(key), t.get(key)) for r, t in pairs])
        return out

    # The Ray scenarios share one Ray instance (one session process): Ray's own start-up is
    # paid once, and the cold start-up of the CLI is measured in `overhead`.

    def cadence_runs(self) -> list[dict[str, Any]]:
        runs = []
        for _ in range(self.plan["reps"]):
            for key in self.plan["cadence"]:
                _, extra, env, cap = CADENCE[key]
                steps = min(cap or NEVER, self.plan["cadence_steps"])
                runs.append(
                    {
                        "tag": f"cadence-{key}",
                        "steps": steps,
                        "overrides": extra,
                        "env": env,
                        "scenario": "cadence",
                        "key": key,
                    }
                )
        return runs

    def cadence(self, runs, watches, launched) -> None:
        per: dict[str, list[dict[str, Any]]] = {k: [] for k in self.plan["cadence"]}
        pauses: dict[str, list[float]] = {k: [] for k in self.plan["cadence"]}
        settings: dict[str, str] = {}
        for r, w in zip(runs, watches, strict=True):
            if w.begin is None:
                continue
            evs = analyze.events(w.run_dir)
            per[r["key"]].append(analyze.no_fault_run(evs, w.begin))
            ran = analyze.settings(w.run_dir, r["env"])
            settings[r["key"]] = analyze.describe(ran)
            every = ran.get("report_every")
            for attempt in analyze.attempts(evs)[:1] if every else []:
                pauses[r["key"]] += analyze.report_pauses(attempt, every)
            self.cleanup(w)
        base = [r.get("steps_per_s") for r in per.get("never", [])]
        rows = []
        for key, measured in per.items():
            rates = [m.get("steps_per_s") for m in measured]
            ckpts = [c for m in measured for c in m.get("checkpoints", [])[:-1]]  # not the last
            rows.append(
                {
                    "key": key,
                    "label": CADENCE[key][0],
                    "settings": settings.get(key, "not measured"),
                    "steps": min(CADENCE[key][3] or NEVER, self.plan["cadence_steps"]),
                    "steps_per_s": stats(rates),
                    "ratio_vs_never": stats(
                        [_ratio(a, b) for a, b in zip(rates, base, strict=False)]
                    ),
                    "fit_to_first_step_s": stats([m.get("startup_s") for m in measured]),
                    "report_paused_s": stats(pauses[key]),
                    "checkpoint_paused_s": stats([c["paused_s"] for c in ckpts]),
                    "checkpoint_blocked_s": stats([c["blocked_s"] for c in ckpts]),
                }
            )
        self.results["cadence"] = rows

    def stall_runs(self) -> list[dict[str, Any]]:
        runs = []
        for label in self.plan["stall_sizes"]:
            for mode in self.plan.get("stall_modes", STALL_MODES):
                extra = {
                    "task.options.mlp.hidden_sizes": SIZES[label],
                    "checkpoint.every_n_steps": STALL_EVERY,
                    "checkpoint.num_to_keep": NEVER,  # every manifest's time: when it ended
                    "checkpoint.upload": mode,
                    "training.report_every_n_steps": NEVER,
                    "training.log_every_n_steps": 1,
                    # The pause of the checkpoint itself: evaluation (on checkpoint steps by
                    # default) would add its forward passes, seconds at 500 MB.
                    "eval.batches": 0,
                }
                runs += [
                    {
                        "tag": f"stall-{label.replace(' ', '')}-{mode}-{rep}",
                        "steps": self.plan["stall_steps"],
                        "overrides": extra,
                        "label": label,
                        "mode": mode,
                        "scenario": "stall",
                    }
                    for rep in range(self.plan["reps"])
                ]
        return runs

    def stall(self, runs, watches, launched) -> None:
        """One row per state size and upload mode: each figure is the median over the runs of
        that run's own median (its checkpoints), as median [min-max] (n = runs)."""
        per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r, w in zip(runs, watches, strict=True):
            evs = analyze.events(w.run_dir) if w.begin else []
            attempt = (analyze.attempts(evs) or [None])[0]
            saved = analyze.saves_ended(w.run_dir) if attempt else {}
            ckpts = analyze.checkpoint_stalls(attempt, saved) if attempt else []
            if not ckpts:
                self.failures.append(f"stall {r['tag']}: no checkpoint measured")
            per_run.setdefault((r["label"], r["mode"]), []).append(
                {
                    "settings": analyze.describe(analyze.settings(w.run_dir)),
                    "checkpoints": len(ckpts),
                    # the last checkpoint has no step after it: its pause cannot be seen
                    "paused_s": stats([c["paused_s"] for c in ckpts[:-1]])["median"],
                    "blocked_s": stats([c["blocked_s"] for c in ckpts])["median"],
                    "save_dip": analyze.save_dip(attempt, saved) if attempt else None,
                }
            )
            self.cleanup(w)
        self.results["stall"] = [
            {
                "size": size,
                "mode": mode,
                "settings": measured[0]["settings"],
                "checkpoints": [m["checkpoints"] for m in measured],
                **{key: stats([m[key] for m in measured]) for key in STALL_FIGURES},
            }
            for (size, mode), measured in per_run.items()
        ]

    def recovery_runs(self) -> list[dict[str, Any]]:
        return [
            {
                "tag": f"recovery-{key}",
                "steps": self.plan["recovery_steps"],
                "overrides": {"failure.max_failures": -1, **RECOVERY[key][2]},
                "env": RECOVERY[key][1],
                "kill": KillPlan(self.plan["kill_after_s"]),
                "key": key,
                "scenario": "recovery",
            }
            for _ in range(self.plan["reps"])
            for key in self.plan["recovery"]
        ]

    def recovery(self, runs, watches, launched) -> None:
        per: dict[str, list[dict[str, Any]]] = {k: [] for k in self.plan["recovery"]}
        per["torchrun"] = []
        for r, w in zip(runs, watches, strict=True):
            if w.begin is None:
                continue
            per[r["key"]] += analyze.recoveries(analyze.events(w.run_dir), w.kills)
            self.cleanup(w)
        for _ in range(self.plan["reps"]):
            w, tl = self.torchrun(
                self.plan["recovery_steps"],
                {},
                "recovery-torchrun",
                kill=KillPlan(self.plan["kill_after_s"]),
            )
            per["torchrun"] += analyze.recoveries(analyze.events(w.run_dir), w.kills, tl.lines)
            self.cleanup(w)
        labels = {
            **{k: v[0] for k, v in RECOVERY.items()},
            "torchrun": "torchrun --max-restarts (monitor 0.1 s)",
        }
        phases = [
            "detect_s",
            "restart_s",
            *analyze.GROUP_PHASES,
            "init_load_s",
            "first_step_s",
            "redo_s",
            "total_s",
            "back_to_kill_point_s",
            "steps_redone",
            "restore_s",
            "warm_spare",
        ]
        rows = []
        for key, recs in per.items():
            if not recs:
                self.failures.append(f"recovery {key}: no recovery could be measured")
            rows.append(
                {
                    "key": key,
                    "label": labels[key],
                    "n": len(recs),
                    **{p: stats([x.get(p) for x in recs]) for p in phases},
                    "runs": recs,
                }
            )
        self.results["recovery"] = rows

    def exact_runs(self) -> list[dict[str, Any]]:
        """An uninterrupted run and the same run with rank 0 SIGKILLed before ``kill_step``
        (the project's chaos fault: it lands on that step whatever the device's speed)."""
        spec = self.plan.get("exact")
        if not spec:
            return []
        same = {
            "training.deterministic": True,
            "checkpoint.every_n_steps": spec["every"],
            "failure.max_failures": -1,
        }
        fault = [{"kind": "kill", "rank": 0, "step": spec["kill_step"]}]
        killed = {**same, "chaos.faults": fault}
        return [
            {"tag": f"exact-{key}", "steps": spec["steps"], "overrides": extra, "task": "lm"}
            for key, extra in (("uninterrupted", same), ("rank0-killed", killed))
        ]

    def exact(self, runs, watches, launched) -> None:
        killed = watches[1]  # watches[0]: the uninterrupted reference
        kills = analyze.chaos_kills(killed.run_dir)
        recs = analyze.recoveries(analyze.events(killed.run_dir), kills)
        ends = [analyze.final_weights(w.run_dir) for w in watches]
        steps = [end[0] if end else None for end in ends]
        equal = None not in ends and analyze.bitwise_equal(ends[0][1], ends[1][1])
        cmd = [sys.executable, "-m", "training", "verify", "--name", killed.name]
        verify = subprocess.run(
            [*cmd, "--storage", str(self.runs_dir)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        self.results["exact"] = {
            "settings": analyze.describe(analyze.settings(killed.run_dir)),
            "kills": len(kills),
            "total_s": stats([r["total_s"] for r in recs]),
            "steps_redone": stats([r["steps_redone"] for r in recs]),
            "final_steps": steps,
            "bitwise_equal": equal,
            "verify_rc": verify.returncode,
            "verify": (verify.stdout.strip().splitlines() or [verify.stderr.strip()])[0],
        }
        problems = {
            "no recovery measured": not recs,
            "final weights differ from the uninterrupted run's": not equal,
            "`training verify` failed": verify.returncode != 0,
        }
        self.failures += [f"exact: {what}" for what, bad in problems.items() if bad]
        for w in watches:
            self.cleanup(w)

    def ray_scenarios(self) -> None:
        groups = {
            "cadence": self.cadence_runs(),
            "stall": self.stall_runs(),
            "recovery": self.recovery_runs(),
            "exact": self.exact_runs(),
        }
        runs = [r for g in groups.values() for r in g]
        watches, launched = self.session(runs, "ray-session")
        by_run = {id(r): w for r, w in zip(runs, watches, strict=True)}
        for scenario, group in groups.items():
            if not group:
                continue
            print(f"== analyse {scenario} ({time.strftime('%H:%M:%S')})", flush=True)
            try:
                getattr(self, scenario)(group, [by_run[id(r)] for r in group], launched)
            except Exception:
                traceback.print_exc()
                self.failures.append(f"scenario {scenario} raised (see traceback)")

    def goodput(self) -> None:
        self.results["goodput"] = [
            self.goodput_row(kind, every, target) for kind, every, target in self.plan["goodput"]
        ]

    def no_failure_rate(self, kind: str) -> float | None:
        """Steady steps/s of the overhead scenario's no-failure runs of the same config (the
        shipped local.yaml, demo MLP) and launcher, measured in this benchmark run. It only
        sizes the goodput runs; goodput divides by a no-failure run of the same length."""
        measured = self.results.get("overhead", {}).get("mlp", {}).get(kind, {})
        return (measured.get("steps_per_s") or {}).get("median")

    def goodput_launch(self, kind: str, steps: int, tag: str, kill: KillPlan | None) -> Watch:
        extra = {"failure.max_failures": -1}
        if kind == "ray":
            run = {"tag": tag, "steps": steps, "overrides": extra, "kill": kill}
            return self.session([run], tag)[0][0]
        return self.torchrun(steps, extra, tag, kill=kill)[0]

    def goodput_row(self, kind: str, every: float, target: float) -> dict[str, Any]:
        row: dict[str, Any] = {"launcher": kind, "every_s": every}
        rate = self.no_failure_rate(kind)
        if rate is None:  # no made-up rate: the row says what is missing
            self.failures.append(f"goodput {kind} T={every}: no no-failure steps/s measured")
            return {**row, "missing": "no no-failure run of this config was measured"}
        steps = int(rate * target)
        # The period is taken from a no-failure run of the same length, launcher and config,
        # over the same span (first step -> last step): shorter reference runs are slower per
        # step (warm-up, the spares' one-time import) and gave goodput above 1.
        ref = self.goodput_launch(kind, steps, f"goodput-{kind}-ref", None)
        period = analyze.span_period(analyze.events(ref.run_dir))
        self.cleanup(ref)
        if period is None:
            self.failures.append(f"goodput {kind} T={every}: the no-failure run has no steps")
            return {**row, "missing": "the no-failure run of the same length did not train"}
        kill = KillPlan(every, every)  # at T, 2T, 3T, ... after the first step
        w = self.goodput_launch(kind, steps, f"goodput-{kind}-T{every}", kill)
        g = analyze.goodput(analyze.events(w.run_dir), w.kills, period)
        if g.get("goodput") is None:
            self.failures.append(f"goodput {kind} T={every}: not measurable")
        history = analyze.attempts(analyze.events(w.run_dir))
        first_step = history[0]["steps"][0]["time"] if history and history[0]["steps"] else None
        last = max((s["time"] for a in history for s in a["steps"]), default=None)
        expected = kill.expected(first_step, last)
        if expected and not w.kills:  # the harness is broken; fewer kills than due is a figure
            self.failures.append(f"goodput {kind} T={every}: none of {expected} kills fired")
        self.cleanup(w)
        return {
            **row,
            "steps": steps,
            "settings": analyze.describe(analyze.settings(w.run_dir), kind),
            "sizing_steps_per_s": rate,
            "no_failure_steps_per_s": 1 / period,
            "kills_fired": len(w.kills),
            "kills_expected": expected,
            "kill_delays_s": [k["time"] - k["due"] for k in w.kills],
            "kill_slots": [k["slot"] for k in w.kills],
            **g,
        }

    # ---- driver ---------------------------------------------------------------------------

    def run(self) -> int:
        started = time.time()
        self.results["machine"] = report.machine()
        self.results["started"] = started
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.logs_dir.glob("*.log"):
            stale.unlink()
        self.write_demo_data()
        names = self.plan.get("scenarios", ["floor", "overhead", "ray_scenarios", "goodput"])
        scenarios = [getattr(self, name) for name in names]
        if not self.plan["goodput"] and self.goodput in scenarios:
            scenarios.remove(self.goodput)
        for scenario in scenarios:
            if self.past_deadline(started, scenario.__name__):
                break
            print(f"== {scenario.__name__} ({time.strftime('%H:%M:%S')})", flush=True)
            try:
                scenario()
            except Exception:
                traceback.print_exc()
                self.failures.append(f"scenario {scenario.__name__} raised (see traceback)")
            self.write(started)
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        self.write(started)
        if self.plan.get("table"):
            print(report.device_table(self.results), flush=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        print(
            f"Wrote {self.out}/results.md, results.json, results.png "
            f"in {time.time() - started:.0f} s",
            flush=True,
        )
        for failure in self.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1 if self.failures else 0

    def past_deadline(self, started: float, scenario: str) -> bool:
        deadline = self.plan.get("deadline_s")
        if deadline is None or time.time() - started < deadline:
            return False
        self.failures.append(
            f"plan {self.mode}: past its deadline of {deadline} s before scenario {scenario}; "
            "it and the scenarios after it were left out"
        )
        return True

    def timeout_s(self) -> float:
        """A run's limit: the plan's, and never past the plan's deadline."""
        deadline = self.plan.get("deadline_s")
        if deadline is None:
            return self.plan["timeout_s"]
        left = deadline - (time.time() - self.results["started"])
        return max(1.0, min(self.plan["timeout_s"], left))

    def write_demo_data(self) -> None:
        """Every task's demo data up front: torchrun's baseline does not create it."""
        for task in {"mlp", *self.plan["overhead"], *(["lm"] if self.plan.get("exact") else [])}:
            name = "tabular" if task == "mlp" else "language_model"
            out = self.data_dir / TASKS[task][2]
            cmd = [sys.executable, "-m", "training", "demo-data", "--task", name]
            cmd += ["--out", str(out), "--config", str(TASKS[task][1])]
            subprocess.run(cmd, cwd=REPO, env=self.env(), check=True, capture_output=True)

    def write(self, started: float) -> None:
        self.results["duration_s"] = time.time() - started
        self.results["failures"] = self.failures
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(report.markdown(self.results))
        report.plot(self.results, self.out / "results.png")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI smoke (= --plan quick).")
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="full",
        help="full: every scenario, n=3 (~35 min on 2 cores); device: n=3, fewer and shorter "
        "scenarios (~9.5 min on a quiet 16-core machine); quick: a smoke run.",
    )
    parser.add_argument(
        "--workdir",
        default="/tmp/elastic-trainer-bench",
        help="Scratch space for data, runs and checkpoints (deleted at start).",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else args.plan
    deadline = PLANS[mode].get("deadline_s")
    print(f"plan {mode}" + (f": deadline {deadline} s" if deadline else ""), flush=True)
    bench = Bench(mode, Path(args.workdir), Path(args.out))
    return bench.run()
