"""Run every benchmark, side by side, and write ``benchmarks/results/results.{md,json,png}``.

    python -m benchmarks                 # full mode: the numbers (about 35 minutes on 2 cores)
    python -m benchmarks --plan device   # n=3, fewer and shorter scenarios (~9.5 min, 16 cores)
    python -m benchmarks --quick         # CI smoke: tiny sizes, one repetition (a few minutes)
    python -m benchmarks --plan gpu      # one GPU: the table of issue 25 (make gpu-check, ~6 min)
    python -m benchmarks --plan gpu-dry  # the same plan on the CPU, tiny sizes (CI, ~2 min)

What each plan runs and the rows of each scenario are data (``benchmarks/plans.py``); this
module starts the runs, one launcher for all, and reads the figures from their run logs.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import analyze, cpu, floor, launch, report
from benchmarks.analyze import stats
from benchmarks.launch import KillPlan, Watch
from benchmarks.plans import (
    CADENCE,
    NEVER,
    PLANS,
    RECOVERY,
    REPO,
    SIZES,
    STALL,
    STALL_FIGURES,
    STALL_MODES,
    TASKS,
)
from training.driver.settings import load_config

# The scenarios whose Ray runs share one Ray instance, in the order they run there.
RAY_SCENARIOS = ("cadence", "stall", "recovery", "exact")
RECOVERY_PHASES = (
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
)


@dataclass
class Run:
    """One training run of a scenario: which row it counts towards, how it is launched (``cli``:
    ``python -m training train``, cold; ``session``: in one warm Ray instance with the other
    session runs started together, ``benchmarks.ray_session``; ``torchrun``: the baseline),
    and what it forces. ``start`` fills in ``watch`` and ``launched``."""

    scenario: str
    key: Any
    launcher: str
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    task: str = "mlp"
    kill: KillPlan | None = None
    watch: Watch | None = None
    launched: launch.Launched | None = None

    @property
    def kind(self) -> str:
        return "torchrun" if self.launcher == "torchrun" else "ray"

    @property
    def tag(self) -> str:
        keys = self.key if isinstance(self.key, tuple) else (self.key,)
        return "-".join([self.scenario, *(str(k).replace(" ", "") for k in keys)])

    def events(self) -> list[dict[str, Any]]:
        return analyze.events(self.watch.run_dir) if self.watch.begin else []

    def settings(self) -> str:
        return analyze.describe(analyze.settings(self.watch.run_dir, self.env), self.kind)


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

    # ---- launching ------------------------------------------------------------------------

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

    def start(self, runs: list[Run]) -> None:
        """Run to the end, as one process: a ``cli`` or ``torchrun`` run alone, or any number
        of ``session`` runs one after another in one Ray instance."""
        for run in runs:
            self.counter += 1
            name = f"{self.counter:03d}-{run.tag}"
            run.watch = Watch(name, self.runs_dir / name, run.kind, kill=run.kill)
        session = runs[0].launcher == "session"
        cmd, env = self.session_command(runs) if session else self.command(runs[0])
        log = self.logs_dir / f"{runs[0].watch.name}.log"
        launched = launch.Launched(cmd, self.env(env), log, REPO)
        rc = launch.run(launched, [r.watch for r in runs], self.timeout_s(), markers=session)
        for run in runs:
            run.launched = launched
            if run.watch.status != "ok" or rc != 0:
                self.failures.append(
                    f"run {run.watch.name}: status {run.watch.status}, exit code {rc} (log {log})"
                )

    def command(self, run: Run) -> tuple[list[str], dict[str, str]]:
        config = str(TASKS[run.task][1])
        overrides = self.overrides(run.watch.name, run.steps, run.overrides, run.task)
        sets = [arg for item in overrides for arg in ("--set", item)]
        if run.launcher == "cli":
            return [sys.executable, "-m", "training", "train", "--config", config, *sets], run.env
        # As many processes as Ray's largest worker group: the same config, resolved.
        workers = load_config(config, overrides).scaling.max_workers
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(workers), "--max-restarts", "100" if run.kill else "0"]
        cmd += [str(REPO / "benchmarks" / "torchrun_baseline.py"), "--config", config, *sets]
        return [*cmd, "--run-dir", str(run.watch.run_dir)], run.env

    def session_command(self, runs: list[Run]) -> tuple[list[str], dict[str, str]]:
        specs = [
            {
                "name": r.watch.name,
                "config": str(TASKS[r.task][1]),
                "overrides": self.overrides(r.watch.name, r.steps, r.overrides, r.task),
                "env": r.env,
            }
            for r in runs
        ]
        spec_path = self.workdir / f"session-{runs[0].watch.name}.json"
        spec_path.write_text(json.dumps(specs, indent=1))
        cmd = [sys.executable, "-m", "benchmarks.ray_session", str(spec_path)]
        return cmd, self.plan.get("session_env") or {}

    def cleanup(self, run: Run) -> None:
        shutil.rmtree(run.watch.run_dir / "ckpt", ignore_errors=True)
        for path in run.watch.run_dir.glob("checkpoint_*"):
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
        settings: dict[str, str] = {}
        for rep in range(self.plan["reps"]):
            for kind in ["torchrun", "ray"] if rep % 2 == 0 else ["ray", "torchrun"]:
                launcher = "cli" if kind == "ray" else "torchrun"
                run = Run("overhead", (task, kind), launcher, steps, task=task)
                with cpu.Sampler() as sampler:
                    self.start([run])
                evs, launched_at = run.events(), run.launched.launched_at
                measured = analyze.no_fault_run(evs, launched_at)
                measured["wall_s"] = (run.watch.end or time.time()) - launched_at
                measured["cpu"] = steady_cpu(sampler, evs, run.launched.proc.pid)
                per[kind].append(measured)
                settings[kind] = run.settings()
                self.cleanup(run)
        out: dict[str, Any] = {"task": TASKS[task][0], "steps": steps, "runs": per}
        for kind, rows in per.items():
            out[kind] = {
                key: stats([r.get(key) for r in rows])
                for key in ("startup_s", "steps_per_s", "compute_steps_per_s", "wall_s")
            }
            out[kind]["settings"] = settings.get(kind, "not measured")
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

    # The scenarios below run their Ray runs in one Ray instance (one session process): Ray's
    # own start-up is paid once; the cold start-up of the CLI is measured in `overhead`.

    def cadence_runs(self) -> list[Run]:
        cap = self.plan["cadence_steps"]
        return [
            Run("cadence", key, "session", min(CADENCE[key][3] or NEVER, cap), *CADENCE[key][1:3])
            for _ in range(self.plan["reps"])
            for key in self.plan["cadence"]
        ]

    def stall_runs(self) -> list[Run]:
        return [
            Run(
                "stall",
                (size, mode),
                "session",
                self.plan["stall_steps"],
                {**STALL, "task.options.mlp.hidden_sizes": SIZES[size], "checkpoint.upload": mode},
            )
            for size in self.plan["stall_sizes"]
            for mode in self.plan.get("stall_modes", STALL_MODES)
            for _ in range(self.plan["reps"])
        ]

    def recovery_runs(self) -> list[Run]:
        keys = [*self.plan["recovery"], "torchrun"] if self.plan["recovery"] else []
        return [
            Run(
                "recovery",
                key,
                RECOVERY[key][1],
                self.plan["recovery_steps"],
                {"failure.max_failures": -1, **RECOVERY[key][2]},
                kill=KillPlan(self.plan["kill_after_s"]),
            )
            for _ in range(self.plan["reps"])
            for key in keys
        ]

    def exact_runs(self) -> list[Run]:
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
        return [
            Run("exact", key, "session", spec["steps"], extra, task="lm")
            for key, extra in (
                ("uninterrupted", same),
                ("rank0-killed", {**same, "chaos.faults": fault}),
            )
        ]

    def ray_scenarios(self) -> None:
        groups = {name: getattr(self, f"{name}_runs")() for name in RAY_SCENARIOS}
        runs = [r for group in groups.values() for r in group]
        if any(r.launcher == "session" for r in runs):
            self.start([r for r in runs if r.launcher == "session"])
        for run in runs:
            if run.launcher != "session":
                self.start([run])
        for scenario, group in groups.items():
            if not group:
                continue
            print(f"== analyse {scenario} ({time.strftime('%H:%M:%S')})", flush=True)
            try:
                getattr(self, scenario)(group)
            except Exception:
                traceback.print_exc()
                self.failures.append(f"scenario {scenario} raised (see traceback)")
        for run in runs:
            self.cleanup(run)

    def cadence(self, runs: list[Run]) -> None:
        per: dict[str, list[dict[str, Any]]] = {k: [] for k in self.plan["cadence"]}
        pauses: dict[str, list[float]] = {k: [] for k in self.plan["cadence"]}
        settings: dict[str, str] = {}
        for run in runs:
            if run.watch.begin is None:
                continue
            evs = run.events()
            per[run.key].append(analyze.no_fault_run(evs, run.watch.begin))
            ran = analyze.settings(run.watch.run_dir, run.env)
            settings[run.key] = analyze.describe(ran)
            every = ran.get("report_every")
            for attempt in analyze.attempts(evs)[:1] if every else []:
                pauses[run.key] += analyze.report_pauses(attempt, every)
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

    def stall(self, runs: list[Run]) -> None:
        """One row per state size and upload mode: each figure is the median over the runs of
        that run's own median (its checkpoints), as median [min-max] (n = runs)."""
        per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in runs:
            attempt = (analyze.attempts(run.events()) or [None])[0]
            saved = analyze.saves_ended(run.watch.run_dir) if attempt else {}
            ckpts = analyze.checkpoint_stalls(attempt, saved) if attempt else []
            if not ckpts:
                self.failures.append(f"stall {run.watch.name}: no checkpoint measured")
            per_run.setdefault(run.key, []).append(
                {
                    "settings": run.settings(),
                    "checkpoints": len(ckpts),
                    # the last checkpoint has no step after it: its pause cannot be seen
                    "paused_s": stats([c["paused_s"] for c in ckpts[:-1]])["median"],
                    "blocked_s": stats([c["blocked_s"] for c in ckpts])["median"],
                    "save_dip": analyze.save_dip(attempt, saved) if attempt else None,
                }
            )
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

    def recovery(self, runs: list[Run]) -> None:
        per: dict[str, list[dict[str, Any]]] = {r.key: [] for r in runs}
        settings: dict[str, str] = {}
        for run in runs:
            if run.watch.begin is None:
                continue
            # torchrun's agent says when it saw the failure only in its output (analyze.py)
            agent = run.launched.lines if run.kind == "torchrun" else None
            per[run.key] += analyze.recoveries(run.events(), run.watch.kills, agent)
            settings[run.key] = run.settings()
        self.failures += [
            f"recovery {k}: no recovery could be measured" for k, v in per.items() if not v
        ]
        self.results["recovery"] = [
            {
                "key": key,
                "label": RECOVERY[key][0],
                "settings": settings.get(key, "not measured"),
                "n": len(recs),
                **{p: stats([x.get(p) for x in recs]) for p in RECOVERY_PHASES},
                "runs": recs,
            }
            for key, recs in per.items()
        ]

    def exact(self, runs: list[Run]) -> None:
        killed = runs[1]  # runs[0]: the uninterrupted reference
        kills = analyze.chaos_kills(killed.watch.run_dir)
        recs = analyze.recoveries(killed.events(), kills)
        ends = [analyze.final_weights(r.watch.run_dir) for r in runs]
        steps = [end[0] if end else None for end in ends]
        equal = None not in ends and analyze.bitwise_equal(ends[0][1], ends[1][1])
        cmd = [sys.executable, "-m", "training", "verify", "--name", killed.watch.name]
        verify = subprocess.run(
            [*cmd, "--storage", str(self.runs_dir)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        self.results["exact"] = {
            "settings": killed.settings(),
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

    def goodput_run(self, kind: str, steps: int, key: str, kill: KillPlan | None) -> Run:
        launcher = "session" if kind == "ray" else "torchrun"
        run = Run("goodput", (kind, key), launcher, steps, {"failure.max_failures": -1}, kill=kill)
        self.start([run])
        return run

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
        ref = self.goodput_run(kind, steps, "ref", None)
        period = analyze.span_period(ref.events())
        self.cleanup(ref)
        if period is None:
            self.failures.append(f"goodput {kind} T={every}: the no-failure run has no steps")
            return {**row, "missing": "the no-failure run of the same length did not train"}
        kill = KillPlan(every, every)  # at T, 2T, 3T, ... after the first step
        run = self.goodput_run(kind, steps, f"T{every}", kill)
        evs, kills = run.events(), run.watch.kills
        g = analyze.goodput(evs, kills, period)
        if g.get("goodput") is None:
            self.failures.append(f"goodput {kind} T={every}: not measurable")
        history = analyze.attempts(evs)
        first_step = history[0]["steps"][0]["time"] if history and history[0]["steps"] else None
        last = max((s["time"] for a in history for s in a["steps"]), default=None)
        expected = kill.expected(first_step, last)
        if expected and not kills:  # the harness is broken; fewer kills than due is a figure
            self.failures.append(f"goodput {kind} T={every}: none of {expected} kills fired")
        self.cleanup(run)
        return {
            **row,
            "steps": steps,
            "settings": run.settings(),
            "sizing_steps_per_s": rate,
            "no_failure_steps_per_s": 1 / period,
            "kills_fired": len(kills),
            "kills_expected": expected,
            "kill_delays_s": [k["time"] - k["due"] for k in kills],
            "kill_slots": [k["slot"] for k in kills],
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
