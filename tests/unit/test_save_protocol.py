"""The save protocol (``training/core/save_protocol.py``) through its API, thread by thread: every
interleaving the fault-tolerance integration tests produce with real kills (a peer dying while a
checkpoint is staged, serialised, uploaded, reported, or while rank 0 saves on failure), each
ending with exactly one writer of the state, or none when none is needed."""

from __future__ import annotations

import threading

import pytest

from training.core.save_protocol import (
    Attempt,
    Checkpoint,
    FailureSave,
    SaveProtocol,
    ShutdownBegun,
)
from training.ray_internals import shutdown_grace


def training_at(step: int) -> SaveProtocol:
    saves = SaveProtocol()
    saves.begin_attempt()
    saves.resumed_from(0)
    saves.state_step = step
    return saves


def test_a_checkpoint_goes_free_staged_uploading_free_and_records_its_step():
    saves = training_at(4)
    saves.staged()
    assert not saves.wait_until_free(timeout=0.01)  # the buffers are the upload's now
    assert saves.upload_begins() and saves.checkpoint is Checkpoint.UPLOADING
    saves.upload_ended(4)
    assert saves.wait_until_free(timeout=0) and saves.saved_step == 4
    with pytest.raises(RuntimeError, match="still staged"):
        saves.staged()
        saves.staged()  # a second stage before the first checkpoint is free


def test_peer_dies_while_staged_and_ray_never_begins_the_upload():
    """The report's barrier broke on the dead peer: rank 0 saves itself; an upload Ray would
    begin afterwards is refused and frees the buffers."""
    saves = training_at(5)
    saves.staged()
    assert saves.failure_save_begins() is FailureSave.SAVE
    assert saves.attempt is Attempt.SAVING
    assert not saves.upload_begins()
    assert saves.checkpoint is Checkpoint.FREE
    assert not saves.claim_rescue()  # the failure save owns the state: no second writer


@pytest.mark.parametrize("upload_ok", [True, False])
def test_peer_dies_while_uploading_waits_for_the_upload(upload_ok):
    """Serialising or uploading when the peer dies: the save on failure waits for the upload,
    and writes only if the upload failed (a serialize or checkpoint fault)."""
    saves = training_at(6)
    saves.staged()
    assert saves.upload_begins()
    assert saves.failure_save_begins() is FailureSave.WAIT_FOR_UPLOAD
    upload = threading.Thread(target=saves.upload_ended, args=(6 if upload_ok else None,))
    upload.start()
    assert saves.wait_until_free(timeout=10)
    upload.join()
    assert (saves.saved_step >= 6) is upload_ok  # the failure save writes only if not


def test_an_upload_that_outlasts_rays_patience_is_left_alone():
    saves = training_at(6)
    saves.staged()
    saves.upload_begins()
    assert saves.failure_save_begins() is FailureSave.WAIT_FOR_UPLOAD
    assert not saves.wait_until_free(timeout=0.05)  # then Ray's kill: no second writer


def test_shutdown_waits_for_the_save_on_failure_then_lets_ray_kill():
    saves = training_at(7)
    began, release = threading.Event(), threading.Event()

    def training_thread():
        saves.failure_save_begins()
        began.set()
        release.wait()
        saves.end_attempt()

    thread = threading.Thread(target=training_thread)
    thread.start()
    began.wait()
    threading.Timer(0.1, release.set).start()  # the save takes a moment
    assert saves.hold_shutdown(notice_within_s=5, hold_at_most_s=10) == "idle"
    thread.join()


def test_a_save_longer_than_rays_patience_is_given_up():
    saves = training_at(7)
    saves.failure_save_begins()
    assert saves.hold_shutdown(notice_within_s=1, hold_at_most_s=0.05) == "saving"


def test_an_attempt_that_saves_nothing_is_held_only_the_notice_window():
    saves = training_at(7)  # a peer's process: it never saves
    assert saves.hold_shutdown(notice_within_s=0.05, hold_at_most_s=10) == "training"
    saves.end_attempt()
    assert saves.hold_shutdown(notice_within_s=10, hold_at_most_s=10) == "idle"


def test_rank_0_blocked_in_a_broken_report_barrier_has_its_staged_copy_rescued_once():
    """Rank 0 blocked in the report of a staged checkpoint never notices the dead peer: the
    shutdown callback runs the rescue in its own thread, which claims the staged copy; a late
    upload and a second rescue are refused."""
    saves = training_at(8)
    saves.staged()
    written = []

    def rescue():
        if saves.claim_rescue():
            written.append(threading.current_thread().name)

    saves.offer_rescue(rescue)
    assert saves.hold_shutdown(notice_within_s=0.05, hold_at_most_s=10) == "rescued"
    assert written == [threading.current_thread().name]
    rescue()
    assert not saves.upload_begins()
    assert written == [threading.current_thread().name]


def test_a_training_thread_waiting_to_stage_is_woken_by_the_shutdown_and_saves_itself():
    """Rank 0 completed step 9 and waits for checkpoint 8's staged copy (its report blocked on a
    dead peer): the shutdown wakes it, its save on failure takes over, and the older staged copy
    is neither rescued nor uploaded."""
    saves = training_at(9)
    saves.staged()
    rescued = []
    saves.offer_rescue(lambda: rescued.append(saves.claim_rescue()))
    woken = []

    def training_thread():
        try:
            saves.wait_to_stage(timeout=10)
        except ShutdownBegun as exc:
            woken.append(str(exc))
            assert saves.failure_save_begins() is FailureSave.SAVE
        saves.end_attempt()

    thread = threading.Thread(target=training_thread)
    thread.start()
    assert saves.hold_shutdown(notice_within_s=5, hold_at_most_s=10) == "idle"
    thread.join()
    assert woken and "step 9" in woken[0] and rescued == []
    assert not saves.upload_begins()
    saves.begin_attempt()  # the next attempt in this process waits as before
    assert not saves.shutdown_begun and saves.wait_to_stage(timeout=0)


def test_no_rescue_once_the_upload_began():
    saves = training_at(8)
    saves.staged()
    saves.upload_begins()
    assert not saves.claim_rescue()


def test_a_report_withdraws_only_its_own_rescue():
    saves = training_at(9)
    first, second = (lambda: None), (lambda: None)
    saves.offer_rescue(first)
    saves.offer_rescue(second)  # the next checkpoint's, offered before the first report ended
    saves.withdraw_rescue(first)
    assert saves.rescue is second
    saves.withdraw_rescue(second)
    assert saves.rescue is None


def test_a_new_attempt_starts_free_and_training():
    saves = training_at(9)
    saves.staged()
    saves.failure_save_begins()
    saves.end_attempt()
    saves.begin_attempt()
    assert (saves.checkpoint, saves.attempt, saves.failed) == (
        Checkpoint.FREE,
        Attempt.TRAINING,
        False,
    )


def test_rays_shutdown_callback_holds_this_processs_attempt(monkeypatch):
    saves = training_at(3)
    saves.failure_save_begins()
    threading.Timer(0.05, saves.end_attempt).start()
    monkeypatch.setattr(shutdown_grace.save_protocol, "THIS_PROCESS", saves)
    shutdown_grace.WaitForFailureSave().before_worker_shutdown()
    assert saves.attempt is Attempt.IDLE  # it returned only once the save had ended
