"""The shutdown hold: Ray's kill waits for rank 0's save on failure, and never waits long for
an attempt that saves nothing."""

import threading
import time

import pytest

from training import shutdown_grace as grace


@pytest.fixture(autouse=True)
def idle_after():
    yield
    grace.set_state(grace.IDLE)
    grace.set_rescue(None)


def test_shutdown_waits_until_the_save_on_failure_has_ended():
    grace.set_state(grace.TRAINING)
    saved = threading.Event()

    def fail_then_save():
        grace.set_state(grace.SAVING)
        time.sleep(0.2)  # the upload
        saved.set()
        grace.set_state(grace.IDLE)

    threading.Timer(0.05, fail_then_save).start()
    assert grace.wait_for_failure_save(notice_within_s=5, hold_at_most_s=10) == grace.IDLE
    assert saved.is_set()


def test_an_attempt_that_starts_no_save_is_not_held_past_the_notice_window():
    grace.set_state(grace.TRAINING)
    assert grace.wait_for_failure_save(notice_within_s=0.05, hold_at_most_s=10) == grace.TRAINING


def test_a_save_longer_than_rays_patience_is_given_up():
    grace.set_state(grace.SAVING)
    assert grace.wait_for_failure_save(notice_within_s=1, hold_at_most_s=0.1) == grace.SAVING


def test_a_finished_attempt_is_not_held():
    assert grace.wait_for_failure_save(notice_within_s=10, hold_at_most_s=10) == grace.IDLE


def test_a_training_thread_still_blocked_has_its_staged_checkpoint_rescued():
    """Rank 0 blocked in a checkpoint report whose barrier a dead peer broke never notices the
    failure: the shutdown runs the rescue (write the staged state) in its own thread."""
    rescued = []
    grace.set_state(grace.TRAINING)
    grace.set_rescue(lambda: rescued.append(threading.current_thread().name))
    assert grace.wait_for_failure_save(notice_within_s=0.05, hold_at_most_s=10) == "rescued"
    assert rescued == [threading.current_thread().name]


def test_no_rescue_once_the_attempt_has_ended_or_saves_itself():
    rescued = []
    grace.set_rescue(lambda: rescued.append(1))
    for state in (grace.IDLE, grace.SAVING):
        grace.set_state(state)
        grace.wait_for_failure_save(notice_within_s=0.05, hold_at_most_s=0.05)
    assert rescued == []
