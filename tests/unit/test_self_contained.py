"""The repository stands alone: a user's clone has nothing beside it.

The tracked files are copied into an empty temporary directory and the fast test tiers run
there, so a test or a fixture that reads a path outside the repository fails here. Under
`.ci/run` the whole session already runs in such a copy (a fresh clone in an empty directory),
so there it checks that nothing lies beside the clone instead of copying it again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# A path that climbs out of the checkout (`../x` at the top, or `.parent` past the root).
OUTSIDE = re.compile(r"\.\./shared|parents?\s*/\s*[\"']shared[\"']")


def tracked_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    )
    return [name for name in listing.stdout.decode().split("\0") if name]


def copy_of_repository(target: Path) -> Path:
    for name in tracked_files():
        source = REPO_ROOT / name
        if source.is_file():  # a file deleted but not yet committed is skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_no_tracked_file_reads_outside_the_repository() -> None:
    offenders = [
        name
        for name in tracked_files()
        if not name.endswith(".md")
        and (REPO_ROOT / name).is_file()
        and OUTSIDE.search((REPO_ROOT / name).read_text(errors="ignore"))
    ]
    assert offenders == []


def test_fast_tiers_pass_in_a_copy_with_nothing_beside_it(tmp_path: Path) -> None:
    if os.environ.get("CI_IN_SCRATCH_CLONE") == "1":
        # .ci/run already runs every tier in a fresh clone inside an empty directory: that
        # run is the copy, so running the KubeRay tier again in another would test nothing
        # new (issue 28: each tier once). What must hold is that nothing lies beside it.
        assert list(REPO_ROOT.parent.iterdir()) == [REPO_ROOT]
        return
    clone = copy_of_repository(tmp_path / "clone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    offline = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kuberay"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    assert re.search(r"\d+ passed", offline.stdout)


def test_no_tracked_file_holds_merge_conflict_markers() -> None:
    marker = re.compile(r"^(" + "<" * 7 + "|" + ">" * 7 + r")( |$)", re.M)
    offenders = [
        name
        for name in tracked_files()
        if (REPO_ROOT / name).is_file()
        and marker.search((REPO_ROOT / name).read_text(errors="ignore"))
    ]
    assert offenders == []
