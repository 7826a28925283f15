"""The training jobs' command line: common flags, and any other config key through --set, checked by the
config loader with the key's path in the message."""
from __future__ import annotations

import pytest

from pipeline.cli import parse_args

DATA = ["--data", "/nonexistent/log", "--spec", "spec.yaml"]  # no default log generated


def test_common_flags_and_set_keys_reach_the_config():
    job = parse_args("ple", DATA + ["--patience", "3", "--epochs", "4", "--set", "model.expert_hidden=[16, 8]",
                                    "--set", "train.shuffle_window=1000", "--set", "model.towers={convert: [7]}",
                                    "--set", "train.precision=fp32"])
    assert job.train.patience == 3 and job.train.epochs == 4 and job.train.precision == "fp32"
    assert job.model.expert_hidden == [16, 8] and job.train.shuffle_window == 1000
    assert job.model.towers == {"convert": [7]} and job.model.name == "ple"


@pytest.mark.parametrize("item, message", [
    ("train.precision=fp8", "train.precision: must be one of auto|fp32|bf16, got 'fp8'"),
    ("train.patience=soon", "train.patience"),
    ("train.patiense=3", "unknown config key 'train.patiense'"),
    ("model.sharding=diagonal", "model.sharding: must be one of"),
    ("model.name=xyz", "model.name: must be one of single_task|shared_bottom"),
    ("model.dependent_loss=half", "model.dependent_loss: must be one of esmm|masked"),
    ("train.loss_weighting=magic", "train.loss_weighting: must be one of fixed|decay|uncertainty|gradnorm"),
    ("train.early_stop_metric=max_auc", "train.early_stop_metric: must be one of mean_auc|min_auc|weighted_auc"),
    ("train.table_optimizer=lamb", "train.table_optimizer: must be one of"),
    ("data.on_bad_rows=skip", "data.on_bad_rows: must be one of fail|drop"),
    ("patience", "expected KEY=VALUE"),
])
def test_a_wrong_value_names_its_key(item, message, capsys):
    with pytest.raises(SystemExit):
        parse_args("ple", DATA + ["--set", item])
    assert message in capsys.readouterr().err


def test_flags_with_choices_take_them_from_the_config_types():
    import typing

    from pipeline.cli import FLAGS, field_type

    for flag, (key, _) in FLAGS.items():
        field_type(key)  # every flag names a config field
    assert typing.get_args(field_type("train.precision")) == ("auto", "fp32", "bf16")
    with pytest.raises(SystemExit):
        parse_args("ple", DATA + ["--precision", "fp8"])  # argparse's own choices, from the same Literal
    assert parse_args("ple", DATA + ["--no-compile", "--gpu"]).train.use_gpu is True


def test_a_search_space_objective_is_checked_by_the_loader(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.tuning import TuneSpace

    path = tmp_path / "space.yaml"
    path.write_text("model: ple\nobjective: best_auc\nspace: {}\n")
    with pytest.raises(ConfigError, match=r"objective: must be one of mean_auc\|min_auc\|weighted_auc, got 'best_auc'"):
        TuneSpace.load(path)


def test_console_scripts_are_installed_and_run():
    import shutil
    import subprocess
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("mtrec-")}
    assert set(scripts) == {"mtrec-train", "mtrec-tune", "mtrec-convert", "mtrec-export", "mtrec-predict"}
    for name, entry in scripts.items():
        assert callable(entry.load()), name
        exe = shutil.which(name)
        assert exe, f"{name} is not on PATH (pip install -e . installs it)"
        done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (name, done.stderr[-1000:])


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["sequences"][0].update(pooling="median"), "sequences[0].pooling: must be one of mean|sum|max, got 'median'"),
    (lambda s: s["dense"][0].update(normalize="minmax"), "dense[0].normalize: must be one of standard|log_standard|none"),
])
def test_a_spec_choice_names_its_key(edit, message):
    import copy

    from pipeline.config import ConfigError, DatasetSpec, from_dict

    spec = {"name": "t", "sparse": [{"name": "user", "vocab_size": 30, "dim": 8}],
            "sequences": [{"name": "hist", "table": "user", "max_len": 5}], "dense": [{"name": "a"}],
            "tasks": [{"name": "click"}]}
    assert from_dict(DatasetSpec, copy.deepcopy(spec)).task_names == ["click"]
    edit(spec)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        from_dict(DatasetSpec, spec)
