"""The README's "Your own workload" example, exactly as written: the task keeps the contract and
its config validates. (tests/integration/test_workloads.py trains such a task through the CLI.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner

from training.driver.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str, language: str) -> str:
    text = README.read_text()
    after = text[text.index(f"<!-- {marker}") :]
    return re.search(rf"```{language}\n(.*?)```", after, re.S).group(1)


def test_readme_task_is_under_40_lines_and_keeps_the_contract(tmp_path, monkeypatch):
    source = readme_block("README task example", "python")
    assert len(source.splitlines()) < 40
    (tmp_path / "my_tasks.py").write_text(source)
    config = yaml.safe_load(readme_block("README task config", "yaml"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    points = np.c_[x, x @ [1.5, -2, 0.5]]
    np.savetxt(tmp_path / "points.csv", points, delimiter=",", header="a,b,c,y", comments="")
    config["data"]["path"] = str(tmp_path / "points.csv")
    (tmp_path / "regression.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["check-task", "--config", str(tmp_path / "regression.yaml")])
    sys.modules.pop("my_tasks", None)
    assert result.exit_code == 0, result.output
    assert "task 'my_tasks:CsvRegression': contract holds" in result.output
    assert "  ok  totals additive over disjoint ids" in result.output  # says what it checked
