"""The run lease (training/driver/lease.py): one writer per run, never blocking a resume after a
crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pyarrow.fs as pafs
import pytest

from training.core import storage
from training.driver import lease


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


FS = pafs.LocalFileSystem()


def write_holder(run_dir: str, holder: lease.Holder) -> None:
    storage.write_bytes(FS, f"{run_dir}/{lease.LEASE_FILE}", json.dumps(asdict(holder)).encode())


def elsewhere(**changes) -> lease.Holder:
    """A holder on another machine (another kernel boot), alive unless changed."""
    base = lease.me("other-token", since=time.time() - 60)
    return replace(
        base, host="node-7", pid=4242, job="raysubmit_abc", boot_id="other-boot", **changes
    )


def test_acquire_writes_holder_and_release_removes_it(run_dir):
    with lease.hold(FS, run_dir, wait=False, settle_s=0) as held:
        recorded = lease.read(FS, run_dir)
        assert recorded is not None and recorded.token == held.holder.token
        assert recorded.pid == held.holder.pid
    assert lease.read(FS, run_dir) is None


def test_live_holder_elsewhere_refuses_with_where_it_runs(run_dir):
    write_holder(run_dir, elsewhere())
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.try_acquire(FS, run_dir, ttl=30, settle_s=0)
    message = str(refused.value)
    assert "host node-7 pid 4242, job raysubmit_abc, since " in message
    assert "last heartbeat" in message
    assert lease.read(FS, run_dir).token == "other-token"  # untouched


def test_stale_heartbeat_is_taken_over(run_dir):
    write_holder(run_dir, elsewhere(heartbeat=time.time() - 31))
    taken = lease.try_acquire(FS, run_dir, ttl=30, settle_s=0)
    try:
        assert lease.read(FS, run_dir).token == taken.holder.token
    finally:
        taken.release()


def test_holder_dead_on_this_machine_is_taken_over_without_waiting(run_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    holder = replace(lease.me("dead-token", since=time.time()), pid=int(dead.stdout))
    write_holder(run_dir, holder)  # fresh heartbeat, but its process is gone
    taken = lease.try_acquire(FS, run_dir, ttl=30, settle_s=0)  # 30 s ttl: no expiry to wait for
    try:
        recorded = lease.read(FS, run_dir)
        assert recorded.token == taken.holder.token != "dead-token"
        assert recorded.pid == os.getpid()
    finally:
        taken.release()


def test_holder_alive_on_this_machine_refuses(run_dir):
    with lease.hold(FS, run_dir, wait=False, settle_s=0), pytest.raises(lease.LeaseHeld):
        lease.try_acquire(FS, run_dir, ttl=30, settle_s=0)


def test_racing_writers_one_wins(run_dir):
    results: list[object] = []

    def contend() -> None:
        try:
            results.append(lease.try_acquire(FS, run_dir, ttl=30, settle_s=0.5))
        except lease.LeaseHeld as exc:
            results.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, lease.Lease)]
    assert len(winners) == 1, results
    winners[0].release()


def test_heartbeat_refreshes_the_record(run_dir, monkeypatch):
    monkeypatch.setenv(lease.TTL_ENV, "0.6")  # a beat every 0.1 s
    with lease.hold(FS, run_dir, wait=False, settle_s=0):
        first = lease.read(FS, run_dir).heartbeat
        deadline = time.monotonic() + 5
        while lease.read(FS, run_dir).heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.read(FS, run_dir).heartbeat > first


def test_wait_for_lease_waits_until_the_holder_expires(run_dir, monkeypatch):
    monkeypatch.setenv(lease.TTL_ENV, "1.5")
    write_holder(run_dir, elsewhere(heartbeat=time.time()))
    started = time.monotonic()
    with lease.hold(FS, run_dir, wait=True, settle_s=0):
        waited = time.monotonic() - started
    assert 0.4 < waited < 10, waited


def test_unreadable_lease_file_counts_as_free(run_dir):
    storage.write_bytes(FS, f"{run_dir}/{lease.LEASE_FILE}", b"{not json")
    taken = lease.try_acquire(FS, run_dir, ttl=30, settle_s=0)
    try:
        assert lease.read(FS, run_dir).token == taken.holder.token  # rewritten, readable
    finally:
        taken.release()


def test_lease_of_a_job_known_dead_is_taken_over_at_once(run_dir):
    write_holder(run_dir, elsewhere())  # fresh heartbeat, job raysubmit_abc
    with pytest.raises(lease.LeaseHeld):
        lease.try_acquire(FS, run_dir, ttl=30, settle_s=0, dead_jobs=("raysubmit_other",))
    lease.try_acquire(FS, run_dir, ttl=30, settle_s=0, dead_jobs=("raysubmit_abc",)).release()


def test_work_done_while_settling_shortens_the_wait_and_a_racer_still_wins(run_dir, monkeypatch):
    """The settle wait is filled with other work (the driver starts Ray there), not added to
    it; a writer that lands during that work still takes the lease from us."""
    racer = elsewhere()
    slept: list[float] = []
    monkeypatch.setattr(lease.time, "sleep", slept.append)  # the lease module's sleeps

    def race_while_we_settle():
        deadline = time.monotonic() + 0.3  # busy: time.sleep only records, see above
        while time.monotonic() < deadline:
            pass
        write_holder(run_dir, racer)

    with pytest.raises(lease.LeaseHeld):
        lease.try_acquire(FS, run_dir, ttl=30, settle_s=0.5, while_settling=race_while_we_settle)
    assert lease.read(FS, run_dir).token == racer.token
    assert len(slept) == 1 and slept[0] <= 0.2  # only what the work left of the 0.5 s settle


def test_a_failure_while_settling_leaves_no_lease_behind(run_dir):
    def start_fails():
        raise ConnectionError("no cluster at RAY_ADDRESS")

    with pytest.raises(ConnectionError):
        lease.try_acquire(FS, run_dir, ttl=30, settle_s=0, while_settling=start_fails)
    assert lease.read(FS, run_dir) is None
