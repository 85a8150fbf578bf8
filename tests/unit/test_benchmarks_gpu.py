"""The GPU check (``--plan gpu``, ``make gpu-check``) without a GPU and without running it: every
run it would start resolves to a valid config on one GPU worker, its dry run differs only in
sizes, its duration estimate fits, and its analysis and table work on synthetic results.

The dry run itself (``make bench BENCH_ARGS="--plan gpu-dry"``: the real plan on one CPU worker)
takes ~3.5 minutes on the 2-core CI machine, too long for this tier.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import analyze, floor, harness, plans, report
from training.driver.settings import load_config
from training.tasks.tabular import DEMO_CLASSES, DEMO_FEATURES, MLP, MLPOptions


def planned_configs(mode: str, tmp_path):
    """(task, resolved config) of every run the plan starts, built the way the harness does."""
    bench = harness.Bench(mode, tmp_path, tmp_path)
    plan = bench.plan
    runs = [(task, steps, {}) for task, steps in plan["overhead"].items()]
    runs += [(r.task, r.steps, r.overrides) for r in bench.exact_runs() + bench.stall_runs()]
    return [
        (task, load_config(plans.TASKS[task][1], bench.overrides("x", steps, extra, task)))
        for task, steps, extra in runs
    ]


def test_every_gpu_run_is_one_bf16_gpu_worker(tmp_path):
    configs = planned_configs("gpu", tmp_path)
    assert len(configs) == 1 + 2 + 3  # the LM's overhead pair, the exact pair, 3 stall runs
    for _, cfg in configs:
        assert cfg.scaling.use_gpu and cfg.scaling.max_workers == 1
        assert cfg.training.precision == "bf16"
    lm = [cfg for task, cfg in configs if task == "lm"]
    assert {(c.task.options["d_model"], c.task.options["n_layers"]) for c in lm} == {(512, 8)}


def test_the_dry_run_is_the_same_plan_on_the_cpu(tmp_path):
    gpu, dry = plans.PLANS["gpu"], plans.PLANS["gpu-dry"]
    assert gpu.keys() == dry.keys() and gpu["scenarios"] == dry["scenarios"]
    for (_, on_gpu), (_, on_cpu) in zip(
        planned_configs("gpu", tmp_path), planned_configs("gpu-dry", tmp_path), strict=False
    ):
        assert not on_cpu.scaling.use_gpu
        assert on_cpu.training.precision == on_gpu.training.precision
        assert on_cpu.training.deterministic == on_gpu.training.deterministic
        assert on_cpu.checkpoint.upload == on_gpu.checkpoint.upload


@pytest.mark.parametrize("mode", ["gpu", "gpu-dry"])
def test_rank0_dies_after_a_checkpoint_and_before_the_end(mode, tmp_path):
    exact = plans.PLANS[mode]["exact"]
    assert exact["every"] < exact["kill_step"] <= exact["steps"]
    killed = harness.Bench(mode, tmp_path, tmp_path).exact_runs()[1].overrides
    assert killed["chaos.faults"] == [{"kind": "kill", "rank": 0, "step": exact["kill_step"]}]
    assert killed["training.deterministic"] is True


def test_the_pause_is_measured_on_at_least_2_gb_of_state():
    with torch.device("meta"):
        model = MLP(DEMO_FEATURES, DEMO_CLASSES, MLPOptions(hidden_sizes=plans.SIZES["2 GB"]))
    params = sum(p.numel() for p in model.parameters())
    assert 12 * params >= 2e9  # fp32 weights + AdamW's two moments
    assert plans.PLANS["gpu"]["stall_sizes"] == plans.PLANS["gpu"]["device_floor_sizes"]


def test_the_gpu_plan_ends_within_eight_minutes_with_the_install():
    # + ~30 s to install Ray from the wheelhouse (unpack, zip, pip), counted as a minute; the
    # deadline is enforced by the harness, not estimated
    assert plans.PLANS["gpu"]["deadline_s"] + 60 <= 8 * 60


def test_a_plan_past_its_deadline_leaves_the_rest_out_and_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(plans.PLANS, "late", {**plans.PLANS["gpu-dry"], "deadline_s": 10})
    bench = harness.Bench("late", tmp_path / "work", tmp_path / "out")
    bench.results["started"] = started = 1000.0
    monkeypatch.setattr(harness.time, "time", lambda: started + 4)
    assert not bench.past_deadline(started, "floor") and bench.timeout_s() == 6
    monkeypatch.setattr(harness.time, "time", lambda: started + 11)
    assert bench.past_deadline(started, "overhead")
    assert bench.failures == [
        "plan late: past its deadline of 10 s before scenario overhead; it and the scenarios "
        "after it were left out"
    ]


def test_the_device_to_host_floor_runs_without_a_gpu():
    row = floor.device_to_host(plans.SIZES["tiny"], reps=2)
    assert row["device"] == "cpu" and row["d2h_s"]["n"] == 2 and row["state_mb"] > 0


def test_bitwise_equality_tells_minus_zero_from_zero():
    a = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor(2.0)}
    assert analyze.bitwise_equal(a, {k: v.clone() for k, v in a.items()})
    assert not analyze.bitwise_equal(a, {**a, "w": torch.tensor([-0.0, 1.0])})
    assert not analyze.bitwise_equal(a, {**a, "w": a["w"].double()})
    assert not analyze.bitwise_equal(a, {"w": a["w"]})


def test_a_chaos_kill_is_timed_by_its_marker(tmp_path):
    (tmp_path / "chaos").mkdir()
    (tmp_path / "chaos" / "fault-0.fired").write_text("{}\n")
    kills = analyze.chaos_kills(tmp_path)
    assert (
        len(kills) == 1
        and kills[0]["time"] == (tmp_path / "chaos" / "fault-0.fired").stat().st_mtime
    )


SETTINGS = "language_model, 1 workers, 300 steps, 1 GPU per worker, bf16"


def synthetic_results(equal: bool = True, verify_rc: int = 0):
    s = lambda median: {"n": 3, "median": median, "min": median, "max": median}  # noqa: E731
    side = {"steps_per_s": s(40.0), "startup_s": s(30.0), "settings": SETTINGS}
    return {
        "overhead": {"lm": {"ray": side, "torchrun": {**side, "steps_per_s": s(50.0)},
                            "ratio_steps_per_s": s(0.8), "ratio_startup": s(2.0)}},
        "exact": {"settings": SETTINGS + ", deterministic", "total_s": s(5.0),
                  "steps_redone": s(79), "final_steps": [300, 300], "bitwise_equal": equal,
                  "verify_rc": verify_rc, "verify": "Exactly-once ledger holds for ..."},
        "device_floor": [{"label": "2 GB", "state_mb": 2060.0, "d2h_s": s(0.05),
                          "device": "NVIDIA H200"}],
        "stall": [{"size": "2 GB", "mode": "async", "paused_s": s(0.1),
                   "settings": "tabular, 1 workers, 24 steps, 1 GPU per worker"}],
    }  # fmt: skip


def test_one_table_with_the_settings_of_every_row():
    table = report.device_table(synthetic_results())
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 2 + 4 + 1  # header, steps/s and start-up, 4 exact rows, pause
    for row in rows[1:]:
        assert row.rstrip(" |").split(" | ")[-1].strip(), f"no settings: {row}"
    assert "| 0.80 [0.80-0.80] (n=3) |" in rows[1]
    assert "| 2.00 |" in rows[-1]  # paused 0.1 s / copy 0.05 s
    assert "final weights bitwise equal to an uninterrupted run | yes" in table
    assert "verify` of the killed run | ok" in table


def test_the_table_shouts_a_broken_resume():
    table = report.device_table(synthetic_results(equal=False, verify_rc=1))
    assert "| **NO** |" in table and "**FAILED** (exit 1)" in table
