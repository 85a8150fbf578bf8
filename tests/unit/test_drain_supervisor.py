"""The drain flag (training/ray_internals/drain.py) and the job supervisor's decisions
(cluster/supervisor.py),
without Ray: the ranks agree on a drain in the log interval's reduction; the supervisor
resubmits a lost or failed job with the dead job's id, stops on success or on a refused input
(exit 2)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from training.ray_internals import drain
from training.worker.cadence import reduce_totals

SUPERVISOR = Path(__file__).resolve().parents[2] / "cluster" / "supervisor.py"


def load_supervisor():
    spec = importlib.util.spec_from_file_location("supervisor", SUPERVISOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TwoRanks:
    """A group of two whose other rank raised no flag and counted one sample more."""

    device = torch.device("cpu")

    def gather_rows(self, row):  # row: [count, first bad step, drain flag, *witness]
        other = row.clone()
        other[0] += 1
        other[2] = 0.0
        return torch.stack([row, other])


@pytest.mark.parametrize("flag", [True, False])
def test_the_drain_agreement_rides_the_interval_reduction(flag):
    """Any rank that heard of a drain makes every rank drain, in the reduction the log interval
    makes anyway: no collective of its own."""
    totals, first_bad, draining, consumed = reduce_totals(
        TwoRanks(), {"count": torch.tensor(4.0)}, None, flag, [8.0, 77.0]
    )
    assert totals == {"count": 9.0} and first_bad == math.inf
    assert draining is flag
    assert consumed == [16.0, 154.0]  # the ledger's witness rides along, summed over ranks


def test_no_drain_outside_ray():
    assert drain.local_flag() is False  # no Ray Train context here: never a false alarm


def test_hold_gives_up_after_its_limit():
    with pytest.raises(RuntimeError, match="no restart within"):
        drain.hold(global_step=7, limit_s=0.01)


@pytest.mark.parametrize(
    ("outcomes", "code", "dead_jobs"),
    [
        ([("SUCCEEDED", 0)], 0, [None]),
        ([("LOST", None), ("FAILED", 1), ("SUCCEEDED", 0)], 0, [None, "job-1", "job-2"]),
        ([("FAILED", 2)], 2, [None]),
        ([("STOPPED", None)] * 3, 1, [None, "job-1", "job-2"]),
    ],
)
def test_supervisor_resubmits_until_done(monkeypatch, outcomes, code, dead_jobs):
    sup = load_supervisor()
    submitted = []

    def submit(address, entrypoint, dead_job, attempt):
        submitted.append(dead_job)
        return f"job-{attempt}"

    results = iter(outcomes)
    monkeypatch.setattr(sup, "backoff_s", lambda attempt: 0)
    monkeypatch.setattr(sup, "submit", submit)
    monkeypatch.setattr(sup, "follow", lambda address, job_id: next(results))
    assert (
        sup.supervise("http://head:8265", ["python", "-m", "training"], max_submissions=3) == code
    )
    assert submitted == dead_jobs


def test_supervisor_passes_the_dead_job_to_the_driver(monkeypatch):
    sup = load_supervisor()
    sent = {}

    class Client:
        def submit_job(self, entrypoint, submission_id):
            sent.update(entrypoint=entrypoint, submission_id=submission_id)

    monkeypatch.setattr(sup, "connect", lambda address: Client())
    job = sup.submit("http://head:8265", ["python", "-m", "training", "train"], "old-job", 3)
    assert sent["submission_id"] == job and job.startswith("supervised-3-")
    assert sent["entrypoint"].endswith("train --wait-for-lease --lease-dead-job old-job")


def test_supervisor_needs_an_entrypoint():
    with pytest.raises(SystemExit):
        load_supervisor().main(["--address", "http://head:8265"])


def test_supervisor_backs_off_only_when_jobs_keep_failing():
    backoff = load_supervisor().backoff_s
    assert [backoff(a) for a in (1, 2, 3, 4, 20)] == [0, 0, 5, 10, 60]
