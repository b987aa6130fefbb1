"""Damaged checkpoint files give one error line naming the file, in every command that reads them
(sample, export, chat) and in the library loaders resume uses; never a traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from chatforge.cli import main
from chatforge.common import ChatforgeError
from engine_helpers import random_model, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    tok = train_tokenizer(512)
    tok.save(d / "tok")
    model = random_model(tok.vocab_size, max_seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8))).backward()
    opt.step()
    return save_checkpoint(d / "ckpt", model, tokenizer_dir=d / "tok", optimizer_state=opt.state_dict(),
                           train_state={"step": 3, "rng": torch.get_rng_state()})


def truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])


def edit_json(f: Path, fn) -> None:
    obj = json.loads(f.read_text())
    fn(obj)
    f.write_text(json.dumps(obj))


# (case id, file damaged, how)
DAMAGE = {
    "weights-empty": ("model.safetensors", lambda f: f.write_bytes(b"")),
    "weights-truncated": ("model.safetensors", truncate),
    "weights-garbage": ("model.safetensors", lambda f: f.write_bytes(b"\xff" * 64)),
    "config-truncated": ("config.json", truncate),
    "config-bad-field": ("config.json", lambda f: edit_json(f, lambda c: c["model"].update(n_layer="two"))),
    "config-no-model": ("config.json", lambda f: edit_json(f, lambda c: c.update(model=[1, 2]))),
    "config-huge-context": ("config.json", lambda f: edit_json(f, lambda c: c["model"].update(max_seq_len=10**15))),
    "state-truncated": ("state.json", truncate),
    "state-bad-dtype": ("state.json", lambda f: edit_json(f, lambda s: s["rng"].update(dtype="load"))),
}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, good, tmp_path) -> tuple[Path, Path]:
    name, how = DAMAGE[request.param]
    ckpt = Path(shutil.copytree(good, tmp_path / "ckpt"))
    how(ckpt / name)
    return ckpt, ckpt / name


def one_line_naming(err: str, f: Path) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and str(f) in err, err


@pytest.mark.parametrize("command", ["sample", "export", "chat"])
def test_commands_name_the_damaged_file(damaged, command, capsys, monkeypatch, tmp_path):
    ckpt, f = damaged
    argv = {"sample": ["sample", str(ckpt), "--prompt", "the", "--max_tokens", "2", "--threads", "1"],
            "export": ["export", str(ckpt), str(tmp_path / "hf")],
            "chat": ["chat", str(ckpt), "--max_tokens", "2", "--threads", "1"]}[command]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(argv) == 2
    one_line_naming(capsys.readouterr().err, f)
    assert not (tmp_path / "hf").exists()  # export wrote nothing


@pytest.mark.parametrize("case", ["weights-truncated", "state-truncated"])
def test_sample_subprocess_exits_2_with_one_line(good, tmp_path, case):
    name, how = DAMAGE[case]
    ckpt = Path(shutil.copytree(good, tmp_path / "ckpt"))
    how(ckpt / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "chatforge", "sample", str(ckpt), "--prompt", "the"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    one_line_naming(r.stderr, ckpt / name)
    assert r.stdout == ""


def test_optimizer_state_damage(good, tmp_path):
    """What `pretrain` resume calls: a cut or foreign optimizer.pt is one error naming it."""
    ckpt = Path(shutil.copytree(good, tmp_path / "ckpt"))
    assert isinstance(load_optimizer_state(ckpt), dict)
    f = ckpt / "optimizer.pt"
    truncate(f)
    with pytest.raises(ChatforgeError, match=r"optimizer\.pt: not a readable optimizer state .*--force") as e:
        load_optimizer_state(ckpt)
    assert "\n" not in str(e.value)
    f.write_bytes(b"")
    with pytest.raises(ChatforgeError, match=r"optimizer\.pt: not a readable"):
        load_optimizer_state(ckpt)
    torch.save([1, 2, 3], f)  # loads under weights_only, but is no optimizer state
    with pytest.raises(ChatforgeError, match="not an optimizer state dict"):
        load_optimizer_state(ckpt)
    # the weights and trainer state are untouched by a bad optimizer file
    assert load_checkpoint(ckpt)[1]["train_state"]["step"] == 3


def test_weights_checked_against_config_before_allocating(good, tmp_path, monkeypatch):
    """A config.json that disagrees with the weights' header is refused before a real model is built
    (only a meta-device skeleton, which holds no memory), so a hostile size cannot exhaust memory."""
    import chatforge.checkpoint as C

    ckpt = Path(shutil.copytree(good, tmp_path / "ckpt"))
    edit_json(ckpt / "config.json", lambda c: c["model"].update(vocab_size=1000))
    real, built = C.GPT, []

    def spy(cfg):
        built.append(str(torch.get_default_device()))
        return real(cfg)

    monkeypatch.setattr(C, "GPT", spy)
    with pytest.raises(ChatforgeError, match=r"weights do not match config.json .*wte.weight"):
        load_checkpoint(ckpt)
    assert built == ["meta"]


def test_stage_hints_name_real_commands(tmp_path):
    """`require_stage`'s "run `chatforge ...` first" must be a command the CLI accepts (it said
    `chatforge data --run NAME`, which is not one: the data stage is `chatforge data process`)."""
    import re

    from chatforge.cli import build_parser
    from chatforge.common import require_stage
    from chatforge.config import PIPELINE, TokenizerConfig

    cfg = TokenizerConfig(run="r1", runs_dir=str(tmp_path))
    for stage in PIPELINE:
        with pytest.raises(ChatforgeError) as e:
            require_stage(cfg, stage)
        [cmd] = re.findall(r"run `chatforge ([^`]+)` first", str(e.value))
        args = build_parser().parse_args(cmd.split())  # exits (SystemExit) on a command that does not exist
        assert args.run == "r1", cmd
    # what a user sees: the tokenizer stage asked for `stage:data` before the data stage ran
    from chatforge.corpus import expand_corpus

    with pytest.raises(ChatforgeError, match=r"chatforge data process --run r1"):
        expand_corpus(["stage:data"], run=cfg)
