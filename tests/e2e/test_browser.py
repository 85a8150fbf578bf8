"""The pages people look at, in a real headless browser, against the real services.

    make e2e        # or: .venv/bin/python -m pytest tests/e2e/test_browser.py -s

Debian's chromium (/usr/bin/chromium; `.ci/run` apt-installs it) driven by Playwright. The
session's shared Compose cluster (tests/e2e/conftest.py: the `monitoring` profile, head, 2
workers, Prometheus) and one training run on it; in file order:
  1. Prometheus's graph page shows the ray_elastic_trainer_loss series while the run trains
     (and the value it shows is a loss the run logged); Ray's own ray_train_* metrics answer too;
  2. the Ray dashboard asks for the token, and once given it lists the job as SUCCEEDED;
  3. TensorBoard, started on the host on the finished run's event files (copied out of the
     volume), shows the train/loss card at the run's final step and loss.
A failing page leaves a screenshot under test-artifacts/browser/ (or $E2E_ARTIFACTS). Traffic
goes only to ports published on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import wait_for
from support.compose import (
    CONFIG_IN_IMAGE,
    STORAGE,
    ComposeCluster,
    job_client,
    train_command,
    wait_for_job,
)
from support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Screenshots of failed pages (.ci/run points this into the checkout it was started from).
ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", REPO_ROOT / "test-artifacts" / "browser"))
RUN_NAME = "e2e-browser"
PAGE_TIMEOUT_MS = 60_000
SERIES_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def job_id(cluster: ComposeCluster) -> str:
    """One run for every page: 2 epochs (152 steps) on 2 workers, about 1.5 minutes."""
    submitted = job_client(cluster).submit_job(
        entrypoint=train_command(CONFIG_IN_IMAGE, RUN_NAME, training__epochs=2)
    )
    cluster.mark(f"submitted {RUN_NAME} ({submitted})")
    return submitted


@pytest.fixture(scope="module")
def finished_run(
    cluster: ComposeCluster, job_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The run directory, copied out of the volume once the job SUCCEEDED."""
    assert wait_for_job(cluster, job_id) == "SUCCEEDED"
    cluster.mark(f"{RUN_NAME} SUCCEEDED")
    target = tmp_path_factory.mktemp("finished")
    cluster.compose("cp", f"head:{STORAGE}/{RUN_NAME}", str(target))
    return target / RUN_NAME


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The distribution's chromium (Playwright cannot download its own build here); no
        # sandbox, since CI runs as root.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest) -> Iterator:
    """A fresh page; saved as a screenshot when the test fails (test-artifacts/browser/)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(PAGE_TIMEOUT_MS)
    failed_before = request.session.testsfailed
    yield opened
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        with contextlib.suppress(Exception):  # a crashed page must not hide the real failure
            opened.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot} (page {opened.url})")
    context.close()


def step_events(run_dir: Path) -> list[dict]:
    """The run log's step events that carry a loss (steps that closed a log interval), read
    from a copied-out local directory: plain files."""
    events = [
        json.loads(line)
        for log in sorted((run_dir / "runlog").glob("*.jsonl"))
        for line in log.read_text().splitlines()
        if line.strip()
    ]
    return [e for e in events if e.get("event") == "step" and "loss" in e]


def test_prometheus_graph_page_shows_the_training_loss(cluster, job_id, page, request) -> None:
    from playwright.sync_api import expect

    # Readiness: Prometheus found the worker through Ray's service discovery and scraped it.
    expr = f'ray_elastic_trainer_loss{{ray_train_run_name="{RUN_NAME}"}}'
    series = wait_for(
        lambda: cluster.query(expr), SERIES_TIMEOUT_S, f"{expr} in Prometheus", every=2
    )
    cluster.mark(f"Prometheus API: {expr} = {series[0]['value'][1]}")
    query = urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "1"})
    page.goto(f"{cluster.prometheus}/graph?{query}")
    table = page.locator("table.console_table")
    expect(table).to_contain_text("ray_elastic_trainer_loss{", timeout=PAGE_TIMEOUT_MS)
    row = table.locator("tr").filter(has_text="ray_elastic_trainer_loss{").first.inner_text()
    shown = float(row.split()[-1])
    cluster.mark(f"graph page row: {' '.join(row.split())}")

    # Ray's own Train metrics, labelled with our run, from the same server. Over a window:
    # the controller's series go stale the moment the run ends, which may be before this.
    ray_train = wait_for(
        lambda: cluster.query(
            "count by (__name__) (last_over_time("
            f'{{__name__=~"ray_train_.+",ray_train_run_name="{RUN_NAME}"}}[30m]))'
        ),
        SERIES_TIMEOUT_S,
        "ray_train_* metrics of the run in Prometheus",
        every=2,
    )
    names = sorted(s["metric"]["__name__"] for s in ray_train)
    cluster.mark(f"Prometheus API: ray_train_* series of {RUN_NAME}: {names}")
    assert "ray_train_controller_state" in names, names

    # The value the page showed is one the run really logged (read once the run is done).
    losses = [e["loss"] for e in step_events(request.getfixturevalue("finished_run"))]
    assert any(math.isclose(shown, x, rel_tol=1e-9) for x in losses), (shown, losses[-5:])


def test_dashboard_asks_for_the_token_then_lists_the_job_succeeded(
    cluster, job_id, finished_run, page
) -> None:
    from playwright.sync_api import expect

    page.goto(cluster.dashboard)
    prompt = page.get_by_text("Authentication Token Required")
    expect(prompt).to_be_visible()
    page.get_by_placeholder("Enter your authentication token").fill(cluster.token)
    page.get_by_role("button", name="Submit").click()
    expect(prompt).to_be_hidden()

    page.goto(f"{cluster.dashboard}/#/jobs")
    row = page.get_by_role("row").filter(has_text=job_id)
    expect(row).to_contain_text("SUCCEEDED")
    cluster.mark(f"dashboard jobs page after the token: {job_id} SUCCEEDED")


@pytest.fixture
def tensorboard(finished_run: Path) -> Iterator[str]:
    """TensorBoard on the host, on the finished run's event files; its URL."""
    port = free_port()
    logdir = finished_run / "tensorboard"
    binary = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(binary), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _has_loss_tag(url), 90, "TensorBoard to list train/loss", every=1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _has_loss_tag(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
            return "train/loss" in json.load(response).get(".", {})
    except OSError:
        return False


def test_tensorboard_shows_the_loss_of_the_finished_run(
    cluster, finished_run, tensorboard, page
) -> None:
    from playwright.sync_api import expect

    final = max(step_events(finished_run), key=lambda e: e["global_step"])
    page.goto(f"{tensorboard}/#timeseries")
    page.get_by_role("combobox", name="Filter tags (regex)").fill("^train/loss$")
    card = page.locator("scalar-card").filter(has_text="/loss")
    expect(card).to_have_count(1)
    expect(card.locator("canvas, svg").first).to_be_visible()
    # The card's data table: run, smoothed, value, step, relative time at the last step.
    expect(card).to_contain_text(str(final["global_step"]))
    numbers = [float(n) for n in re.findall(r"\b\d+\.\d+\b", card.inner_text())]
    assert any(math.isclose(n, final["loss"], rel_tol=1e-3, abs_tol=1e-4) for n in numbers), (
        final["loss"],
        numbers,
    )
    cluster.mark(
        f"TensorBoard train/loss card: step {final['global_step']}, loss {final['loss']:.4f}"
    )
