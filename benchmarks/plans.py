"""What the benchmark runs, as data: the plans (which scenarios, sizes, repetitions) and the rows
of each scenario (what a row forces, its label); ``benchmarks/harness.py`` runs them.

Scenarios (see README "Benchmarks"):
  floor     in-memory copy, serialization, raw write bandwidth and load of the checkpoint state
  overhead  the project's loop under Ray Train (the CLI, cold, shipped config) vs the same
            model, data, global batch and steps in plain torchrun DDP, launched alternately;
            start-up and steps/s, for the demo MLP and the language-model task
  cadence   steady-state steps/s for report/checkpoint cadences and the health-check interval
  stall     how long training pauses per checkpoint, sync vs async upload, 10/100/500 MB state
  recovery  worker SIGKILL -> first step after resume, by phase, from the run log's events;
            Ray defaults, without warm spares, periodic checkpoints only; torchrun --max-restarts
  goodput   a worker killed every T seconds from the first step: effective steps x the
            no-failure step period (the overhead scenario's runs of the same config) / wall time
  exact     rank 0 SIGKILLed mid-run (chaos) with training.deterministic: kill -> first step,
            steps redone, final weights bitwise equal to an uninterrupted run, `training verify`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.analyze import HC

REPO = Path(__file__).resolve().parent.parent
NEVER = 10**9  # a cadence that never fires (a checkpoint is still written at the last step)

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
        # The shipped mode only: the smoke run checks the harness end to end, and each Ray run
        # costs CI ~20 s on 2 cores, most of it Ray Train starting (the full plan has both).
        "stall_modes": ["async"],
        "stall_steps": 12,
        "recovery": ["project"],
        "recovery_steps": 1000,
        "kill_after_s": 1.0,
        # (launcher, kill every T s, training seconds to aim for without failures): one or two
        # kills are enough for the smoke (9 s gave five, and cost CI ~20 s more).
        "goodput": [("torchrun", 4, 5)],
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
STALL: dict[str, Any] = {
    # A checkpoint every 6 steps: the background save of the previous one has ended (measured:
    # the dip column), so the pause is the checkpoint's own and steps with no save in flight
    # are left to compare with.
    "checkpoint.every_n_steps": 6,
    "checkpoint.num_to_keep": NEVER,  # every manifest's time: when its save ended
    "training.report_every_n_steps": NEVER,
    "training.log_every_n_steps": 1,
    # The pause of the checkpoint itself: evaluation (on checkpoint steps by default) would
    # add its forward passes, seconds at 500 MB.
    "eval.batches": 0,
}
STALL_FIGURES = ("paused_s", "blocked_s", "save_dip")
# label, launcher, overrides (a worker SIGKILLed, the run retried for ever)
RECOVERY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "project": ("project defaults: warm spares, rank 0 saves on failure", "session", {}),
    "no_spares": (
        "project defaults without warm spares (failure.spare_workers: false)",
        "session",
        {"failure.spare_workers": False},
    ),
    "before": (
        "periodic checkpoints only (checkpoint.on_failure: false)",
        "session",
        {"checkpoint.on_failure": False},
    ),
    "torchrun": ("torchrun --max-restarts (monitor 0.1 s)", "torchrun", {}),
}
