"""CPU priorities (training/ray_internals/priority.py): train workers at 0, what works beside them
lower."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from training.driver import launch
from training.driver.settings import parse_config
from training.ray_internals import priority, spares


def test_train_workers_run_at_normal_priority_not_rays_default_for_workers():
    cfg = parse_config({"failure": {"spare_workers": False}})
    assert launch.worker_runtime_env(cfg) == {"env_vars": {"RAY_worker_niceness": "0"}}


def test_helper_actors_a_worker_starts_get_rays_default_priority_back():
    assert spares.without_spares()["env_vars"]["RAY_worker_niceness"] == "15"


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_a_background_thread_lowers_itself_and_training_keeps_its_priority():
    seen = {}

    def upload_thread():
        priority.lower_this_thread()
        seen["upload"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    training_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=upload_thread)
    thread.start()
    thread.join()
    assert seen["upload"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == training_priority
