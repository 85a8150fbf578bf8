"""Numbers from run logs (``<run dir>/runlog/*.jsonl``); torchrun's agent output for one."""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from training.core import checkpoint, runlog

HC = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# torchrun's agent noticing a dead worker, in its own output: the agent records its events to
# a logging destination nothing can read (torch.distributed.elastic.events, "null"), so this
# line is all there is. Ray's side is in the run log (``failure_detected``).
TORCHRUN_DETECTED = re.compile(r"will restart worker group|Worker group FAILED|failed \(exitcode")


def stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def events(run_dir: Path) -> list[dict[str, Any]]:
    return runlog.read_events(pafs.LocalFileSystem(), str(run_dir))


def attempts(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attempt, oldest first: its start event, steps (by time), checkpoints, end."""
    found: dict[str, dict[str, Any]] = {}
    for e in evs:
        a = found.setdefault(e["attempt"], {"start": None, "steps": [], "ckpts": [], "end": None})
        if e["event"] == "start":
            a["start"] = e
        elif e["event"] == "step":
            a["steps"].append(e)
        elif e["event"] == "checkpoint":
            a["ckpts"].append(e)
        elif e["event"] == "end":
            a["end"] = e
    ordered = [a for a in found.values() if a["start"] is not None]
    return sorted(ordered, key=lambda a: a["start"]["time"])


def steady_window(steps: list[dict[str, Any]], skip_frac: float = 0.1) -> list[dict[str, Any]]:
    """The steps after warm-up (the first 10 %, at least 5)."""
    return steps[max(5, int(len(steps) * skip_frac)) :]


def steady_rate(steps: list[dict[str, Any]]) -> float | None:
    """Steps/s after warm-up, end to end: includes report, checkpoint and logging stalls."""
    window = steady_window(steps)
    if len(window) < 5:
        return None
    return (len(window) - 1) / (window[-1]["time"] - window[0]["time"])


def compute_rate(steps: list[dict[str, Any]]) -> float | None:
    """Steps/s of the step itself (forward, backward, all-reduce, optimizer), from its own
    timer ``step_s`` (both launchers log it); None where too few steps carry it."""
    skip = max(5, int(len(steps) * 0.1))
    times = [s["step_s"] for s in steps[skip:] if "step_s" in s]
    return 1 / statistics.median(times) if len(times) >= 5 else None


def no_fault_run(evs: list[dict[str, Any]], launched_at: float) -> dict[str, Any]:
    """Start-up (launch -> first step), steady-state and compute-only steps/s of one attempt."""
    runs = attempts(evs)
    if not runs or not runs[0]["steps"]:
        return {}
    first = runs[0]
    return {
        "startup_s": first["steps"][0]["time"] - launched_at,
        "steps_per_s": steady_rate(first["steps"]),
        "compute_steps_per_s": compute_rate(first["steps"]),
        "steps": len(first["steps"]),
        "attempts": len(runs),
        "checkpoints": checkpoint_stalls(first),
    }


def report_pauses(attempt: dict[str, Any], report_every: int) -> list[float]:
    """How long training paused at each metrics-only ``ray.train.report`` (no checkpoint)."""
    steps = attempt["steps"]
    ckpt_steps = {c["global_step"] for c in attempt["ckpts"]}
    gaps = {a["global_step"]: b["time"] - a["time"] for a, b in itertools.pairwise(steps)}
    reported = {g for g in gaps if g % report_every == 0 and g not in ckpt_steps}
    normal = [v for g, v in gaps.items() if g not in reported and g not in ckpt_steps] or [0.0]
    typical = statistics.median(normal)
    return [gaps[g] - typical for g in sorted(reported)]


def checkpoint_stalls(
    attempt: dict[str, Any], saved_at: dict[int, float] | None = None
) -> list[dict[str, float]]:
    """Per checkpoint: ``blocked_s`` as logged, and how long training actually paused: the gap
    between the step before and the step after, minus a normal step-to-step interval. With
    ``saved_at`` (checkpoint step -> when its save ended) "normal" means no save in flight;
    without it, any interval that does not start at a checkpoint."""
    gaps = step_gaps(attempt, saved_at)
    typical = statistics.median(gaps["quiet"] or gaps["saving"] or [0.0])
    out = []
    for c in attempt["ckpts"]:
        g = c["global_step"]
        paused = gaps["at_checkpoint"].get(g)
        out.append(
            {
                "step": g,
                "blocked_s": c["blocked_s"],
                "paused_s": None if paused is None else paused - typical,
            }
        )
    return out


def step_gaps(attempt: dict[str, Any], saved_at: dict[int, float] | None) -> dict[str, Any]:
    """Step-to-step intervals by what ran beside them: ``at_checkpoint`` (checkpoint step ->
    the interval that starts there), ``saving`` (a checkpoint's background save still in
    flight, known only from ``saved_at``) and ``quiet`` (the rest)."""
    steps = attempt["steps"]
    ckpt_steps = {c["global_step"] for c in attempt["ckpts"]}
    saved_at = saved_at or {}
    in_flight = [
        (s["time"], saved_at[s["global_step"]]) for s in steps if s["global_step"] in saved_at
    ]
    out: dict[str, Any] = {"at_checkpoint": {}, "saving": [], "quiet": []}
    for a, b in itertools.pairwise(steps):
        gap = b["time"] - a["time"]
        if a["global_step"] in ckpt_steps:
            out["at_checkpoint"][a["global_step"]] = gap
        elif any(began < a["time"] < ended for began, ended in in_flight):
            out["saving"].append(gap)
        else:
            out["quiet"].append(gap)
    return out


def save_dip(attempt: dict[str, Any], saved_at: dict[int, float]) -> float | None:
    """Steps/s while a background save runs, as a fraction of steps/s with none in flight."""
    gaps = step_gaps(attempt, saved_at)
    if len(gaps["saving"]) < 3 or len(gaps["quiet"]) < 3:
        return None
    return statistics.median(gaps["quiet"]) / statistics.median(gaps["saving"])


def saves_ended(run_dir: Path) -> dict[int, float]:
    """Checkpoint step -> when its save ended: its manifest, written last, was last modified
    (the run's workers and this process share the machine's clock)."""
    out = {}
    for info in checkpoint.scan(pafs.LocalFileSystem(), str(run_dir), check=False):
        manifest = Path(info.path) / checkpoint.MANIFEST_FILE
        if manifest.exists():
            out[info.step] = manifest.stat().st_mtime
    return out


def recoveries(
    evs: list[dict[str, Any]],
    kills: list[dict[str, Any]],
    agent_lines: list[tuple[float, str]] | None = None,
) -> list[dict[str, Any]]:
    """Each kill's recovery, split into phases (seconds, all from wall-clock timestamps).

    detect: kill -> the launcher decided to restart (Ray: the run log's ``failure_detected``,
    which Ray Train's controller writes; torchrun: the agent's restart line in
    ``agent_lines``, else folded into restart); restart: -> the new group is up (Ray: the run
    log's ``group_started``, with Ray Train's own split of it; torchrun: the new worker process
    began); init_load: -> the new attempt's ``start`` event (data, model, DDP, checkpoint
    load); first_step: -> its first step; redo: time spent re-running steps past the
    checkpoint; total: kill -> first step after resume.
    """
    runs = attempts(evs)
    detections, slack = _detections(evs, agent_lines)
    groups = [e for e in evs if e["event"] == "group_started"]
    out = []
    for kill in kills:
        t_kill = kill["time"]
        before = [a for a in runs if a["start"]["time"] < t_kill]
        after = [a for a in runs if a["start"]["time"] > t_kill]
        if not before or not after or not after[0]["steps"]:
            continue
        old, new = before[-1], after[0]
        last_done = max((s["global_step"] for s in old["steps"]), default=0)
        resumed = new["start"]["resumed_from_step"] or 0
        t_start, t_first = new["start"]["time"], new["steps"][0]["time"]
        caught_up = next((s["time"] for s in new["steps"] if s["global_step"] >= last_done), None)
        t_detect = next((t for t in detections if t_kill <= t <= t_start + slack), None)
        group = next((g for g in groups if (t_detect or t_kill) <= g["time"] <= t_start), None)
        t_group = new["start"].get("process_started") or (group or {}).get("time")
        out.append(
            {
                "kill_time": t_kill,
                "steps_redone": max(0, last_done - resumed),
                "detect_s": _diff(t_detect, t_kill),
                "restart_s": _diff(t_group, t_detect or t_kill),
                **group_phases(group),
                "init_load_s": _diff(t_start, t_group),
                "first_step_s": t_first - t_start,
                "redo_s": _diff(caught_up, t_start),
                "total_s": t_first - t_kill,
                "back_to_kill_point_s": _diff(caught_up, t_kill),
                "restore_s": new["start"].get("restore_s"),
                # Ray: 1 when the new rank 0 ran in a spare preloaded before the kill, else 0.
                "warm_spare": _warm(new["start"], t_kill),
            }
        )
    return out


def _detections(evs, agent_lines) -> tuple[list[float], float]:
    """When the launcher noticed failures, and how late after the next ``start`` a sighting
    may come (the agent's output is read as it arrives and can trail by up to ~0.5 s)."""
    if agent_lines is not None:
        return [t for t, text in agent_lines if TORCHRUN_DETECTED.search(text)], 1.0
    return [e["time"] for e in evs if e["event"] == "failure_detected"], 0.0


# Ray Train's split of a worker-group start, from its ``group_started`` event.
GROUP_PHASES = ("placement_group_s", "actors_s", "train_context_s", "launch_s", "group_total_s")


def group_phases(group: dict[str, Any] | None) -> dict[str, float | None]:
    """placement group (as Ray's GCS timed it), actor processes, train context (the workers
    import the project), launch of the training function, and the whole group start."""
    if group is None:
        return {}
    placement = group.get("placement_group_s")
    actors = group["actors_at"] - group["requested_at"]
    return {
        "placement_group_s": placement,
        "actors_s": None if placement is None else actors - placement,
        "train_context_s": group["context_at"] - group["actors_at"],
        "launch_s": group["time"] - group["context_at"],
        "group_total_s": group["time"] - group["requested_at"],
    }


def _warm(start: dict[str, Any], t_kill: float) -> int | None:
    if "preloaded_at" not in start:
        return None  # torchrun, or a run log from before spares existed
    return int(start["preloaded_at"] is not None and start["preloaded_at"] < t_kill)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def span_period(evs: list[dict[str, Any]]) -> float | None:
    """Seconds per step of a no-failure run from its first step to its last: the span a
    goodput's wall time covers, so the two compare like for like."""
    runs = attempts(evs)
    steps = runs[0]["steps"] if runs else []
    if len(runs) != 1 or len(steps) < 2:
        return None
    return (steps[-1]["time"] - steps[0]["time"]) / (len(steps) - 1)


def goodput(
    evs: list[dict[str, Any]], kills: list[dict[str, Any]], period_s: float | None
) -> dict[str, Any]:
    """Goodput, the standard definition: effective steps (those the final model contains,
    not the redone ones) x the no-failure step period / wall time.

    ``period_s`` is the seconds per step of a no-failure run of the same config and length
    (``span_period``: checkpoints and evaluations at the same cadence included). Wall time runs from
    the first step to the last effective step, the same span a steady rate covers: start-up
    is measured in the overhead scenario. A missing period gives a missing goodput.
    """
    runs = attempts(evs)
    if not runs or not any(a["end"] for a in runs) or not runs[0]["steps"]:
        return {}
    history, _ = runlog.effective_history(evs)
    t0, t1 = runs[0]["steps"][0]["time"], history[max(history)]["time"]
    effective = len(history) - 1  # steps after the first, as the wall time starts there
    run = sum(len(a["steps"]) for a in runs)
    return {
        "wall_s": t1 - t0,
        "effective_steps": len(history),
        "steps_run": run,
        "steps_redone": run - len(history),
        "attempts": len(runs),
        "no_failure_period_s": period_s,
        "goodput": effective * period_s / (t1 - t0) if period_s and t1 > t0 else None,
        "effective_steps_per_s": effective / (t1 - t0) if t1 > t0 else None,
    }


def settings(run_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings a run actually ran under, from its own files: the resolved config it
    saved (``run_config.json``) and its first ``start`` event; the health-check interval is
    the environment's where the harness set one (it takes precedence), else the config's."""
    path = run_dir / "run_config.json"
    if not path.exists():
        return {}
    cfg = json.loads(path.read_text())
    runs = attempts(events(run_dir))
    env = env or {}
    return {
        "task": cfg["task"]["name"],
        "workers": runs[0]["start"]["world_size"] if runs else None,
        "steps": runs[0]["start"]["total_steps"] if runs else None,
        "global_batch": cfg["training"]["global_batch_size"],
        "checkpoint_every": cfg["checkpoint"]["every_n_steps"],
        "upload": cfg["checkpoint"]["upload"],
        "report_every": cfg["training"]["report_every_n_steps"],
        "log_every": cfg["training"]["log_every_n_steps"],
        "eval_batches": cfg.get("eval", {}).get("batches"),
        "health_check_s": float(env.get(HC, cfg["failure"]["health_check_interval_s"])),
        "nice": runs[0]["start"].get("nice") if runs else None,  # rank 0's training thread
        "threads": runs[0]["start"].get("threads") if runs else None,  # torch's, per worker
        "cores": os.cpu_count(),  # the harness runs everything on this machine
        "gpu": cfg["scaling"]["use_gpu"],
        "precision": cfg["training"]["precision"],
        "deterministic": cfg["training"]["deterministic"],
        "options": cfg["task"]["options"],
    }


def describe(st: dict[str, Any], launcher: str = "ray") -> str:
    """One line of effective settings for a table (torchrun has no health check or upload)."""
    if not st:
        return "settings not recorded"
    parts = [
        f"{st['task']}",
        f"{st['workers']} workers",
        f"{st['steps']} steps",
        f"checkpoint {_every(st['checkpoint_every'], 'at the end only')}",
    ]
    if st.get("threads") is not None:
        parts += [f"{st['threads']} torch thread{'s' if st['threads'] != 1 else ''} per worker"]
    if st.get("cores") is not None:
        # Nothing is pinned: the launcher's own processes compete with the workers.
        others = "Ray's daemons and driver" if launcher == "ray" else "torchrun's agent"
        parts += [f"{st['cores']} cores shared with {others}"]
    if st.get("nice") is not None:
        parts += [f"nice {st['nice']}"]
    parts += [f"{key} {value}" for key, value in sorted((st.get("options") or {}).items())]
    parts += [f"global batch {st['global_batch']}"]
    # Said where a run leaves the defaults (CPU, fp32, non-deterministic kernels).
    parts += ["1 GPU per worker"] if st.get("gpu") else []
    parts += [st["precision"]] if st.get("precision", "fp32") != "fp32" else []
    parts += ["deterministic"] if st.get("deterministic") else []
    if launcher == "ray":
        parts += [f"upload {st['upload']}", f"report {_every(st['report_every'], 'never')}"]
        parts += [f"health check {st['health_check_s']:g} s"]
        if st.get("eval_batches") == 0:
            parts += ["evaluation off"]
    return ", ".join(parts)


def _every(steps: int | None, beyond_the_run: str) -> str:
    return beyond_the_run if not steps or steps >= 10**9 else f"every {steps}"


def chaos_kills(run_dir: Path) -> list[dict[str, Any]]:
    """The kills ``chaos`` fired, as ``recoveries`` takes them: a firing rank writes its marker
    (``<run dir>/chaos/fault-<i>.fired``) just before it SIGKILLs itself."""
    markers = sorted(Path(run_dir).glob("chaos/fault-*.fired"))
    return [{"time": marker.stat().st_mtime} for marker in markers]


def final_weights(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """(step, model state) of the run's newest valid checkpoint."""
    fs = pafs.LocalFileSystem()
    info = checkpoint.newest_valid(fs, str(run_dir))
    return None if info is None else (info.step, checkpoint.load(fs, info.path)["model"])


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same names, dtypes, shapes and bytes (``torch.equal`` would call -0.0 equal to 0.0)."""
    if a.keys() != b.keys():
        return False
    return all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.cpu().reshape(-1).view(torch.uint8).equal(y.cpu().reshape(-1).view(torch.uint8))
        for x, y in ((a[k], b[k]) for k in a)
    )
