"""Load a run's configuration: the YAML file and ``--set`` overrides, every section validated,
then the task's options against the task's own model (with its defaults filled in, so the saved
config and the run identity are explicit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import tasks
from training.core.config import Config, ConfigError, read_raw, validate_sections


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply overrides, validate; ConfigError has one line per error."""
    return parse_config(read_raw(path, overrides))


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate the whole config, the task's options included (with the task's own model)."""
    cfg = validate_sections(raw)
    try:
        options = tasks.parse_options(tasks.task_class(cfg.task.name), cfg.task.options)
    except tasks.TaskError as exc:
        raise ConfigError(str(exc)) from None
    cfg.task.options = options.model_dump()
    return cfg
