"""CPU priority of the processes and threads of a run: training first, everything else after.

Ray starts worker processes at nice 15 (its `worker_niceness`) so that its own daemons stay
responsive, and `ray job submit` puts its driver back at 0 through the same variable in the
driver's runtime env. The train workers are the job, not background work: at 15, every nice-0
process on the node (Ray's, the user's) takes their cores first, and each time one of them
waits for its cores, its peers wait for it in the next all-reduce. Measured on the 2-core VM,
demo MLP, 1500 steps, n = 3 alternate pairs each: steady steps/s 0.53x torchrun's with the
workers at 15, 0.62x at 0 (README "Benchmarks"). So the train workers run at 0, like torchrun's
processes and Ray's driver, and whatever works beside them runs lower:

- helper actors a train worker starts (the metrics holder) get Ray's default back;
- a warm spare imports at 19 (training/ray_internals/spares.py), Ray's checkpoint upload thread
  serialises
  and writes at 19 (training/worker/): they take the CPU training leaves idle.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

NICENESS_VARIABLE = "RAY_worker_niceness"  # read by each Ray worker process as it starts
TRAINING = {NICENESS_VARIABLE: "0"}
HELPER = {NICENESS_VARIABLE: "15"}  # Ray's default for worker processes
BACKGROUND_NICE = 19


def lower_this_thread(nice: int = BACKGROUND_NICE) -> None:
    """Run the calling thread (only) at ``nice``. Linux keeps a nice value per thread;
    elsewhere the call would lower the whole process, so it does nothing there. A nice value
    can only go up without privileges, so it stays for the thread's later work too."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # not allowed here: run at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
