"""The benchmark's kill schedule and goodput arithmetic, on synthetic run logs (no runs)."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import analyze, launch


def test_kills_are_due_every_t_seconds_from_the_first_step():
    plan = launch.KillPlan(30, 30)
    assert [plan.slot_time(100.0, slot) for slot in range(3)] == [130.0, 160.0, 190.0]
    assert plan.next_slot(100.0, training_since=100.0, after=-1) == 0
    # Recovered from kill 0 at t=138: the next kill is still due at 160, not at 168.
    assert plan.next_slot(100.0, training_since=138.0, after=0) == 1
    # A recovery past t=160 skips that slot: the next attempt is killed at 190, not at once.
    assert plan.next_slot(100.0, training_since=165.0, after=0) == 2
    assert plan.expected(100.0, 195.0) == 3
    assert plan.expected(100.0, 129.0) == 0
    once = launch.KillPlan(4)
    assert once.next_slot(100.0, 100.0, after=0) is None and once.expected(100.0, 200.0) == 1


def test_the_newest_attempt_is_the_last_written_not_the_last_by_name(tmp_path):
    """Ray's attempt ids are random: after a kill the new attempt's log may sort first."""
    logs = tmp_path / "runlog"
    logs.mkdir()
    for name, step, mtime in (("ffff0000", 7, 1_000), ("0000ffff", 3, 2_000)):
        path = logs / f"{name}.jsonl"
        path.write_text(json.dumps({"event": "step", "global_step": step}) + "\n")
        os.utime(path, (mtime, mtime))
    attempt, last = launch._newest_attempt(tmp_path)
    assert (attempt, last["global_step"]) == ("0000ffff", 3)


def run_log(steps: list[tuple[str, int, float]], resumed: dict[str, tuple[int, str]]):
    """Events of attempts given as (attempt, global step, time); ``resumed``: attempt ->
    (checkpoint step, attempt that wrote it)."""
    events, seen = [], set()
    for attempt, step, at in steps:
        if attempt not in seen:
            seen.add(attempt)
            back, source = resumed.get(attempt, (None, None))
            events.append({"event": "start", "attempt": attempt, "time": at - 0.5,
                           "resumed_from_step": back, "resumed_from_attempt": source,
                           "world_size": 2, "global_batch_size": 8})  # fmt: skip
        events.append({"event": "step", "attempt": attempt, "time": at, "global_step": step})
    events.append({"event": "end", "attempt": steps[-1][0], "time": steps[-1][2]})
    return events


def test_goodput_without_failures_is_one_at_the_no_failure_period():
    events = run_log([("a", g, 10.0 + g) for g in range(1, 11)], {})
    result = analyze.goodput(events, [], period_s=1.0)
    assert result["goodput"] == pytest.approx(1.0)
    assert result["steps_redone"] == 0


def test_goodput_counts_effective_steps_only():
    """Steps 6-8 of attempt a are rolled back to checkpoint 5 and redone by b after a 4 s
    restart: 10 effective steps, the wall from step 1 (t=1) to step 10 (t=16)."""
    first = [("a", g, float(g)) for g in range(1, 9)]
    second = [("b", g, 12.0 + (g - 6)) for g in range(6, 11)]
    events = run_log(first + second, {"b": (5, "a")})
    result = analyze.goodput(events, [{"time": 8.5}], period_s=1.0)
    assert result["effective_steps"] == 10 and result["steps_redone"] == 3
    assert result["wall_s"] == pytest.approx(15.0)
    assert result["goodput"] == pytest.approx(9 / 15)  # 9 steps after the first, at 1 s each


def test_a_missing_period_is_a_missing_goodput():
    events = run_log([("a", g, float(g)) for g in range(1, 11)], {})
    assert analyze.goodput(events, [], period_s=None)["goodput"] is None


def test_the_no_failure_period_spans_first_to_last_step_of_a_single_attempt():
    """Goodput's reference is a no-failure run as long as the faulty one, over the same span;
    a reference that restarted is no reference."""
    steady = run_log([("a", g, 10.0 + 0.5 * g) for g in range(1, 11)], {})
    assert analyze.span_period(steady) == pytest.approx(0.5)
    restarted = run_log([("a", 1, 1.0), ("a", 2, 2.0), ("b", 2, 5.0), ("b", 3, 6.0)], {})
    assert analyze.span_period(restarted) is None
    assert analyze.span_period(run_log([("a", 1, 1.0)], {})) is None


def test_a_checkpoint_pause_is_measured_against_steps_with_no_save_in_flight():
    """Steps 0.1 s apart; checkpoint 5 takes 0.25 s more before step 6, and its background save
    (ending at 1.25 s) slows steps 6-7 to 0.2 s. The pause is counted against the quiet
    interval (0.1), not the slowed ones, and the dip is their ratio."""
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.85, 1.05, 1.25, 1.35, 1.45, 1.55, 1.65]
    steps = [{"global_step": g, "time": t} for g, t in enumerate(times, start=1)]
    attempt = {"steps": steps, "ckpts": [{"global_step": 6, "blocked_s": 0.01}]}
    saved_at = {6: 1.26}
    [stall] = analyze.checkpoint_stalls(attempt, saved_at)
    assert stall["paused_s"] == pytest.approx(0.25)
    assert analyze.save_dip(attempt, saved_at) == pytest.approx(0.5)


def group_started(at: float, pids=(11, 12)) -> dict:
    """A ``group_started`` event as Ray Train's controller writes it: asked for 1.0 s before,
    placement group 0.2 s, actors 0.3 s, train context 0.4 s, launch 0.1 s."""
    return {"event": "group_started", "attempt": "ray-b", "time": at, "pids": list(pids),
            "requested_at": at - 1.0, "actors_at": at - 0.5, "context_at": at - 0.1,
            "placement_group_s": 0.2, "world_size": 2}  # fmt: skip


def test_a_ray_recovery_is_timed_from_the_run_logs_own_events():
    """Rank 1 killed at t=8.2 after step 8 of a; Ray Train decides at 8.5, the new group is
    training at 10.0, b starts (resumed from 8) at 10.5 and steps at 11.0."""
    first = [("a", g, float(g)) for g in range(1, 9)]
    second = [("b", g, 11.0 + (g - 9)) for g in range(9, 12)]
    events = run_log(first + second, {"b": (8, "a")})
    events += [{"event": "failure_detected", "attempt": "ray-a", "time": 8.5}, group_started(10.0)]
    events.sort(key=lambda e: e["time"])
    [rec] = analyze.recoveries(events, [{"time": 8.2}])
    expected = {"detect_s": 0.3, "restart_s": 1.5, "init_load_s": 0.5, "first_step_s": 0.5,
                "total_s": 2.8, "steps_redone": 0, "placement_group_s": 0.2, "actors_s": 0.3,
                "train_context_s": 0.4, "launch_s": 0.1, "group_total_s": 1.0}  # fmt: skip
    assert rec == {**rec, **{k: pytest.approx(v) for k, v in expected.items()}}


def test_a_torchrun_recovery_reads_the_agents_line_and_the_new_process_start():
    first = [("a", g, float(g)) for g in range(1, 9)]
    second = [("b", g, 11.0 + (g - 6)) for g in range(6, 12)]
    events = run_log(first + second, {"b": (5, "a")})
    events[[e["event"] for e in events].index("start", 1)]["process_started"] = 9.0
    lines = [(8.0, "step"), (8.4, "[WARNING] worker group FAILED; will restart worker group")]
    [rec] = analyze.recoveries(events, [{"time": 8.2}], lines)
    assert rec["detect_s"] == pytest.approx(0.2) and rec["restart_s"] == pytest.approx(0.6)
    assert rec["steps_redone"] == 3 and "group_total_s" not in rec


def test_the_harness_kills_rank_1_of_the_newest_ray_group(tmp_path):
    """The pid comes from the run log's ``group_started``, never from Ray's console; the
    controller's files are no attempt's log."""
    logs = tmp_path / "runlog"
    logs.mkdir()
    for name, at, pids in (
        ("ray-a-group_started", 1.0, [1, 2]),
        ("ray-b-group_started", 9.0, [3, 4]),
    ):
        (logs / f"{name}.jsonl").write_text(json.dumps(group_started(at, pids)) + "\n")
    watch = launch.Watch("run", tmp_path, "ray")
    assert launch._rank1_pid(watch) == 4
    (logs / "0000ffff.jsonl").write_text(json.dumps({"event": "step", "global_step": 3}) + "\n")
    os.utime(logs / "0000ffff.jsonl", (1_000, 1_000))  # older than the controller's files
    assert launch._newest_attempt(tmp_path)[0] == "0000ffff"


def test_every_settings_line_says_threads_and_who_shares_the_cores():
    st = {"task": "tabular", "workers": 2, "steps": 10, "checkpoint_every": 5, "threads": 1,
          "cores": 2, "nice": 0, "global_batch": 64, "upload": "async", "report_every": None,
          "health_check_s": 0.2}  # fmt: skip
    ray, torchrun = analyze.describe(st, "ray"), analyze.describe(st, "torchrun")
    assert "1 torch thread per worker, 2 cores shared with Ray's daemons and driver" in ray
    assert "1 torch thread per worker, 2 cores shared with torchrun's agent" in torchrun
