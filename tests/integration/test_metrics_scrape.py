"""Prometheus metrics that stay true, checked against real scrapes of Ray's metrics endpoint.

One run on the test cluster, scraped every 0.25 s while it trains, with two windows in which
no log interval closes for a while: a checkpoint whose upload stalls (the next checkpoint waits
for it, so training is blocked), and a restart (rank 0 is SIGKILLed; Ray Train restarts the
group). Before training/observability/metrics.py's holder actor, every gauge vanished ~2 s after
the kill for
the rest of the restart (~20 s here); without the holder's refresh, ~20 s into the stall.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.request
from dataclasses import dataclass, field

from support.cli import start_cli, wait_for
from support.runs import events, write_config

from training.observability import metrics

RUN = "scraped"
# The upload of checkpoint 40 sleeps this long, and checkpoint 60 waits for it: no log interval
# closes for longer than Ray keeps a gauge that no export refreshed (2 x 10 s).
STALL_S = 24
GAUGES = ("loss", "accuracy", "global_step", "world_size", "lr", "samples_per_s")
COUNTERS = ("steps_total", "samples_total", "attempts_total")
SERIES = re.compile(r"^ray_elastic_trainer_(\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)


@dataclass
class Scrape:
    at: float
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one per series


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = Scrape(time.time())
    for name, labels, value in SERIES.findall(text):
        if f'{metrics.RUN_TAG}="{RUN}"' in labels:
            found.values.setdefault(name, []).append(float(value))
    return found


def test_metrics_stay_in_the_scrape_through_a_long_checkpoint_and_a_restart(
    tmp_path, ray_address, metrics_url
):
    config = write_config(
        tmp_path / "scraped.yaml",
        tmp_path,
        run={"name": RUN},
        training={"epochs": 3, "log_every_n_steps": 10, "report_every_n_steps": None},
        chaos={
            "faults": [
                {"kind": "stall", "rank": 0, "step": 40, "during": "serialize",
                 "seconds": STALL_S},
                {"kind": "kill", "rank": 0, "step": 80},
            ]
        },
    )  # fmt: skip
    proc = start_cli(config, tmp_path / "train.log", address=ray_address)
    scrapes = []
    while proc.poll() is None:
        scrapes.append(scrape(metrics_url))
        time.sleep(0.25)
    assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    logged = events(tmp_path, RUN)
    windows = stall_and_restart_windows(logged)
    ended = next(e["time"] for e in logged if e["event"] == "end")
    training = [s for s in scrapes if s.at < ended]
    print(f"windows (s after the first scrape): {describe(windows, scrapes[0].at)}")
    print(f"{len(training)} scrapes while training; at the last: {training[-1].values}")
    check_gauges_never_vanish(training, windows)
    check_counters_never_go_down(training)
    check_final_counts(metrics_url, logged)


def stall_and_restart_windows(logged: list[dict]) -> dict[str, tuple[float, float]]:
    steps = [e for e in logged if e["event"] == "step"]
    starts = [e for e in logged if e["event"] == "start"]
    assert len(starts) == 2, "the kill at step 80 must have restarted the run once"
    first, second = (s["attempt"] for s in starts)
    at = {(e["attempt"], e["global_step"]): e["time"] for e in steps}
    before_kill = max(e["time"] for e in steps if e["attempt"] == first)
    after_kill = min(e["time"] for e in steps if e["attempt"] == second)
    return {
        "checkpoint stall": (at[(first, 40)], at[(first, 61)]),
        "restart": (before_kill, after_kill),
    }


def check_gauges_never_vanish(scrapes: list[Scrape], windows) -> None:
    for gauge in GAUGES:
        seen = [s for s in scrapes if gauge in s.values]
        assert seen, f"gauge {gauge} never appeared in the scrape"
        after = [s for s in scrapes if s.at >= seen[0].at]
        gone = [s.at for s in after if gauge not in s.values]
        assert not gone, (
            f"gauge {gauge} vanished from {len(gone)} of {len(after)} scrapes, first at "
            f"{gone[0] - scrapes[0].at:.1f} s; windows {describe(windows, scrapes[0].at)}"
        )
        several = [s.values[gauge] for s in after if len(s.values[gauge]) > 1]
        assert not several, f"gauge {gauge}: several series for one run: {several[:3]}"
    assert {v for s in scrapes for v in s.values.get("world_size", [])} == {2.0}


def check_counters_never_go_down(scrapes: list[Scrape]) -> None:
    """Summed over their series (one per process that counted), counters only grow."""
    for counter in COUNTERS:
        totals = [sum(s.values[counter]) for s in scrapes if counter in s.values]
        assert totals, f"counter {counter} never appeared"
        drops = [(a, b) for a, b in itertools.pairwise(totals) if b < a]
        assert not drops, f"counter {counter} went down: {drops[:3]}"


def check_final_counts(url: str, logged: list[dict]) -> None:
    """After the run, the counters hold every step each attempt counted: the killed attempt's
    closed intervals (to its last logged step) and all of the second attempt's."""
    first = next(e["attempt"] for e in logged if e["event"] == "start")
    counted_first = max(e["global_step"] for e in logged if e.get("attempt") == first
                        and e["event"] == "step" and "loss" in e)  # fmt: skip
    resumed = [e for e in logged if e["event"] == "start"][1]["resumed_from_step"]
    last = max(e["global_step"] for e in logged if e["event"] == "step")
    expected = {"steps_total": counted_first + last - resumed, "attempts_total": 2}

    def final() -> dict | None:
        values = scrape(url).values
        got = {k: sum(values.get(k, [0])) for k in expected}
        return got if got == expected else None

    wait_for(final, timeout=metrics.LINGER_S, what=f"final counters {expected} in the scrape")


def describe(windows, t0: float) -> str:
    return ", ".join(f"{k} {a - t0:.1f}-{b - t0:.1f}" for k, (a, b) in windows.items())
