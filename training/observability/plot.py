"""A PNG of a run from its run log alone: every metric over global steps, restarts, resizes and
checkpoints marked.

    python -m training plot --name demo --storage ./runs --out demo.png   # needs [plot] extra

One panel per metric (loss first): the history the final model contains as a line, the steps
that a restart rolled back (ran after the last checkpoint, then redone) as grey crosses, eval
points as dots on the panel of the matching training metric (``val_loss`` on ``loss``).
Vertical lines mark restarts at the step they resumed from (red: same world size, purple: a
resize), ticks along the bottom the checkpoints. Metrics are whatever numeric fields the task
logged (training/core/events.py), so a new task's metrics show up without changes here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from training.core.events import FRAMEWORK_METRICS, Point, Series, split_history

FIRST_METRICS = ("loss",)
# The framework's own fields: drawn after the task's metrics, whatever order they came in.
LAST_METRICS = FRAMEWORK_METRICS
PANEL_COLUMNS = 2
PANEL_SIZE_IN = (6.0, 2.6)


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: it is an optional extra."""


@dataclass
class Restart:
    step: int  # the step the attempt resumed from (0: from scratch)
    world_before: int | None
    world_after: int

    @property
    def is_resize(self) -> bool:
        return self.world_before is not None and self.world_before != self.world_after


@dataclass
class RunPicture:
    """Everything the figure shows, computed from the events (tested without matplotlib)."""

    train: Series
    evals: Series
    checkpoints: Series
    restarts: list[Restart]
    panels: list[str]
    eval_panel: dict[str, str]  # eval metric -> the panel it is drawn on


def describe(events: list[dict[str, Any]]) -> RunPicture:
    train, evals = split_history(events, "step"), split_history(events, "eval")
    train_names = _names(train)
    eval_panel = {name: _matching_panel(name, train_names) for name in _names(evals)}
    panels = train_names + [n for n in eval_panel.values() if n not in train_names]
    return RunPicture(
        train=train,
        evals=evals,
        checkpoints=split_history(events, "checkpoint"),
        restarts=restarts(events),
        panels=list(dict.fromkeys(panels)),
        eval_panel=eval_panel,
    )


def restarts(events: list[dict[str, Any]]) -> list[Restart]:
    starts = [e for e in events if e["event"] == "start"]
    return [
        Restart(now.get("resumed_from_step") or 0, before.get("world_size"), now["world_size"])
        for before, now in itertools.pairwise(starts)
    ]


def _names(series: Series) -> list[str]:
    seen = list(dict.fromkeys(n for p in series.kept + series.rolled_back for n in p.values))

    def rank(name: str) -> tuple[int, int]:
        if name in LAST_METRICS:
            return 2, LAST_METRICS.index(name)
        return (0 if name in FIRST_METRICS else 1), seen.index(name)

    return sorted(seen, key=rank)


def _matching_panel(eval_name: str, train_names: list[str]) -> str:
    bare = eval_name.removeprefix("val_").removeprefix("eval_")
    return bare if bare in train_names else eval_name


def write_png(events: list[dict[str, Any]], out_path: str, title: str) -> RunPicture:
    """Draw the run into ``out_path``; raises PlotUnavailable without matplotlib."""
    picture = describe(events)
    plt = _pyplot()
    rows = max(math.ceil(len(picture.panels) / PANEL_COLUMNS), 1)
    width, height = PANEL_SIZE_IN
    fig, axes = plt.subplots(
        rows, PANEL_COLUMNS, figsize=(width * PANEL_COLUMNS, height * rows + 0.8), squeeze=False
    )
    flat = list(axes.flat)
    for ax, name in zip(flat, picture.panels, strict=False):
        _draw_panel(ax, name, picture)
    for ax in flat[len(picture.panels) :]:
        ax.set_visible(False)
    if picture.panels:
        flat[0].legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{title}: {_headline(picture)}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return picture


def _headline(picture: RunPicture) -> str:
    final = max((p.step for p in picture.train.kept), default=0)
    resizes = sum(r.is_resize for r in picture.restarts)
    return (
        f"{final} steps, {len(picture.restarts)} restarts ({resizes} resizes), "
        f"{len(picture.checkpoints.kept)} checkpoints"
    )


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(
            "plot needs matplotlib: pip install 'elastic-trainer[plot]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")  # files only: no display needed (servers, containers, CI)
    import matplotlib.pyplot as plt

    return plt


def _draw_panel(ax, name: str, picture: RunPicture) -> None:
    # Rolled-back points first, underneath: a resumed run redoes them exactly, so they often
    # coincide with the kept line and only stick out where something differed.
    lost = _xy(picture.train.rolled_back, name)
    if lost[0]:
        ax.plot(*lost, "x", color="0.55", markersize=3, label="rolled back by a restart")
    ax.plot(*_xy(picture.train.kept, name), color="C0", linewidth=1.2, label="train (kept history)")
    for eval_name, panel in picture.eval_panel.items():
        if panel == name:
            ax.plot(*_xy(picture.evals.kept, eval_name), "o-", color="C1", markersize=3,
                    linewidth=0.8, label=f"eval {eval_name}")  # fmt: skip
    _mark_events(ax, picture)
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)


def _mark_events(ax, picture: RunPicture) -> None:
    for i, restart in enumerate(picture.restarts):
        colour, kind = ("purple", "resize") if restart.is_resize else ("red", "restart")
        worlds = f"{restart.world_before}->{restart.world_after}" if restart.is_resize else ""
        label = f"{kind} (world {worlds or restart.world_after})"
        ax.axvline(restart.step, color=colour, linestyle="--", linewidth=1,
                   label=label if i == _first(picture.restarts, restart) else None)  # fmt: skip
    steps = [p.step for p in picture.checkpoints.kept]
    if steps:
        ax.plot(steps, [0.0] * len(steps), "|", color="green", markersize=14, markeredgewidth=2,
                transform=ax.get_xaxis_transform(), label="checkpoint")  # fmt: skip


def _first(restarts: list[Restart], restart: Restart) -> int:
    """Index of the first restart with the same legend entry (one legend line per kind)."""
    key = (restart.is_resize, restart.world_before, restart.world_after)
    return next(
        i for i, r in enumerate(restarts) if (r.is_resize, r.world_before, r.world_after) == key
    )


def _xy(points: list[Point], name: str) -> tuple[list[int], list[float]]:
    chosen = sorted((p.step, p.values[name]) for p in points if name in p.values)
    return [s for s, _ in chosen], [v for _, v in chosen]
