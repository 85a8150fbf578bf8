"""Checkpoint round trip, corruption and truncation detection, retention, bytes read."""

import json
import logging
import posixpath
import zipfile

import pyarrow.fs as pafs
import pytest
import torch
from counting_fs import recording_fs
from support.checkpoints import make_state, save

from training.core import checkpoint
from training.core.checkpoint import InvalidCheckpoint, Progress
from training.driver import cli, launch

FS = pafs.LocalFileSystem()


def differences(a, b, where="") -> list[str]:
    """Where two state trees differ; tensors compared with torch.equal (dtype, shape, values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return [] if same and a.dtype == b.dtype else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}/{i}")
        ]
    return [] if a == b else [where]


def test_round_trip_restores_every_part_of_the_state(tmp_path):
    path, model, optimizer, scheduler = save(tmp_path, 12)
    _, fresh_model, fresh_opt, fresh_sched = make_state(seed=99)
    parts = [(model, fresh_model), (optimizer, fresh_opt), (scheduler, fresh_sched)]
    for saved, fresh in parts:  # a restore is observable in every part
        assert differences(saved.state_dict(), fresh.state_dict()), type(saved).__name__
    progress = checkpoint.restore(checkpoint.load(FS, path), fresh_model, fresh_opt, fresh_sched)
    assert progress == Progress(global_step=12, epoch=1, step_in_epoch=2, attempt="a1")
    for saved, fresh in parts:
        assert differences(saved.state_dict(), fresh.state_dict()) == [], type(saved).__name__
    assert fresh_sched.last_epoch == 3
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    state = checkpoint.load(FS, path)
    assert state["config"]["task"]["name"] == "tabular"
    assert state["extra"] == {"scaler": {"scale": 8.0}, "task": {"ema": [1.0]}}


def test_state_file_skips_torchs_per_record_crc_and_still_loads(tmp_path):
    """The manifest's SHA-256 checks the file; torch's zip CRC32s would only cost CPU."""
    pytest.importorskip("torch.utils.serialization", reason="this torch has no CRC switch")
    path, model, _, _ = save(tmp_path, 20)
    with zipfile.ZipFile(posixpath.join(path, checkpoint.STATE_FILE)) as archive:
        tensors = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
        assert tensors and all(i.CRC == 0 for i in tensors), [(i.filename, i.CRC) for i in tensors]
    assert torch.serialization.get_crc32_options()  # torch's own setting is back
    loaded = checkpoint.load(FS, path)
    assert torch.equal(loaded["model"]["net.0.weight"], model.state_dict()["net.0.weight"])


def test_manifest_is_written_last_and_lists_every_file(tmp_path):
    fs, recorded = recording_fs()
    _, model, optimizer, scheduler = make_state()
    progress = Progress(global_step=3, epoch=0, step_in_epoch=3, attempt="a1")
    state = checkpoint.build_state(model, optimizer, scheduler, progress, {})
    checkpoint.write_state(tmp_path / checkpoint.dir_name(3), state, fs=fs)
    assert recorded.writes == [  # the state file is complete before the manifest is begun
        ("opened", checkpoint.STATE_FILE),
        ("closed", checkpoint.STATE_FILE),
        ("opened", checkpoint.MANIFEST_FILE),
        ("closed", checkpoint.MANIFEST_FILE),
    ]
    manifest = json.loads((tmp_path / checkpoint.dir_name(3) / "manifest.json").read_text())
    assert set(manifest["files"]) == {checkpoint.STATE_FILE}
    assert manifest["progress"]["global_step"] == 3


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / checkpoint.STATE_FILE).unlink(), "is missing"),
        (lambda d: truncate(d / checkpoint.STATE_FILE), "bytes, manifest says"),
        (lambda d: flip_byte(d / checkpoint.STATE_FILE), "checksum does not match"),
    ],
    ids=["no-manifest", "bad-manifest", "missing-file", "truncated", "bit-flip"],
)
def test_damaged_checkpoint_is_rejected(tmp_path, damage, reason):
    path, _, _, _ = save(tmp_path, 5)
    damage(tmp_path / checkpoint.dir_name(5))
    with pytest.raises(InvalidCheckpoint, match=reason):
        checkpoint.load(FS, path)


def truncate(file):
    file.write_bytes(file.read_bytes()[:-100])


def flip_byte(file):
    blob = bytearray(file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    file.write_bytes(bytes(blob))


def test_newest_valid_skips_broken_newer_checkpoints_with_a_warning(tmp_path, caplog):
    save(tmp_path, 10)
    save(tmp_path, 20)
    save(tmp_path, 30)
    truncate(tmp_path / checkpoint.dir_name(30) / checkpoint.STATE_FILE)
    (tmp_path / checkpoint.dir_name(20) / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        chosen = checkpoint.newest_valid(FS, str(tmp_path))
    assert chosen.step == 10
    assert "checkpoint_000000030" in caplog.text and "checkpoint_000000020" in caplog.text


def test_load_newest_falls_back_past_a_same_size_corruption(tmp_path, caplog):
    """Sizes (all the driver checks) cannot see a flipped byte; the one read that loads can."""
    save(tmp_path, 10)
    save(tmp_path, 20)
    save(tmp_path, 30)
    flip_byte(tmp_path / checkpoint.dir_name(30) / checkpoint.STATE_FILE)
    truncate(tmp_path / checkpoint.dir_name(20) / checkpoint.STATE_FILE)
    assert checkpoint.newest_valid(FS, str(tmp_path)).step == 30  # sizes only, as documented
    fs, recorded = recording_fs()
    with caplog.at_level(logging.WARNING):
        info, state = checkpoint.load_newest(fs, str(tmp_path))
    assert info.step == 10 and state["progress"]["global_step"] == 10
    assert "checkpoint_000000030: train_state.pt checksum does not match" in caplog.text
    assert "checkpoint_000000020: train_state.pt has " in caplog.text
    sizes = {s: (tmp_path / checkpoint.dir_name(s) / checkpoint.STATE_FILE).stat().st_size
             for s in (10, 30)}  # fmt: skip
    assert recorded.read_of(checkpoint.STATE_FILE) == sizes[30] + sizes[10]  # each read once
    assert "checksum does not match" in checkpoint.scan(FS, str(tmp_path), full=True)[0].reason


def test_load_newest_without_a_loadable_checkpoint(tmp_path):
    assert checkpoint.load_newest(FS, str(tmp_path / "missing")) is None
    save(tmp_path, 10)
    (tmp_path / checkpoint.dir_name(10) / checkpoint.MANIFEST_FILE).unlink()
    assert checkpoint.load_newest(FS, str(tmp_path)) is None


def test_driver_and_status_checks_read_no_state_bytes(tmp_path):
    """What a driver start, the end-of-run summary and `status` check: manifests and sizes."""
    for step in (10, 20):
        save(tmp_path, step)
    fs, recorded = recording_fs()
    run = launch.current_state(launch.RunState(fs, str(tmp_path), None, existed=True))
    assert run.resume_from.step == 20
    assert [c["valid"] for c in launch.run_summary(fs, str(tmp_path))["checkpoints"]] == [1, 1]
    assert [c["valid"] for c in cli._run_status(fs, str(tmp_path))["checkpoints"]] == [1, 1]
    assert checkpoint.newest_valid(fs, str(tmp_path)).step == 20
    assert recorded.read_of(checkpoint.MANIFEST_FILE) > 0  # the check did run
    assert recorded.read_of(checkpoint.STATE_FILE) == 0
    checkpoint.load(fs, run.resume_from.path)  # the counting itself works
    assert (
        recorded.read_of(checkpoint.STATE_FILE)
        == (tmp_path / checkpoint.dir_name(20) / checkpoint.STATE_FILE).stat().st_size
    )


def test_no_checkpoint_at_all(tmp_path):
    assert checkpoint.newest_valid(FS, str(tmp_path / "missing")) is None
    (tmp_path / "checkpoint_tmp").mkdir()
    (tmp_path / "runlog").mkdir()
    assert checkpoint.scan(FS, str(tmp_path)) == []


def test_prune_keeps_newest_valid_and_removes_leftovers(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step)
    (tmp_path / checkpoint.dir_name(25, "dead0001")).mkdir()  # partial of a dead attempt
    (tmp_path / checkpoint.dir_name(50, "cafe0001")).mkdir()  # the running attempt's upload
    deleted = checkpoint.prune(FS, str(tmp_path), keep=2, attempt="cafe0001")
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [
        checkpoint.dir_name(30),
        checkpoint.dir_name(40),
        checkpoint.dir_name(50, "cafe0001"),
    ]
    assert len(deleted) == 3
    checkpoint.prune(FS, str(tmp_path), keep=2, attempt="beef0002")
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.dir_name(s) for s in (30, 40)]


def test_prune_never_deletes_what_ray_registered(tmp_path):
    """Ray refuses to start a run whose registered checkpoints are gone; it deletes them itself."""
    for step in (10, 20, 30):
        save(tmp_path, step)
    truncate(tmp_path / checkpoint.dir_name(30) / checkpoint.STATE_FILE)  # registered, broken
    registered = [checkpoint.dir_name(10), checkpoint.dir_name(30)]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in registered]}
    (tmp_path / checkpoint.RAY_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    checkpoint.prune(FS, str(tmp_path), keep=1, attempt="x")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        checkpoint.dir_name(s) for s in (10, 20, 30)
    ]
    # Ray drops 10 and 30 from its snapshot, then deletes them: a prune in between must leave
    # them to Ray (its delete of a missing directory fails the run).
    (tmp_path / checkpoint.RAY_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": []}))
    checkpoint.prune(FS, str(tmp_path), keep=1, attempt="x")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        checkpoint.dir_name(s) for s in (10, 20, 30)
    ]
    # A process that never saw them registered takes them for leftovers Ray lost.
    checkpoint._seen_registered.clear()
    checkpoint.prune(FS, str(tmp_path), keep=1, attempt="x")
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [checkpoint.dir_name(20)]


def test_prune_deletes_nothing_if_rays_snapshot_is_unreadable(tmp_path):
    save(tmp_path, 10)
    (tmp_path / checkpoint.dir_name(5)).mkdir()
    (tmp_path / checkpoint.RAY_SNAPSHOT_FILE).write_text("{torn")
    assert checkpoint.prune(FS, str(tmp_path), keep=1, attempt="x") == []


def test_attempt_suffix_keeps_step_order():
    names = [checkpoint.dir_name(9, "ab12cd34"), checkpoint.dir_name(10)]
    assert names == sorted(names)


def test_dir_name_sorts_by_step():
    names = [checkpoint.dir_name(s) for s in (9, 10, 100, 1_000_000)]
    assert names == sorted(names)
    assert posixpath.basename(names[0]) == "checkpoint_000000009"
