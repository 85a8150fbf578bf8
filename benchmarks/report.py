"""The machine statement, the Markdown table and the plot."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import cpu


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "ray": metadata.version("ray"),
        "kernel": platform.release(),
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _s(st: dict[str, Any] | None, digits: int = 2) -> str:
    """median [min-max] (n)"""
    if not st or not st.get("n"):
        return "n/a"
    if st["n"] == 1:
        return _f(st["median"], digits)
    return (
        f"{_f(st['median'], digits)} [{_f(st['min'], digits)}-{_f(st['max'], digits)}] "
        f"(n={st['n']})"
    )


def markdown(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    out = [
        f"# elastic-trainer benchmarks ({r.get('mode')} mode)",
        "",
        f"- Date: {m.get('date')}; duration {_f(r.get('duration_s'), 0)} s; "
        f"commit {m.get('git_commit')}",
        f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
        f"Python {m.get('python')}, torch {m.get('torch')}, ray {m.get('ray')}; "
        f"load average at start {_load(m.get('loadavg_start'))}, at end "
        f"{_load(m.get('loadavg_end'))}",
        "- The machine is shared (other jobs, Docker builds and Ray tests ran at the same "
        "time): compare ratios measured alternately in this run, not absolute numbers across "
        "runs.",
        "- Cells: median [min-max] (n = runs, or checkpoints/kills where stated). Model: the "
        "demo MLP [128, 128] on 32 features, global batch 64, 2 CPU workers (gloo) unless "
        "stated.",
        "",
    ]
    if r.get("failures"):
        out += ["**Failures:** " + "; ".join(r["failures"]), ""]
    if "exact" in r or r.get("device_floor"):
        out += [device_table(r), ""]
    for o in r.get("overhead", {}).values():
        out += [
            f"## Overhead when nothing fails: {o['task']} ({o['steps']} steps, launched "
            "alternately)",
            "",
            "| | start-up: command -> first step (s) | steady steps/s | step-only steps/s "
            "| wall (s) | CPU in the steady window (cores): training / spares / rest of the run "
            "/ outside it | settings |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind, label in (("torchrun", "plain torchrun DDP"), ("ray", "Ray Train (CLI)")):
            s = o.get(kind, {})
            medians = [(s.get("cpu") or {}).get(g, {}).get("median") for g in cpu.GROUPS]
            used = " / ".join(_f(m, 2) for m in medians)
            out.append(
                f"| {label} | {_s(s.get('startup_s'), 1)} | {_s(s.get('steps_per_s'), 1)} | "
                f"{_s(s.get('compute_steps_per_s'), 1)} | {_s(s.get('wall_s'), 1)} | {used} | "
                f"{s.get('settings', 'n/a')} |"
            )
        out += [
            "",
            f"- Ratio Ray/torchrun, steady steps/s (pairs): **{_s(o.get('ratio_steps_per_s'))}**;"
            f" step-only: {_s(o.get('ratio_compute_steps_per_s'))}; start-up: "
            f"{_s(o.get('ratio_startup'))}",
            "- Ray runs the shipped config with nothing forced (project defaults). steady "
            "steps/s: end to end after a 10% warm-up, report/checkpoint/evaluation/log stalls "
            "included. step-only: the step's own timer (batch, forward, backward, all-reduce, "
            "optimizer).",
            "",
        ]
    if "cadence" in r:
        out += [
            "## Cost of the report/checkpoint cadence (Ray, one warm Ray instance)",
            "",
            "| cadence | steps | steady steps/s | vs never | pause per metrics report (s) | "
            "pause per checkpoint (s) | report call with checkpoint, blocked_s (s) | "
            "fit() -> first step (s) | settings |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["cadence"]:
            out.append(
                f"| {row['label']} | {row.get('steps')} | {_s(row['steps_per_s'], 1)} | "
                f"{_s(row['ratio_vs_never'])} | {_s(row.get('report_paused_s'), 3)} | "
                f"{_s(row['checkpoint_paused_s'], 3)} | "
                f"{_s(row['checkpoint_blocked_s'], 3)} | {_s(row['fit_to_first_step_s'], 1)} | "
                f"{row.get('settings', 'n/a')} |"
            )
        out += [""]
    if "stall" in r or "floor" in r:
        out += [
            "## Checkpoint stall vs state size (model + AdamW state)",
            "",
            "| state | upload | training paused per checkpoint (s) | paused / in-memory copy "
            "| rank 0 blocked_s (s) | steps/s while the save runs (x none in flight) "
            "| settings |",
            "|---|---|---|---|---|---|---|",
        ]
        copies = {
            row["label"]: (row.get("copy_s") or {}).get("median") for row in r.get("floor", [])
        }
        for row in r.get("stall", []):
            paused, copy = (row["paused_s"] or {}).get("median"), copies.get(row["size"])
            ratio = paused / copy if paused is not None and copy else None
            out.append(
                f"| {row['size']} | {row['mode']} | {_s(row['paused_s'], 3)} | {_f(ratio)} | "
                f"{_s(row['blocked_s'], 3)} | {_s(row.get('save_dip'))} | "
                f"{row.get('settings', 'n/a')} |"
            )
        out += [
            "",
            "- paused: gap between the step before and after the checkpoint minus the median "
            "interval of steps with no save in flight (a save ends when its manifest, written "
            "last, is on storage), as the other ranks see it too; each run's median over its "
            "checkpoints, then median [min-max] over the runs (n = runs). "
            "paused / in-memory copy: its median over the floor's copy of the same state. "
            "blocked_s: rank 0's own checkpoint call as the loop logs it (flush the run log, "
            "wait for the previous save, copy the state into reusable CPU buffers, hand the "
            "report to the report thread); the report's barrier, serialising, checksumming and "
            "writing run in the background. steps/s while the save runs: median interval with "
            "no save in flight / median interval while one is (1.00 = no dip). Evaluation is "
            "off in these runs (see settings) so that its forward passes are not counted.",
            "",
            "Floor, measured in-process on the same disk:",
            "",
            "| state | size (MB) | copy in memory (s) | torch.save to memory (s) | write, page "
            "cache (s) | write + fsync (s) | load (s) | write MB/s | write+fsync MB/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r.get("floor", []):
            out.append(
                f"| {row['label']} | {_f(row['state_mb'], 1)} | {_s(row['copy_s'], 3)} | "
                f"{_s(row['serialize_s'], 3)} | {_s(row['write_s'], 3)} | "
                f"{_s(row['write_fsync_s'], 3)} | {_s(row['load_s'], 3)} | "
                f"{_f(row['write_mb_per_s'], 0)} | {_f(row['write_fsync_mb_per_s'], 0)} |"
            )
        out += [""]
    if "recovery" in r:
        out += [
            "## Recovery: SIGKILL of world rank 1 -> training again",
            "",
            "| launcher | detect (s) | restart group (s) | init + checkpoint load (s) | "
            "first step (s) | kill -> first step (s) | steps redone | kill -> back at the "
            "killed step (s) | new rank 0 in a warm spare | settings |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["recovery"]:
            warm = [x.get("warm_spare") for x in row.get("runs", [])]
            warm_cell = f"{sum(warm)}/{len(warm)}" if warm and None not in warm else "-"
            out.append(
                f"| {row['label']} | {_s(row['detect_s'])} | {_s(row['restart_s'])} | "
                f"{_s(row['init_load_s'])} | {_s(row['first_step_s'], 3)} | "
                f"**{_s(row['total_s'])}** | {_s(row['steps_redone'], 0)} | "
                f"{_s(row['back_to_kill_point_s'])} | {warm_cell} | "
                f"{row.get('settings', 'n/a')} |"
            )
        out += [
            "",
            "- From the run log: detect: kill -> `failure_detected` (Ray Train's controller "
            "decided to retry; torchrun: the agent's restart line in its output, the one "
            "figure read from console text, otherwise folded into restart). restart: -> "
            "`group_started` (the new group's training function launched; torchrun: the new "
            "worker process began). init + load: -> the attempt's `start` event (data, model, "
            "DDP, newest valid checkpoint).",
            "",
            "Ray Train's split of the restart (the `group_started` event; the placement group "
            "as Ray's GCS timed it), median [min-max] s:",
            "",
            "| launcher | placement group | actor processes | train context (imports) | "
            "launch | group start total |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["recovery"]:
            if row["key"] == "torchrun":
                continue
            out.append(
                f"| {row['label']} | {_s(row.get('placement_group_s'))} | "
                f"{_s(row.get('actors_s'))} | {_s(row.get('train_context_s'))} | "
                f"{_s(row.get('launch_s'))} | {_s(row.get('group_total_s'))} |"
            )
        out += [""]
    if r.get("goodput"):
        out += [
            "## Goodput with a worker killed every T seconds",
            "",
            "| launcher | T (s) | kills fired / due | wall (s) | effective steps (redone) | "
            "**goodput** | effective steps/s | no-failure steps/s | settings |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["goodput"]:
            if "missing" in row:
                out.append(f"| {row['launcher']} | {row['every_s']} | missing: "
                           f"{row['missing']} | | | | | | |")  # fmt: skip
                continue
            out.append(
                f"| {row['launcher']} | {row['every_s']} | {row.get('kills_fired')} / "
                f"{row.get('kills_expected')} | {_f(row.get('wall_s'), 0)} | "
                f"{row.get('effective_steps', 'n/a')} ({row.get('steps_redone', 'n/a')}) | "
                f"**{_f(row.get('goodput'), 3)}** | {_f(row.get('effective_steps_per_s'), 1)} | "
                f"{_f(row.get('no_failure_steps_per_s'), 1)} | {row.get('settings', 'n/a')} |"
            )
        out += [
            "",
            "- goodput (the standard definition): effective steps (those the final model "
            "contains, `training.core.runlog.effective_history`; redone steps excluded) x the "
            "no-failure step period / wall time. The period comes from a no-failure run of the "
            "same config, launcher and length in this benchmark run, over the same span: its "
            "first step to its last (start-up is in the overhead table). Kills are due at T, "
            "2T, ... after the first step; a slot that falls while "
            "the run is still recovering is skipped, so fired < due when recovery takes "
            "longer than T.",
            "",
        ]
    return "\n".join(out) + "\n"


def device_table(r: dict[str, Any]) -> str:
    """The GPU check (``--plan gpu``) in one table, each row with the settings it ran under."""
    rows = _speed_rows(r) + _exact_rows(r.get("exact")) + _pause_rows(r)
    out = [
        "## GPU check: Ray Train on one GPU worker",
        "",
        "| measurement | value | compared with | ratio | settings |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(out + [f"| {' | '.join(cells)} |" for cells in rows])


def _speed_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    o = r.get("overhead", {}).get("lm")
    if not o:
        return []
    ray, torchrun = o.get("ray", {}), o.get("torchrun", {})
    settings = f"Ray: {ray.get('settings')}; torchrun: {torchrun.get('settings')}"
    figures = (
        ("steady steps/s", "steps_per_s", "ratio_steps_per_s"),
        ("command -> first step (s)", "startup_s", "ratio_startup"),
    )
    return [
        (
            f"language model, {what}, Ray Train (alternating with torchrun)",
            _s(ray.get(key), 1),
            f"torchrun {_s(torchrun.get(key), 1)}",
            _s(o.get(ratio)),
            settings,
        )
        for what, key, ratio in figures
    ]


def _exact_rows(e: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not e:
        return []
    equal = {True: "yes", False: "**NO**", None: "n/a"}[e["bitwise_equal"]]
    verify = "ok" if e["verify_rc"] == 0 else f"**FAILED** (exit {e['verify_rc']})"
    final = f"final steps {e['final_steps']} (uninterrupted, killed)"
    return [
        ("rank 0 SIGKILLed: kill -> first step again (s)", _s(e["total_s"]), "", "", e["settings"]),
        ("rank 0 SIGKILLed: steps redone", _s(e["steps_redone"], 0), "", "", e["settings"]),
        ("final weights bitwise equal to an uninterrupted run", equal, final, "", e["settings"]),
        ("`python -m training verify` of the killed run", verify, e["verify"], "", e["settings"]),
    ]


def _pause_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    floors = {row["label"]: row for row in r.get("device_floor", [])}
    rows = []
    for row in r.get("stall", []):
        floor = floors.get(row["size"], {})
        copy, paused = (floor.get("d2h_s") or {}).get("median"), row["paused_s"].get("median")
        rows.append(
            (
                f"checkpoint pause, {_f(floor.get('state_mb'), 0)} MB state, {row['mode']} upload",
                _s(row["paused_s"], 3),
                f"device -> pinned host copy {_s(floor.get('d2h_s'), 3)} ({floor.get('device')})",
                _f(paused / copy if paused is not None and copy else None),
                row["settings"],
            )
        )
    return rows


def _load(value: Any) -> str:
    return "n/a" if not value else "/".join(f"{v:.1f}" for v in value)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = r.get("machine", {})
    fig.suptitle(
        f"elastic-trainer benchmarks ({r.get('mode')}), {m.get('date')}\n"
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"torch {m.get('torch')}, ray {m.get('ray')} (shared, noisy machine)",
        fontsize=10,
    )

    ax = axes[0][0]
    labels, values, lo, hi = [], [], [], []
    o = r.get("overhead", {}).get("mlp", {})
    for kind, label in (("torchrun", "torchrun"), ("ray", "Ray CLI\n(local.yaml)")):
        _bar_item(o.get(kind, {}).get("steps_per_s"), label, labels, values, lo, hi)
    for row in r.get("cadence", []):
        _bar_item(row["steps_per_s"], row["key"].replace("_", "\n"), labels, values, lo, hi)
    _bars(ax, labels, values, lo, hi, "steady steps/s (higher is better)")

    ax = axes[0][1]
    phases = ["detect_s", "restart_s", "init_load_s", "redo_s"]
    rows = r.get("recovery", [])
    bottom = [0.0] * len(rows)
    for phase in phases:
        heights = [(row.get(phase) or {}).get("median") or 0.0 for row in rows]
        ax.bar([row["key"] for row in rows], heights, bottom=bottom, label=phase[:-2])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for kind, label in (("torchrun", "torchrun\nstart-up"), ("ray", "ray CLI\nstart-up")):
        st = o.get(kind, {}).get("startup_s") or {}
        if st.get("median"):
            ax.bar(label, st["median"], color="grey")
    ax.set_ylabel("seconds (median)")
    ax.set_title("recovery after SIGKILL by phase; cold start-up", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for mode, marker in (("sync", "o"), ("async", "s")):
        pts = [
            (_mb(r, row["size"]), row["paused_s"].get("median"))
            for row in r.get("stall", [])
            if row["mode"] == mode and row["paused_s"].get("median") is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=f"paused, {mode}")
    fl = r.get("floor", [])
    if fl:
        xs = [row["state_mb"] for row in fl]
        for key, label in (
            ("copy_s", "floor: copy in memory"),
            ("write_s", "floor: write (page cache)"),
            ("write_fsync_s", "floor: write + fsync"),
        ):
            ax.plot(xs, [row[key]["median"] for row in fl], linestyle="--", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint state (MB)")
    ax.set_ylabel("seconds per checkpoint (median)")
    ax.set_title("checkpoint stall vs floor", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    rows = r.get("goodput", [])
    if rows:
        ax.bar(
            [f"{row['launcher']}\nT={row['every_s']}s" for row in rows],
            [row.get("goodput") or 0 for row in rows],
        )
        ax.set_ylim(0, 1)
    ax.set_ylabel("goodput")
    ax.set_title("goodput with a worker killed every T s (full mode)", fontsize=10)

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mb(r: dict[str, Any], label: str) -> float:
    for row in r.get("floor", []) + r.get("device_floor", []):
        if row["label"] == label:
            return row["state_mb"]
    number, unit = label.split()
    return float(number) * (1000 if unit == "GB" else 1)


def _bar_item(st, label, labels, values, lo, hi) -> None:
    if not st or st.get("median") is None:
        return
    labels.append(label)
    values.append(st["median"])
    lo.append(st["median"] - st["min"])
    hi.append(st["max"] - st["median"])


def _bars(ax, labels, values, lo, hi, title) -> None:
    if labels:
        ax.bar(labels, values, yerr=[lo, hi], capsize=3)
        ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title + "; bars: median, whiskers: min-max", fontsize=10)
