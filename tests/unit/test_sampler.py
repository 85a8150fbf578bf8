"""The sampler: every sample exactly once per epoch, whatever the stops and world sizes."""

import random

import pytest
import torch

from training import data, runlog


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(data.epoch_order(3, 1, 100), data.epoch_order(3, 1, 100))
    assert not torch.equal(data.epoch_order(3, 1, 100), data.epoch_order(3, 2, 100))
    assert not torch.equal(data.epoch_order(3, 1, 100), data.epoch_order(4, 1, 100))
    assert sorted(data.epoch_order(3, 1, 100).tolist()) == list(range(100))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6])
def test_ranks_partition_the_global_batch(world_size):
    batch = data.global_batch(data.epoch_order(0, 0, 120), 1, 12)
    slices = [data.rank_slice(batch, r, world_size) for r in range(world_size)]
    assert torch.equal(torch.cat(slices), batch)


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ValueError, match="exceeds the 10 training samples"):
        data.steps_per_epoch(10, 16)


def simulate(seed, num_samples, batch, epochs, rng, corrupt=None):
    """Run the loop's sampling logic through random crashes and world-size changes.

    Returns the run-log events the loop would write. A crash rolls back to the last
    checkpoint; the next attempt may have another world size.
    """
    per_epoch = data.steps_per_epoch(num_samples, batch)
    total = per_epoch * epochs
    events, clock, checkpoint = [], 0.0, (0, None)
    attempt_no = 0
    while True:
        attempt_no += 1
        attempt = f"a{attempt_no}"
        world = rng.choice([w for w in (1, 2, 3, 4, 6) if batch % w == 0])
        resumed_step, resumed_attempt = checkpoint
        clock += 1
        events.append(
            {
                "event": "start",
                "attempt": attempt,
                "time": clock,
                "world_size": world,
                "resumed_from_step": resumed_step or None,
                "resumed_from_attempt": resumed_attempt,
                "steps_per_epoch": per_epoch,
                "total_steps": total,
                "global_batch_size": batch,
                "train_samples": num_samples,
            }
        )
        crash_at = rng.randint(resumed_step + 1, total + 5)
        for step in range(resumed_step + 1, total + 1):
            if step == crash_at:
                break
            epoch, in_epoch = divmod(step - 1, per_epoch)
            if corrupt == "restart_epoch" and attempt_no > 1:
                in_epoch = 0  # a buggy resume that forgets the step-in-epoch
            order = data.epoch_order(seed, epoch, num_samples)
            ids = [
                i
                for r in range(world)
                for i in data.rank_slice(
                    data.global_batch(order, in_epoch, batch), r, world
                ).tolist()
            ]
            clock += 1
            events.append(
                {
                    "event": "step",
                    "attempt": attempt,
                    "time": clock,
                    "global_step": step,
                    "epoch": epoch,
                    "samples": ids,
                }
            )
            if step % 7 == 0:
                checkpoint = (step, attempt)
        else:
            events.append({"event": "end", "attempt": attempt, "time": clock + 1})
            return events


@pytest.mark.parametrize("scenario", range(40))
def test_exactly_once_through_random_stops_and_resizes(scenario):
    rng = random.Random(scenario)
    events = simulate(
        seed=scenario, num_samples=rng.randint(60, 200), batch=12, epochs=rng.randint(1, 3), rng=rng
    )
    report = runlog.check_ledger(events)
    assert report.ok, report.errors
    assert report.completed
    history, _ = runlog.effective_history(events)
    per_epoch = {}
    for event in history.values():
        per_epoch.setdefault(event["epoch"], []).extend(event["samples"])
    for ids in per_epoch.values():
        assert len(ids) == len(set(ids)) == len(ids) // 12 * 12


def test_checker_catches_a_resume_that_repeats_samples():
    rng = random.Random(1)
    events = simulate(seed=1, num_samples=120, batch=12, epochs=2, rng=rng, corrupt="restart_epoch")
    assert runlog.check_ledger(events).attempts > 1
    report = runlog.check_ledger(events)
    assert not report.ok
    assert any("more than once" in e for e in report.errors)


def test_checker_catches_a_missing_step():
    events = simulate(seed=2, num_samples=120, batch=12, epochs=1, rng=random.Random(5))
    events = [e for e in events if e.get("global_step") != 4]
    report = runlog.check_ledger(events)
    assert not report.ok
    assert "steps missing from the effective history: 4" in report.errors[0]


def test_checker_ignores_rolled_back_steps():
    """Steps done after the checkpoint a restart rolled back to are not in the history."""
    for seed in range(50):
        events = simulate(seed=3, num_samples=96, batch=12, epochs=2, rng=random.Random(seed))
        stepped = [e["global_step"] for e in events if e["event"] == "step"]
        if len(stepped) > len(set(stepped)):
            break
    else:
        pytest.fail("no simulated run rolled back any step")
    report = runlog.check_ledger(events)
    assert report.ok, report.errors
    assert report.final_step == max(stepped)
