"""What Redis-backed GCS fault tolerance buys, measured: the same head crash on a cluster without
it (cluster/compose.no-gcs-ft.yaml). The supervisor alone still heals the run; the workers'
raylets cannot rejoin a head that forgot the cluster, so their containers restart.

    .venv/bin/python -m pytest tests/e2e/test_head_loss_without_gcs_ft.py -s
"""

from __future__ import annotations

import pytest
from support.compose import compose_cluster
from support.healing import (
    CLUSTER_DIR,
    STEPS_PER_EPOCH,
    crash_head_and_recover,
    finish,
    start_supervisor,
)

# A measurement for the README (what GCS fault tolerance buys), ~9 min: `make e2e-compare`,
# not part of `make e2e` / CI, which test the shipped setup (tests/e2e/test_self_healing.py).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.comparison]

NAME = "e2e-no-ft"
EPOCHS = 4  # 304 steps


def test_head_crash_without_gcs_ft_heals_by_resubmission(
    project_image: str, tmp_path: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    override = CLUSTER_DIR / "compose.no-gcs-ft.yaml"
    # Its own project: a cluster without GCS fault tolerance, torn down at the end.
    with compose_cluster(request, tmp_path, "et-heal", 1, overrides=(override,)) as c:
        start_supervisor(c, NAME, EPOCHS)
        crash_head_and_recover(c, NAME)
        finish(c, NAME, total_steps=EPOCHS * STEPS_PER_EPOCH)
