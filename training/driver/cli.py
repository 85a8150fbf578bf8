"""Command line: ``python -m training {train,status,verify,plot,demo-data,check-task}``.

Exit codes: 0 success, 1 training failed (or the ledger check failed), 2 bad config or usage
(storage that cannot be reached or used before a run starts included), 130 interrupted (the run
can be resumed by running the same command again).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from training.core import checkpoint, runlog, storage
from training.core.config import ConfigError, StorageSection, read_raw, validate_sections
from training.driver import lease

# The task registry (and with it torch, a 2-3 s import) is loaded by the commands that train or
# build a task; `status`, `verify` and `plot` read storage and need neither.

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fault-tolerant, elastic PyTorch DDP training on Ray Train."""


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config file.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set training.epochs=3 (repeatable).",
)
@click.option("--name", help="Shortcut for --set run.name=NAME.")
@click.option("--storage", "storage_path", help="Shortcut for --set storage.path=PATH.")
@click.option(
    "--wait-for-lease",
    is_flag=True,
    help="If another driver is training this run, wait until it stops (default: exit 2).",
)
@click.option(
    "--lease-dead-job",
    "dead_jobs",
    multiple=True,
    metavar="SUBMISSION_ID",
    help="A Ray job known to have ended: its lease on the run is free at once (supervisor).",
)
@click.option(
    "--verbose",
    is_flag=True,
    help="Ray Train's own logging on the console too: worker groups starting and stopping, the "
    "full tracebacks of a failed attempt (default: one line per failed attempt; Ray Train's log "
    "files hold it all either way).",
)
def train(
    config_path: str | None,
    overrides: tuple[str, ...],
    name: str | None,
    storage_path: str | None,
    wait_for_lease: bool,
    dead_jobs: tuple[str, ...],
    verbose: bool,
) -> None:
    """Train, or resume the run named by storage.path + run.name.

    Example: python -m training train --config training/configs/local.yaml --set training.epochs=2
    """
    from training.driver import launch

    extra = [f"run.name={name}"] * bool(name) + [f"storage.path={storage_path}"] * bool(
        storage_path
    )
    cfg = _load_or_exit(config_path, [*overrides, *extra])
    try:
        summary = launch.train(
            cfg,
            on_connected=_exit_cleanly_on_sigterm,
            wait_for_lease=wait_for_lease,
            dead_jobs=dead_jobs,
            verbose=verbose,
        )
    except (ConfigError, storage.StorageError) as exc:  # both raised before training starts
        _fail(EXIT_USAGE, f"error: {exc}")
    except lease.LeaseHeld as held:
        _fail(
            EXIT_USAGE,
            f"error: run '{cfg.run.name}' is already training ({held}); "
            "stop that driver first, or pass --wait-for-lease to wait for it",
        )
    except launch.RunStopped as exc:
        _fail(EXIT_FAILED, f"Training stopped: {exc}")
    except KeyboardInterrupt:
        _fail(EXIT_INTERRUPTED, f"Interrupted. {launch.resume_hint(cfg)}")
    except Exception as exc:  # Ray's TrainingFailedError and anything the workers raised
        cause = launch.storage_cause(cfg, exc)  # a worker's storage error, named
        lines = [*_failure_lines(exc, verbose), *[cause] * bool(cause)]
        _fail(EXIT_FAILED, "\n".join([*lines, launch.resume_hint(cfg)]))
    _print_summary(summary)


@main.command()
@click.option("--storage", "storage_path", help="Storage path holding runs (default: config's).")
@click.option("--name", help="Only this run.")
@click.option("--config", "config_path", type=click.Path(), help="Take storage settings from here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(
    storage_path: str | None, name: str | None, config_path: str | None, as_json: bool
) -> None:
    """Runs under a storage path: checkpoints (step, validity from manifests and file sizes;
    `verify --deep` reads their checksums), progress, attempts."""
    storage_cfg = _storage_section(config_path, storage_path)
    with _storage_used(storage_cfg) as (fs, root):
        run_dirs = [posixpath.join(root, name)] if name else runlog.list_runs(fs, root)
        report = [_run_status(fs, run_dir) for run_dir in run_dirs]
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    if not report:
        click.echo(f"No runs under {root}")
    for run in report:
        _print_run_status(run)


@main.command()
@click.option("--storage", "storage_path", help="Storage path holding the run.")
@click.option("--name", required=True, help="Run name.")
@click.option("--config", "config_path", type=click.Path(), help="Take storage settings from here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--deep",
    is_flag=True,
    help="Also read every kept checkpoint and check it against its manifest's SHA-256 (reads "
    "every byte: slow for large states on S3); exit 1 if one does not match.",
)
def verify(
    storage_path: str | None, name: str, config_path: str | None, as_json: bool, deep: bool
) -> None:
    """Check the exactly-once sample ledger over the run's effective history (exit 1 if broken)."""
    storage_cfg = _storage_section(config_path, storage_path)
    with _storage_used(storage_cfg) as (fs, root):
        run_dir = posixpath.join(root, name)
        report = runlog.check_ledger(runlog.read_events(fs, run_dir))
        checkpoints = _hashed_checkpoints(fs, run_dir) if deep else []
    if as_json:
        click.echo(json.dumps(report.__dict__ | ({"checkpoints": checkpoints} if deep else {})))
    else:
        verdict = "holds" if report.ok else "is BROKEN"
        click.echo(
            f"Exactly-once ledger {verdict} for {run_dir}: {report.final_step} steps, "
            f"{report.attempts} attempts, world sizes {report.world_sizes}, "
            f"resumed from steps {report.resumed_from_steps}, completed={report.completed}, "
            f"consumption witnessed for {report.witnessed_steps} of {report.final_step} steps"
        )
        for error in report.errors:
            click.echo(f"  - {error}")
        _print_checkpoints(checkpoints)
    sys.exit(0 if report.ok and all(c["valid"] for c in checkpoints) else EXIT_FAILED)


def _hashed_checkpoints(fs, run_dir: str) -> list[dict[str, Any]]:
    """Every checkpoint of the run, its validity from its files' SHA-256 (reads every byte)."""
    infos = checkpoint.scan(fs, run_dir, full=True)
    return [{"step": i.step, "valid": i.valid, "reason": i.reason, "path": i.path} for i in infos]


def _print_checkpoints(checkpoints: list[dict[str, Any]]) -> None:
    for ckpt in checkpoints:
        state = "checksums match" if ckpt["valid"] else f"INVALID ({ckpt['reason']})"
        click.echo(f"  checkpoint step {ckpt['step']}: {state}  ({ckpt['path']})")


@main.command()
@click.option("--storage", "storage_path", help="Storage path holding the run.")
@click.option("--name", required=True, help="Run name.")
@click.option("--config", "config_path", type=click.Path(), help="Take storage settings from here.")
@click.option("--out", "out_path", help="PNG file to write (default: ./<name>.png).")
def plot(
    storage_path: str | None, name: str, config_path: str | None, out_path: str | None
) -> None:
    """PNG of loss and the task's metrics over global steps, with restarts, resizes and
    checkpoints marked, read from the run log (local or s3:// storage). Needs matplotlib:
    pip install 'elastic-trainer[plot]'.

    Example: python -m training plot --storage ./runs --name demo --out demo.png
    """
    from training.observability import plot as plotting

    storage_cfg = _storage_section(config_path, storage_path)
    with _storage_used(storage_cfg) as (fs, root):
        run_dir = posixpath.join(root, name)
        events = runlog.read_events(fs, run_dir)
    if not events:
        _fail(EXIT_FAILED, f"No run log under {storage.display(fs, run_dir)}")
    out_path = out_path or f"{name}.png"
    try:
        picture = plotting.write_png(events, out_path, title=f"run {name!r}")
    except plotting.PlotUnavailable as exc:
        _fail(EXIT_USAGE, f"error: {exc}")
    click.echo(
        f"Wrote {out_path}: {len(picture.panels)} metrics ({', '.join(picture.panels)}), "
        f"{len(picture.train.kept)} kept and {len(picture.train.rolled_back)} rolled-back step "
        f"points, {len(picture.restarts)} restarts, {len(picture.checkpoints.kept)} checkpoints"
    )


@main.command("demo-data")
@click.option(
    "--task",
    "task_name",
    default="tabular",
    show_default=True,
    help="Whose demo data: tabular (synthetic, 32 features, 4 classes), language_model (the "
    "stdlib's docstrings as text) or image (scikit-learn's digits as PNG files).",
)
@click.option("--out", required=True, help="Where to write (local path or s3://).")
@click.option("--config", "config_path", type=click.Path(), help="Task options from here.")
def demo_data(task_name: str, out: str, config_path: str | None) -> None:
    """Write a built-in task's demo dataset (the same bytes every time)."""
    from training import tasks

    overrides = [f"task.name={task_name}", f"data.path={out}"]
    cfg = _load_or_exit(config_path, overrides)
    try:
        tasks.build(cfg.task.name, cfg.task.options, tasks.data_source(cfg)).write_demo()
    except tasks.TaskError as exc:
        _fail(EXIT_USAGE, f"error: {exc}")
    click.echo(f"Wrote the {task_name} demo data to {out}")


@main.command("check-task")
@click.option("--config", "config_path", type=click.Path(), help="YAML config naming the task.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value.")
def check_task(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Run the task contract checks on a task and its data (no Ray): pure batches, additive
    totals, a deterministic step, a stable fingerprint. Exit 1 if one fails."""
    from training import tasks
    from training.tasks.contract import CHECKS, run_contract

    cfg = _load_or_exit(config_path, list(overrides))
    try:
        failures = run_contract(cfg.task.name, cfg.task.options, tasks.data_source(cfg))
    except tasks.TaskError as exc:
        _fail(EXIT_USAGE, f"error: {exc}")
    for line in failures:
        click.echo(f"FAIL {line}")
    click.echo(f"task '{cfg.task.name}': {'contract holds' if not failures else 'BROKEN'}")
    if not failures:
        click.echo("".join(f"  ok  {check}\n" for check in CHECKS), nl=False)
    sys.exit(EXIT_FAILED if failures else 0)


def _failure_lines(exc: Exception, verbose: bool) -> list[str]:
    """Why training failed. Ray's error for failed workers (its tracebacks, cut short) becomes
    its first line and one line per failed rank (``failures.describe``) unless --verbose; any
    other error is shown whole."""
    from training.observability import failures

    text = str(exc)
    per_rank = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if verbose or not per_rank:
        return [f"Training failed: {type(exc).__name__}: {text}"]
    ranks = [f"  {failures.describe(r, e)}" for r, e in sorted(per_rank.items())]
    more = "  (the full error: run again with --verbose, or Ray's logs/train/ in its session dir)"
    return [f"Training failed: {type(exc).__name__}: {text.splitlines()[0]}", *ranks, more]


def _load_or_exit(config_path: str | None, overrides: list[str]):
    """The whole config, the task's options validated by the task's own model."""
    from training.driver.settings import load_config

    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        _fail(EXIT_USAGE, "\n".join(f"config error: {line}" for line in lines))


def _storage_section(config_path: str | None, storage_path: str | None) -> StorageSection:
    """The storage settings alone: the task's options are not checked (no task is built)."""
    overrides = [f"storage.path={storage_path}"] if storage_path else []
    try:
        return validate_sections(read_raw(config_path, overrides)).storage
    except ConfigError as exc:
        _fail(EXIT_USAGE, "\n".join(f"config error: {line}" for line in str(exc).splitlines()))


@contextlib.contextmanager
def _storage_used(section: StorageSection) -> Iterator[tuple[Any, str]]:
    """(filesystem, root) of storage.path for the block; a store that cannot be reached or used
    exits 2 with one line naming the endpoint, the path and what to check."""
    try:
        storage.check_reachable(section.path, section)
        fs, root = storage.resolve(section.path, section)
        with storage.named_errors(fs, section.path):
            yield fs, root
    except storage.StorageError as exc:
        _fail(EXIT_USAGE, f"error: {exc}")


def _exit_cleanly_on_sigterm() -> None:
    """`ray job stop` and Kubernetes send SIGTERM: treat it like Ctrl-C (state on storage is
    always consistent, so stopping at any moment loses at most the steps since the checkpoint).
    Installed after ray.init, which sets a SIGTERM handler of its own."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _fail(code: int, message: str) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _run_status(fs, run_dir: str) -> dict[str, Any]:
    infos = checkpoint.scan(fs, run_dir)
    summary = runlog.summarize(runlog.read_events(fs, run_dir))
    return {
        "run_dir": run_dir,
        "name": posixpath.basename(run_dir),
        "checkpoints": [{"step": i.step, "valid": i.valid, "reason": i.reason} for i in infos],
        **summary,
    }


def _print_run_status(run: dict[str, Any]) -> None:
    click.echo(f"{run['name']}  ({run['run_dir']})")
    click.echo(
        f"  {run['state']} at step {run['final_step']} of {run['total_steps'] or '?'}, attempts "
        f"{run['attempts']}, world sizes {run['world_sizes']}, {_metrics_line(run)}"
    )
    for ckpt in run["checkpoints"]:
        state = "valid" if ckpt["valid"] else f"INVALID ({ckpt['reason']})"
        click.echo(f"  checkpoint step {ckpt['step']}: {state}")


def _metrics_line(run: dict[str, Any]) -> str:
    shown = [f"train {k} {_fmt(v)}" for k, v in run["train"].items()]
    shown += [f"{k.replace('_', ' ', 1)} {_fmt(v)}" for k, v in run["val"].items()]
    return ", ".join(shown) or "no metrics yet"


def _print_summary(summary: dict[str, Any]) -> None:
    kept = ", ".join(str(c["step"]) for c in summary["checkpoints"] if c["valid"]) or "none"
    rows = [("steps", summary["final_step"])]
    if summary["train_steps"]:
        first, last = summary["train_steps"]
        rows += [("train metrics", f"steps {first}-{last} (the last log interval)")]
    rows += [(f"train {k}", _fmt(v)) for k, v in summary["train"].items()]
    if summary["val_step"] is not None:
        rows += [("val metrics", f"at step {summary['val_step']}")]
    rows += [(k.replace("_", " ", 1), _fmt(v)) for k, v in summary["val"].items()]
    rows += [
        ("restarts", f"{summary['restarts']} (world sizes {summary['world_sizes']})"),
        ("checkpoints kept", f"steps {kept}"),
        ("run files", summary["run_dir"]),
    ]
    width = max(18, *(len(label) + 2 for label, _ in rows))
    lines = ["", "Training finished"] + [
        f"  {label + ':':<{width}}{value}" for label, value in rows
    ]
    click.echo("\n".join(lines))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
