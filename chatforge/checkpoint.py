"""Checkpoints: one self-describing directory per model, loadable from its path alone.

    <checkpoint>/
      model.safetensors   weights, chatforge parameter names (a tied head is stored once, as wte)
      config.json         {"format": "chatforge-v1", "model": {ModelConfig fields}, ...extra metadata}
      tokenizer/          copy of the tokenizer folder (optional)
      optimizer.pt        optimizer state dict (optional, torch.save, loaded with weights_only=True)
      state.json          trainer state: step, data position, RNG states ... (optional)

Saving is atomic: everything is written into a temporary sibling folder, which then replaces the
old checkpoint by two renames (old -> `<name>.old`, new -> `<name>`) before the old one is deleted.
A crash at any point leaves either the previous or the new checkpoint complete on disk; in the
worst case (between the two renames) the previous one sits at `<name>.old`, and loading says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from chatforge.common import ChatforgeError
from chatforge.model import GPT, ModelConfig

FORMAT = "chatforge-v1"
WEIGHTS, CONFIG, TOKENIZER, OPTIMIZER, STATE = (
    "model.safetensors", "config.json", "tokenizer", "optimizer.pt", "state.json")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: wrapper prefixes stripped, a tied head stored once (as wte.weight),
    contiguous CPU tensors (safetensors needs both)."""
    inner = unwrap_model(model)
    state = dict(inner.state_dict())  # unwrap_model already removed DDP/compile wrappers
    if inner.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# Train state as JSON: tensors (torch RNG states) are stored as tagged lists of numbers.


def _encode(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return {"__tensor__": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, tokenizer_dir=None,
                    optimizer_state: dict | None = None, train_state: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring) and return its path.

    train_state must be JSON-like (dicts, lists, numbers, strings) plus tensors; tuples come back
    as lists. meta is merged into config.json (e.g. {"stage": "pretrain", "step": 1000}).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (path / CONFIG).exists() and any(path.iterdir()):
        raise ChatforgeError(f"{path} exists and is not a chatforge checkpoint; refusing to replace it. "
                             f"Choose another checkpoint path or remove that folder.")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ChatforgeError(f"tokenizer folder {tokenizer_dir} not found; pass the tokenizer stage's folder")
    meta = dict(meta or {})
    if {"format", "model"} & meta.keys():
        raise ValueError("meta may not use the reserved keys 'format' and 'model'")
    model_cfg = unwrap_model(model).config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(model_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        _fsync(tmp / WEIGHTS)
        config = {"format": FORMAT, "model": asdict(model_cfg), **meta}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
            _fsync(tmp / OPTIMIZER)
        if train_state is not None:
            (tmp / STATE).write_text(json.dumps(_encode(train_state), indent=2) + "\n")
        # The new checkpoint is complete; swap it in, keeping the old one until the swap is done.
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():  # a stale leftover: `path` is the complete copy
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------
# Load


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a chatforge checkpoint, or a ChatforgeError saying what the folder is instead."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        hint = (f" An interrupted save left the previous checkpoint at {old}; rename it to {path.name}."
                if old.exists() else "")
        raise ChatforgeError(f"checkpoint {path} not found.{hint}")
    if not path.is_dir():
        raise ChatforgeError(f"checkpoint {path} is a file; a chatforge checkpoint is a folder "
                             f"holding config.json and {WEIGHTS}")
    cfg_file = path / CONFIG
    if not cfg_file.exists():
        raise ChatforgeError(f"{path} is not a chatforge checkpoint: it has no config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
            raise ChatforgeError(
                f"{path} looks like a Hugging Face model folder (model_type={config.get('model_type')!r}); "
                f"chatforge checkpoints have config.json with format {FORMAT}. Load it with transformers.")
        raise ChatforgeError(f"{path} is not a chatforge checkpoint: config.json has no "
                             f"\"format\": \"{FORMAT}\"")
    return config


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[GPT, dict[str, Any]]:
    """Build the model from a checkpoint folder. Returns (model, info) with info keys:
    path, config (the whole config.json), model_config (ModelConfig), train_state (dict or None),
    tokenizer_dir and optimizer_path (Path or None)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(config["model"]) - known
    if unknown:
        raise ChatforgeError(f"{path}: config.json has model fields this chatforge does not know: "
                             f"{sorted(unknown)}; upgrade chatforge")
    model_config = ModelConfig(**config["model"])
    if not (path / WEIGHTS).exists():
        raise ChatforgeError(f"{path}: {WEIGHTS} is missing; the checkpoint is incomplete")
    state = load_file(path / WEIGHTS, device="cpu")
    with torch.device(device):
        model = GPT(model_config)
    expected = {k: v.shape for k, v in model_state_dict(model).items()}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    bad = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k])}"
           for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    if missing or unexpected or bad:
        detail = "; ".join(filter(None, [
            f"missing {sorted(missing)[:5]}" if missing else "",
            f"unexpected {sorted(unexpected)[:5]}" if unexpected else "",
            f"shape mismatch {sorted(bad)[:5]}" if bad else ""]))
        raise ChatforgeError(f"{path}: weights do not match config.json ({detail}); "
                             f"the files come from different models")
    model.load_state_dict(state, strict=not model_config.tie_embeddings)
    train_state = None
    if (path / STATE).exists():
        train_state = _decode(json.loads((path / STATE).read_text()))
    info = {
        "path": path,
        "config": config,
        "model_config": model_config,
        "train_state": train_state,
        "tokenizer_dir": path / TOKENIZER if (path / TOKENIZER).is_dir() else None,
        "optimizer_path": path / OPTIMIZER if (path / OPTIMIZER).exists() else None,
    }
    return model, info


def load_optimizer_state(path: str | os.PathLike, map_location="cpu") -> dict | None:
    """The optimizer state dict saved with the checkpoint, or None if it has none."""
    read_config(path)
    f = Path(path) / OPTIMIZER
    return torch.load(f, map_location=map_location, weights_only=True) if f.exists() else None
