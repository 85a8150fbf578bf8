"""Keep a training run submitted until it finishes: the Compose cluster's answer to head loss.

    python /app/cluster/supervisor.py [--address http://head:8265] -- python -m training train ...

Submits the entrypoint through the job API and follows its logs. When the job ends without
success (the head died and took the driver with it, a node loss used up `max_failures`, ...),
it waits for the head to answer again and submits the same entrypoint once more: a run is
storage.path + run.name, so the new job resumes from the newest valid checkpoint. It stops with
the job's success (exit 0), or with exit 2 when the driver refused its input (exit 2: bad config,
never worth retrying). Runs in its own container, so a dead head does not take it along.

The resubmission passes `--wait-for-lease --lease-dead-job <previous submission id>`: the
previous driver is known dead (its job is over, or unknown to a head that lost its state), so
its lease need not expire first; any other live driver of the run is still waited for.
Auth: RAY_AUTH_TOKEN, as for every client of the cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

POLL_S = 2.0
USAGE_EXIT = 2


def log(message: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}] {message}", flush=True)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def connect(address: str):
    """A job client once the head's job API answers; waits (polling) as long as it takes."""
    announced = False
    while True:
        try:
            jobs = client(address)
            jobs.list_jobs()
            return jobs
        except Exception as exc:  # the head is down or still starting: wait for it
            if not announced:
                log(f"head job API at {address} not answering ({type(exc).__name__}); waiting")
                announced = True
            time.sleep(POLL_S)


def follow(address: str, job_id: str) -> tuple[str, int | None]:
    """Print the job's new log lines until it ends; (status, driver exit code).

    ('LOST', None) when the head came back without the job (it lost its state)."""
    printed = 0
    while True:
        try:
            jobs = client(address)
            info = jobs.get_job_info(job_id)
            logs = jobs.get_job_logs(job_id)
        except Exception as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return "LOST", None
            connect(address)  # head down: wait for it, then look at the job again
            continue
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if info.status.is_terminal():
            return info.status.value, info.driver_exit_code
        time.sleep(POLL_S)


def submit(address: str, entrypoint: list[str], dead_job: str | None, attempt: int) -> str:
    """Submit once the head accepts jobs (a restarting head refuses for a while: 'No available
    agent', connection resets); such refusals are waited out, not counted as attempts."""
    extra = ["--wait-for-lease"] + (["--lease-dead-job", dead_job] if dead_job else [])
    command = " ".join([*entrypoint, *extra])
    job_id = f"supervised-{attempt}-{uuid.uuid4().hex[:8]}"
    while True:
        try:
            connect(address).submit_job(entrypoint=command, submission_id=job_id)
            break
        except Exception as exc:
            if "already exists" in str(exc):  # accepted, but the answer was lost on the way
                break
            log(f"head refused the submission ({type(exc).__name__}: {str(exc)[:120]}); retrying")
            time.sleep(POLL_S)
    log(f"submitted {job_id}: {command}")
    return job_id


def backoff_s(attempt: int) -> float:
    """Seconds before submission `attempt`: the first retry at once (a lost head is back already
    when we see its job failed), then longer while jobs keep failing (storage still down)."""
    return min(60.0, 5.0 * max(0, attempt - 2))


def supervise(address: str, entrypoint: list[str], max_submissions: int) -> int:
    dead_job = None
    for attempt in range(1, max_submissions + 1):
        time.sleep(backoff_s(attempt))
        job_id = submit(address, entrypoint, dead_job, attempt)
        status, code = follow(address, job_id)
        log(f"{job_id} ended: {status} (driver exit code {code})")
        if status == "SUCCEEDED":
            return 0
        if code == USAGE_EXIT:
            log("the driver refused its input (exit 2): not resubmitting")
            return USAGE_EXIT
        dead_job = job_id
    log(f"gave up after {max_submissions} submissions")
    return 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=os.environ.get("RAY_DASHBOARD", "http://head:8265"))
    parser.add_argument("--max-submissions", type=int, default=20)
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        parser.error("give the entrypoint after --, e.g. -- python -m training train ...")
    return supervise(args.address, entrypoint, args.max_submissions)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
