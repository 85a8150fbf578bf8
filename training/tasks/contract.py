"""Contract checks any task can run without Ray: what the framework's guarantees rely on.

    python -m training check-task --config my_task.yaml

1. ``batch`` is a pure function of (ids, seed): the same call twice gives equal tensors; with
   ``training=False`` (evaluation) it does not depend on the seed (no augmentation);
2. the totals of ``step`` add up over disjoint id sets (so summing over ranks and micro-batches
   normalises by the global count at any world size);
3. ``step`` is deterministic under a fixed seed;
4. ``check`` (the data fingerprint) is stable and holds ``train_samples``; ``load`` returns a
   ``Loaded`` with an immutable ``info``; ``metrics`` has ``loss``.
Each failure is one line; an empty list means the contract holds.
"""

from __future__ import annotations

from typing import Any

import torch

from training import tasks
from training.core.data import derive_seed

SAMPLE_IDS = 8
# What run_contract checks, in words (check-task prints them).
CHECKS = (
    "load() returns Loaded(train, val, info), info immutable",
    f"batch(ids, seed, training=True) pure (two calls, {2 * SAMPLE_IDS} ids)",
    "batch(ids, seed, training=False) the same for any seed (no augmentation in evaluation)",
    "totals additive over disjoint ids (sums, not means)",
    "step deterministic under a fixed seed",
    "check() fingerprint stable, with an int train_samples",
    "metrics(totals, info) has loss",
)


def run_contract(name: str, options: dict[str, Any], source: tasks.DataSource) -> list[str]:
    task = tasks.build(name, options, source)
    failures = _fingerprint_failures(task, tasks.build(name, options, source))
    try:
        loaded = tasks.load(task)
    except tasks.TaskError as exc:
        return [*failures, str(exc)]
    train = loaded.train
    if len(train) < 2 * SAMPLE_IDS:
        return [*failures, f"fewer than {2 * SAMPLE_IDS} training samples to check with"]
    torch.manual_seed(derive_seed(0, "contract-init"))
    # eval: dropout would make totals differ by design
    model = task.build_model(loaded.info).eval()
    failures += batch_and_totals_failures(task, model, train)
    ids, seed = _sample_ids(len(train)), derive_seed(0, "contract-batch")
    first, second = (_totals(task, model, _batch(task, train, ids, seed)) for _ in range(2))
    if not _equal(first, second):
        failures.append("step(model, batch) is not deterministic under a fixed seed")
    try:
        metrics = task.metrics({k: float(v) for k, v in first.items()}, loaded.info)
    except Exception as exc:  # a user's task: report, do not crash the checker
        return [*failures, f"metrics(totals, info) raised {type(exc).__name__}: {exc}"]
    if "loss" not in metrics:
        failures.append(f"metrics(totals, info) has no 'loss' (has: {sorted(metrics)})")
    return failures


def batch_and_totals_failures(task: tasks.Task, model: torch.nn.Module, train: Any) -> list[str]:
    """The cheap part of the contract, which ``train`` also runs on rank 0 before the first step
    (``attempt.check_task_at_start``): ``batch`` is pure, evaluation batches do not depend on
    the seed, and the totals add up. ``model`` is left as it was (evaluation mode while
    checking: dropout would make totals differ by design)."""
    if len(train) < 2 * SAMPLE_IDS:
        return []  # too few samples to check with (run_contract says so)
    was_training = model.training
    model.eval()
    try:
        ids, seed = _sample_ids(len(train)), derive_seed(0, "contract-batch")
        failures = []
        if not _equal(_batch(task, train, ids, seed), _batch(task, train, ids, seed)):
            failures.append(
                "batch(ids, seed, training=True) differs between two identical calls: not pure"
            )
        other_seed = derive_seed(1, "contract-batch")
        evaluated = (_batch(task, train, ids, s, training=False) for s in (seed, other_seed))
        if not _equal(*evaluated):
            failures.append(
                "batch(ids, seed, training=False) depends on the seed: evaluation batches must "
                "not be augmented"
            )
        return failures + _additivity_failures(task, model, train, ids, seed)
    finally:
        model.train(was_training)


def _batch(
    task: tasks.Task, samples: Any, ids: torch.Tensor, seed: int, training: bool = True
) -> Any:
    return task.batch(samples, ids, seed, training=training)


def _sample_ids(num_samples: int) -> torch.Tensor:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))
    return order[: 2 * SAMPLE_IDS]


def _fingerprint_failures(task: tasks.Task, again: tasks.Task) -> list[str]:
    first, second = task.check(), again.check()
    failures = []
    if first != second:
        failures.append("check() gives a different fingerprint for the same data")
    if not isinstance(first.get("train_samples"), int):
        failures.append("check() must return an int 'train_samples'")
    return failures


def _additivity_failures(task, model, train, ids, seed) -> list[str]:
    whole = _totals(task, model, _batch(task, train, ids, seed))
    halves = [
        _totals(task, model, _batch(task, train, part, seed)) for part in ids.split(SAMPLE_IDS)
    ]
    failures = []
    for key, value in whole.items():
        summed = sum(h[key] for h in halves)
        if not torch.allclose(value.double(), summed.double(), rtol=1e-4, atol=1e-5):
            failures.append(
                f"totals['{key}'] does not add up over disjoint ids: {float(value):.6g} for the "
                f"union, {float(summed):.6g} summed over the parts (totals must be sums, not means)"
            )
    return failures


@torch.no_grad()
def _totals(task: tasks.Task, model, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(derive_seed(0, "contract-step"))
    device = next(model.parameters(), torch.empty(0)).device  # a worker's model is on its GPU
    totals = task.step(model, tasks.to_device(batch, device)).totals
    return {k: v.detach().cpu() for k, v in totals.items()}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b
