"""Training pace for the progress lines: steps/s over the last log interval and the time left.

The rate is measured between two progress lines, so it includes whatever the interval held
(checkpoint pauses, evaluation, report barriers): the ETA is for the run as it actually goes,
not for the bare step time. A restart starts a new worker process, hence a fresh measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Pace:
    """Remembers the previous progress line's (step, time)."""

    last_step: int | None = None
    last_time: float = 0.0

    def describe(self, global_step: int, total_steps: int, now: float | None = None) -> str:
        """``"4.20 steps/s, ETA 1m05s"``; ``"ETA --"`` until there is an interval to measure."""
        now = time.monotonic() if now is None else now
        previous, elapsed = self.last_step, now - self.last_time
        self.last_step, self.last_time = global_step, now
        if previous is None or global_step <= previous or elapsed <= 0:
            return "ETA --"
        rate = (global_step - previous) / elapsed
        return f"{rate:.2f} steps/s, ETA {format_duration((total_steps - global_step) / rate)}"


def format_duration(seconds: float) -> str:
    """``"2h03m"``, ``"4m05s"`` or ``"12s"``."""
    whole = max(round(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


_pace = Pace()  # one per worker process: only rank 0 prints progress


def describe(global_step: int, total_steps: int) -> str:
    """The pace since the previous call in this process (see ``Pace.describe``)."""
    return _pace.describe(global_step, total_steps)
