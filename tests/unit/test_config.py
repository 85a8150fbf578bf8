"""Config validation: every bad value gets one clear line naming the field and what is allowed."""

import pytest

from training.core.config import Config, ConfigError, identity_diff
from training.driver.settings import load_config, parse_config

BAD_INPUTS = [
    (
        {"training": {"global_batch_size": 0}},
        "training.global_batch_size: Input should be greater than 0",
    ),
    ({"training": {"epochs": "three"}}, "training.epochs: Input should be a valid integer"),
    (
        {"training": {"optimizer": {"name": "adam"}}},
        "training.optimizer.name: Input should be 'adamw' or 'sgd'",
    ),
    (
        {"training": {"optimizer": {"lr": -1}}},
        "training.optimizer.lr: Input should be greater than 0",
    ),
    (
        {"training": {"lr_schedule": {"name": "step"}}},
        "training.lr_schedule.name: Input should be 'constant', 'cosine' or 'linear'",
    ),
    (
        {"training": {"epochz": 3}},
        "training.epochz: unknown key; allowed keys here: collective_timeout_s, deterministic",
    ),
    ({"trainin": {}}, "trainin: unknown key; allowed keys here: chaos, checkpoint, data"),
    (
        {"scaling": {"min_workers": 3, "max_workers": 2}},
        "scaling: min_workers (3) must be <= max_workers (2)",
    ),
    ({"scaling": {"min_workers": 0}}, "scaling.min_workers: Input should be greater than 0"),
    (
        {"scaling": {"min_workers": 2, "max_workers": 3}, "training": {"global_batch_size": 64}},
        "global_batch_size (64) must be divisible by every allowed world size 2..3; it is not by 3",
    ),
    ({"checkpoint": {"upload": "later"}}, "checkpoint.upload: Input should be 'sync' or 'async'"),
    ({"checkpoint": {"num_to_keep": 0}}, "checkpoint.num_to_keep: Input should be greater than 0"),
    (
        {"failure": {"max_failures": -2}},
        "failure.max_failures: Input should be greater than or equal to -1",
    ),
    (
        {"task": {"options": {"model": "resnet"}}},
        "task.options: 'resnet' is not a model: use mlp, transformer or an import string",
    ),
    (
        {"task": {"options": {"lable_column": "y"}}},
        "task.options.lable_column: unknown option; allowed options: demo_rows, feature_columns",
    ),
    (
        {"task": {"name": "language_model", "options": {"block_size": 0}}},
        "task.options.block_size: Input should be greater than 0",
    ),
    (
        {"task": {"name": "gpt"}},
        "task.name 'gpt': use one of tabular, language_model, image or an import string",
    ),
    (
        {"task": {"name": "nowhere.tasks:Mine"}},
        "task.name 'nowhere.tasks:Mine': no module 'nowhere.tasks' where this runs (current "
        "directory",
    ),
    (
        {"task": {"name": "training.tasks.tabular:Tabulr"}},
        "task.name 'training.tasks.tabular:Tabulr': module 'training.tasks.tabular' has no "
        "'Tabulr' (it defines: DEMO_CLASSES, DEMO_FEATURES, MLP, MLPOptions, Table, TableInfo, "
        "TabularClassification,",  # its own names, not what it imports (Any, BaseModel, ...)
    ),
    (
        {"task": {"name": "training.core.config:Config"}},
        "task.name 'training.core.config:Config': <class 'training.core.config.Config'> is not a "
        "subclass of training.tasks.Task",
    ),
    (
        {"task": {"options": {"transformer": {"d_model": 30, "n_heads": 4}}}},
        "task.options.transformer: d_model (30) must be divisible by n_heads (4)",
    ),
    ({"run": {"name": "my run/1"}}, "run.name: String should match pattern"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction: Input should be less than 1"),
    (
        {"chaos": {"faults": [{"kind": "explode", "step": 3}]}},
        "chaos.faults.0.kind: Input should be 'kill', 'raise', 'stall', 'drop_sample' or "
        "'repeat_sample'",
    ),
    ({"chaos": {"faults": [{"kind": "kill"}]}}, "chaos.faults.0.step: required field is missing"),
    (
        {"chaos": {"faults": [{"kind": "kill", "step": 3, "rank": 5}]}},
        "chaos.faults[0].rank (5) must be < scaling.max_workers (2)",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_INPUTS, ids=[e for _, e in BAD_INPUTS])
def test_bad_value_gets_one_clear_line(raw, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_every_problem_is_reported_not_just_the_first():
    with pytest.raises(ConfigError) as caught:
        parse_config({"training": {"epochs": 0, "seed": -1}})
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["training.epochs", "training.seed"]


def test_shipped_local_config_is_valid_and_overridable():
    cfg = load_config(
        "training/configs/local.yaml", ["training.epochs=5", "task.options.mlp.hidden_sizes=[8, 8]"]
    )
    assert cfg.training.epochs == 5
    assert cfg.task.options["mlp"]["hidden_sizes"] == [8, 8]
    assert cfg.scaling.min_workers == cfg.scaling.max_workers == 2


@pytest.mark.parametrize("override", ["training.epochs", "=3", ""])
def test_malformed_override_is_rejected(override):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, [override])


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        load_config(None, ["training.epochs=3", "training.epochs.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)


def test_identity_diff_names_changed_fields_only():
    base = Config().model_dump()
    changed = Config.model_validate(
        {"training": {"seed": 7, "log_every_n_steps": 1}, "scaling": {"min_workers": 1}}
    ).model_dump()
    assert identity_diff(base, changed) == ["training.seed: 0 -> 7"]
    assert identity_diff(base, Config().model_dump()) == []


def test_model_change_is_an_identity_change():
    other = parse_config({"task": {"options": {"mlp": {"hidden_sizes": [64]}}}}).model_dump()
    assert identity_diff(parse_config({}).model_dump(), other)[0].startswith("task:")


def test_evaluation_is_due_at_checkpoints_or_every_n_steps_and_never_when_off():
    at_checkpoints = parse_config({"eval": {"batches": 2}}).eval
    assert at_checkpoints.due(100, checkpoint_due=True)
    assert not at_checkpoints.due(99, checkpoint_due=False)
    every_30 = parse_config({"eval": {"batches": 2, "every_n_steps": 30}}).eval
    assert every_30.due(60, checkpoint_due=False)
    assert not every_30.due(100, checkpoint_due=True)
    assert not parse_config({"eval": {"batches": 0}}).eval.due(100, checkpoint_due=True)


def test_a_check_across_sections_names_its_fields_without_a_config_prefix():
    with pytest.raises(ConfigError) as raised:
        parse_config({"training": {"global_batch_size": 33}})
    assert str(raised.value).startswith("training.global_batch_size (33) must be divisible")
