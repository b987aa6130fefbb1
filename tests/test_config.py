"""Config layering (defaults < preset < TOML < flags), the generated CLI, run directories, devices."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chatforge import cli
from chatforge.common import ChatforgeError, StageRun, data_path, get_device, is_complete, require_stage, \
    setup_threads, stage_run
from chatforge.config import PRESETS, CommonConfig, ConfigError, TokenizerConfig, parse_value, resolve_config


def parse(argv):
    args = cli.build_parser().parse_args(argv)
    return cli.parse_stage_config(args.command, args)


def test_defaults_when_nothing_is_said():
    cfg = parse(["tokenizer"])
    assert cfg == TokenizerConfig()
    assert cfg.vocab_size == 32768 and cfg.run == "default"


def test_preset_fills_fields_and_flags_win():
    cfg = parse(["tokenizer", "--preset", "tiny"])
    assert cfg.vocab_size == PRESETS["tiny"]["tokenizer"]["vocab_size"]
    assert cfg.run == "tiny" and cfg.corpus == PRESETS["tiny"]["tokenizer"]["corpus"]
    cfg = parse(["tokenizer", "--preset", "tiny", "--vocab_size", "1000"])
    assert cfg.vocab_size == 1000 and cfg.run == "tiny"


def test_toml_sits_between_preset_and_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\nrun = "from-file"\n\n[tokenizer]\nvocab_size = 2048\ncorpus = ["a.txt"]\n'
                 '')
    cfg = parse(["tokenizer", "--config", str(f)])
    assert (cfg.run, cfg.vocab_size, cfg.corpus) == ("from-file", 2048, ["a.txt"])
    assert cfg.max_chars == PRESETS["tiny"]["tokenizer"]["max_chars"]  # preset named by the file
    cfg = parse(["tokenizer", "--config", str(f), "--vocab-size", "512", "--corpus", "x.txt,y.jsonl"])
    assert (cfg.vocab_size, cfg.corpus) == (512, ["x.txt", "y.jsonl"])
    # a --preset flag beats the file's preset line, the file still beats the preset
    cfg = parse(["tokenizer", "--config", str(f), "--preset", "gpu"])
    assert cfg.vocab_size == 2048 and cfg.max_chars == PRESETS["gpu"]["tokenizer"]["max_chars"]


def test_bad_settings_name_their_source(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("vocab_sise = 10\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown setting 'vocab_sise'"):
        parse(["tokenizer", "--config", str(f)])
    f.write_text("[tokenzier]\nvocab_size = 10\n")
    with pytest.raises(ConfigError, match=r"unknown section \[tokenzier\]"):
        parse(["tokenizer", "--config", str(f)])
    f.write_text('vocab_size = "big"\n')
    with pytest.raises(ConfigError, match=r"'vocab_size' must be int"):
        parse(["tokenizer", "--config", str(f)])
    f.write_text("vocab_size = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse(["tokenizer", "--config", str(f)])
    with pytest.raises(ConfigError, match="file not found"):
        parse(["tokenizer", "--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError, match=r"--vocab_size: cannot read 'lots' as int"):
        parse(["tokenizer", "--vocab_size", "lots"])
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config(TokenizerConfig, preset="huge")


def test_value_parsing():
    assert parse_value(bool, "yes", "force") is True and parse_value(bool, "0", "force") is False
    assert parse_value(int, "2_000", "n") == 2000 and parse_value(int, "2e6", "n") == 2_000_000
    assert parse_value(float, "3e-4", "lr") == 3e-4
    assert parse_value(list[str], "a,b", "corpus") == ["a", "b"]
    assert parse_value(int | None, "none", "n") is None
    assert parse(["tokenizer", "--force"]).force is True
    assert parse(["tokenizer", "--force", "false"]).force is False


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in dataclasses.fields(TokenizerConfig):
        assert f"--{f.name}" in out
        assert f.metadata["help"].split()[0] in out
    assert "(default: 32768)" in out and "--preset" in out and "--config" in out


def test_every_command_prints_its_help(capsys):
    # sft's help once crashed argparse: a field's help said "97-100% of" and argparse %-formats help.
    commands = [a.dest for a in cli.build_parser()._subparsers._group_actions[0]._choices_actions]
    assert "sft" in commands and "pretrain" in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage: chatforge" in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "97-100% of the facts" in out  # the percent sign survives, printed once


def test_presets_only_name_real_fields():
    from chatforge.config import STAGE_CONFIGS, field_types

    for name, preset in PRESETS.items():
        for stage, values in preset.items():
            cls = CommonConfig if stage == "common" else STAGE_CONFIGS.get(stage)
            assert cls is not None, f"preset {name} names unknown stage {stage}"
            for key in values:
                assert key in field_types(cls), f"preset {name}.{stage}.{key}"


def test_every_stage_config_has_one_command():
    """The CLI's stage commands come from config.STAGE_CONFIGS (one table, not two): each stage is a
    command (data through `chatforge data process`) whose flags are its config's fields, run by
    chatforge.stages.<name>."""
    import importlib

    from chatforge import cli
    from chatforge.config import STAGE_CONFIGS

    assert set(cli.STAGES) | {"data"} == set(STAGE_CONFIGS)
    parser = cli.build_parser()
    for name, cls in STAGE_CONFIGS.items():
        argv = ["data", "process"] if name == "data" else [name]
        assert isinstance(cli.parse_stage_config(name, parser.parse_args([*argv, "--run", "x"])), cls)
        assert callable(importlib.import_module(f"chatforge.stages.{name}").run)


# ----------------------------------------------------------------------------------------------
# Run directories and completion markers


def test_stage_run_writes_provenance_and_done_last(tmp_path):
    cfg = TokenizerConfig(run="r", runs_dir=str(tmp_path))
    with stage_run(cfg, "tokenizer") as run:
        run.log(step=1, loss=2.5)
        assert not run.complete
        with pytest.raises(ChatforgeError, match="not complete"):
            require_stage(cfg, "tokenizer")
        run.finish({"answer": 42})
    d = tmp_path / "r" / "tokenizer"
    assert json.loads((d / "config.json").read_text())["run"] == "r"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["git_revision"] and "torch" in meta["versions"]
    assert json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5
    assert json.loads((d / "DONE").read_text())["answer"] == 42
    assert require_stage(cfg, "tokenizer") == d


def test_crash_leaves_stage_incomplete(tmp_path):
    cfg = TokenizerConfig(run="r", runs_dir=str(tmp_path))
    with pytest.raises(RuntimeError):
        with stage_run(cfg, "tokenizer") as run:
            run.log(step=1)
            raise RuntimeError("boom")
    assert not is_complete(tmp_path / "r" / "tokenizer")
    # a forced rerun removes an old marker before doing any work
    StageRun(cfg, "tokenizer").start().finish({})
    assert is_complete(tmp_path / "r" / "tokenizer")
    StageRun(cfg, "tokenizer").start()
    assert not is_complete(tmp_path / "r" / "tokenizer")


def test_data_path_setting_env_and_gz_twins(tmp_path, monkeypatch):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.csv.gz").write_bytes(b"")
    monkeypatch.setenv("CHATFORGE_DATA_DIR", str(tmp_path))
    assert data_path("text/a.csv") == tmp_path / "text" / "a.csv.gz"
    assert data_path("text/a.csv", str(tmp_path)) == tmp_path / "text" / "a.csv.gz"
    with pytest.raises(ChatforgeError, match=r"'text/b.csv' not found .*CHATFORGE_DATA_DIR"):
        data_path("text/b.csv")


def test_device_and_threads(monkeypatch):
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):  # setup_threads sets them
        monkeypatch.delenv(var, raising=False)

    assert get_device("cpu").type == "cpu"
    # auto picks cuda, then mps, then cpu: the first one this machine has
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert get_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ChatforgeError, match="CUDA is not available"):
            get_device("cuda")
    with pytest.raises(ChatforgeError, match="unknown device"):
        get_device("tpu")
    before = torch.get_num_threads()
    try:
        assert setup_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_speedrun_takes_the_preset_named_in_its_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "gpu"\n')
    cfg = parse(["speedrun", "--config", str(f)])
    assert cfg.preset == "gpu"
    assert parse(["speedrun", "--config", str(f), "--preset", "tiny"]).preset == "tiny"


def test_pipeline_ends_with_evaluation_and_the_report():
    """The speedrun scores every checkpoint and prints the report card after all training stages; the
    tiny preset's evaluation names real tasks and leaves a base checkpoint something to run."""
    from chatforge import evaluate as E
    from chatforge.config import PIPELINE, EvalConfig

    assert PIPELINE[-2:] == ["evaluate", "report"] and PIPELINE[0] == "data"
    assert PIPELINE.index("facts") < PIPELINE.index("tokenizer") < PIPELINE.index("pretrain")  # facts go into pretraining text
    assert all(PIPELINE.index(s) < PIPELINE.index("evaluate") for s in ("pretrain", "sft", "rl", "rlhf") if s in PIPELINE)
    tiny = resolve_config(EvalConfig, stage="evaluate", preset="tiny")
    assert all(t in E.TASKS for t in tiny.tasks) and tiny.limit > 0
    base = E.resolve_tasks(tiny.tasks, chat=False)
    assert base[0].name == "bpb" and len(E.resolve_tasks(tiny.tasks, chat=True)) > len(base)
