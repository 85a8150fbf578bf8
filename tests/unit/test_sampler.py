"""The sampler: every sample exactly once per epoch, whatever the stops and world sizes."""

import random

import pytest
import torch

from training.core import data, runlog


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


def simulate(seed, num_samples, batch, epochs, rng, corrupt=None, layout=None):
    """Run the loop's sampling logic through random crashes and world-size changes.

    Returns the run-log events the loop would write: steps record their position and world
    size, not their ids. A crash rolls back to the last checkpoint; the next attempt may have
    another world size.
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
                "seed": seed,
                "layout": data.layout_record(layout),
            }
        )
        crash_at = rng.randint(resumed_step + 1, total + 5)
        for step in range(resumed_step + 1, total + 1):
            if step == crash_at:
                break
            epoch, in_epoch = divmod(step - 1, per_epoch)
            if corrupt == "restart_epoch" and attempt_no > 1:
                in_epoch = 0  # a buggy resume that forgets the step-in-epoch
            clock += 1
            events.append(
                {
                    "event": "step",
                    "attempt": attempt,
                    "time": clock,
                    "global_step": step,
                    "epoch": epoch,
                    "step_in_epoch": in_epoch + 1,
                    "world_size": world,
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
    num_samples, epochs = rng.randint(60, 200), rng.randint(1, 3)
    events = simulate(seed=scenario, num_samples=num_samples, batch=12, epochs=epochs, rng=rng)
    report = runlog.check_ledger(events)
    assert report.ok, report.errors
    assert report.completed
    history, _ = runlog.effective_history(events)
    starts = {e["attempt"]: e for e in events if e["event"] == "start"}
    per_epoch = {}
    for event in history.values():
        per_epoch.setdefault(event["epoch"], []).extend(
            runlog.consumed_ids(event, starts[event["attempt"]])
        )
    # Each epoch consumed every sample of its full batches exactly once, and nothing else.
    full_batches = data.steps_per_epoch(num_samples, 12) * 12
    assert sorted(per_epoch) == list(range(epochs))
    for epoch, ids in per_epoch.items():
        expected = data.epoch_order(scenario, epoch, num_samples)[:full_batches].tolist()
        assert sorted(ids) == sorted(expected), f"epoch {epoch}"


def test_recomputed_ids_are_what_every_rank_sliced():
    """The ledger's ids come from the same pure functions the ranks slice their shares from."""
    start = {"seed": 5, "train_samples": 100, "global_batch_size": 12, "layout": None}
    step = {"epoch": 1, "step_in_epoch": 3, "world_size": 3}
    batch = data.global_batch(data.epoch_order(5, 1, 100), 2, 12)
    shares = [i for rank in range(3) for i in data.rank_slice(batch, rank, 3).tolist()]
    assert runlog.consumed_ids(step, start) == shares


def test_a_streamed_layout_is_recorded_and_used():
    layout = data.ShardLayout(sizes=(30, 30, 30, 30, 10), window=2)
    record = data.layout_record(layout)
    assert record == {"sizes": [[30, 4], [10, 1]], "window": 2}
    assert data.layout_from_record(record) == layout
    events = simulate(
        seed=4, num_samples=130, batch=12, epochs=2, rng=random.Random(2), layout=layout
    )
    assert runlog.check_ledger(events).ok
    start = next(e for e in events if e["event"] == "start")
    step = next(e for e in events if e["event"] == "step")
    order = data.epoch_order(4, 0, 130, layout, 12)  # the global batch size groups each batch
    assert runlog.consumed_ids(step, start) == order[:12].tolist()
    assert order[:12].tolist() != data.epoch_order(4, 0, 130)[:12].tolist()


def tampered(field, value, step=5):
    """A clean 2-epoch run whose step ``step`` record is changed afterwards."""
    events = simulate(seed=6, num_samples=120, batch=12, epochs=2, rng=random.Random(3))
    assert runlog.check_ledger(events).ok
    for event in events:
        if event["event"] == "step" and event["global_step"] == step:
            event[field] = value
    return runlog.check_ledger(events)


def test_checker_catches_a_step_that_repeats_another_steps_batch():
    report = tampered("step_in_epoch", 4)  # step 5 claims the batch of step 4
    assert not report.ok
    assert any("more than once" in e for e in report.errors)
    assert any("step 5 records epoch 0 step 4" in e for e in report.errors)


def test_checker_catches_a_wrong_world_size():
    report = tampered("world_size", 3)  # 3 divides 12: the same ids, but not what the attempt ran
    assert not report.ok
    assert any("step 5 records world size 3" in e for e in report.errors)


def test_checker_catches_a_world_size_that_drops_samples():
    report = tampered("world_size", 5)  # 12 // 5 = 2 per rank: 10 of 12 samples consumed
    assert not report.ok
    assert "step 5 consumed 10 samples" in report.errors


def test_checker_catches_a_wrong_epoch():
    report = tampered("epoch", 1)  # 10 steps/epoch: step 5 claims step 15's batch
    assert not report.ok
    assert any("step 5 records epoch 1 step 5" in e for e in report.errors)
    assert any("epoch 1: 12 samples consumed more than once" in e for e in report.errors)


def test_checker_needs_the_seed():
    events = simulate(seed=6, num_samples=120, batch=12, epochs=1, rng=random.Random(3))
    for event in events:
        event.pop("seed", None)
    report = runlog.check_ledger(events)
    assert not report.ok
    assert "cannot say which samples were consumed" in report.errors[0]


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


def test_the_consumption_digest_adds_up_over_ranks_and_sees_one_wrong_id():
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:64]
    whole = data.ids_digest(ids)
    assert sum(data.ids_digest(data.rank_slice(ids, r, 4)) for r in range(4)) == whole
    assert data.ids_digest(ids.flip(0)) == whole  # order-free
    assert data.ids_digest(ids[:-1]) != whole  # dropped
    assert data.ids_digest(torch.cat([ids[:-1], ids[:1]])) != whole  # repeated
    swapped = ids.clone()
    swapped[0] = 1000  # an id outside the batch
    assert data.ids_digest(swapped) != whole
