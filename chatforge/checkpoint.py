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
            dtype = getattr(torch, str(obj.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):  # a name like "load" must not reach anything but a dtype
                raise ValueError(f"unknown tensor dtype {obj.get('dtype')!r}")
            return torch.tensor(obj["__tensor__"], dtype=dtype)
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
                    meta: dict | None = None, extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring) and return its path.

    extra_tensors: {file name: tensors} written as more safetensors files inside the same atomic
    swap (e.g. a LoRA run's adapters next to its merged weights, so a resume is exact).

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
        for name, tensors in (extra_tensors or {}).items():
            if name in (WEIGHTS, CONFIG, OPTIMIZER, STATE, TOKENIZER) or "/" in name or not name.endswith(".safetensors"):
                raise ValueError(f"extra tensor file {name!r}: use a plain '<name>.safetensors' not already in use")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / name,
                      metadata={"format": "pt"})
            _fsync(tmp / name)
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
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(cfg_file, "not valid JSON", e, "the file is damaged: copy the checkpoint again or use an "
                                                      "earlier one") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
            raise ChatforgeError(
                f"{path} looks like a Hugging Face model folder (model_type={config.get('model_type')!r}); "
                f"chatforge checkpoints have config.json with format {FORMAT}. Load it with transformers.")
        raise ChatforgeError(f"{path} is not a chatforge checkpoint: config.json has no "
                             f"\"format\": \"{FORMAT}\"")
    return config


def _model_config(path: Path, config: dict) -> ModelConfig:
    """The ModelConfig in config.json, or a ChatforgeError naming the file and the bad field."""
    cfg_file = path / CONFIG
    fields_ = config.get("model")
    if not isinstance(fields_, dict):
        raise ChatforgeError(f"{cfg_file}: no \"model\" object; the file is damaged. Copy the checkpoint again "
                             f"or use an earlier one")
    known = {f.name: f for f in fields(ModelConfig)}
    unknown = set(fields_) - known.keys()
    if unknown:
        raise ChatforgeError(f"{path}: config.json has model fields this chatforge does not know: "
                             f"{sorted(unknown)}; upgrade chatforge")
    for name, value in fields_.items():
        want = type(getattr(ModelConfig, name))  # every field has a default of its type: int, float or bool
        if want is bool:
            ok = isinstance(value, bool)
        elif isinstance(value, bool) or not isinstance(value, (int, float) if want is float else int):
            ok = False
        elif want is int:  # head_dim and intermediate_size may be 0 (= derived)
            ok = value >= (0 if name in ("head_dim", "intermediate_size") else 1)
        else:
            ok = value > 0  # rope_theta, norm_eps; also false for NaN
        if not ok:
            raise ChatforgeError(f"{cfg_file}: model field {name} = {value!r} is not a valid {want.__name__}; "
                                 f"the file is damaged. Copy the checkpoint again or use an earlier one")
    try:
        return ModelConfig(**fields_)
    except (TypeError, ValueError) as e:
        raise ChatforgeError(f"{cfg_file}: {e}; the file is damaged. Copy the checkpoint again or use an "
                             f"earlier one") from None


def _expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a checkpoint of this config stores, from a model built on the meta device
    (no memory), so a damaged or hostile config.json is caught before anything is allocated."""
    with torch.device("meta"):
        skeleton = GPT(model_config)
    state = skeleton.state_dict()
    if model_config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in state.items()}


def _damaged(f: Path, what: str, e: BaseException, fix: str) -> ChatforgeError:
    # one line: the library's message can span lines (torch's unpickler explains itself at length)
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    return ChatforgeError(f"{f}: {what} ({detail}); {fix}")


WEIGHTS_FIX = "the file is damaged (an interrupted copy or a full disk?): copy the checkpoint again or use an earlier one"


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[GPT, dict[str, Any]]:
    """Build the model from a checkpoint folder. Returns (model, info) with info keys:
    path, config (the whole config.json), model_config (ModelConfig), train_state (dict or None),
    tokenizer_dir and optimizer_path (Path or None).

    Every damaged file (config.json, model.safetensors, state.json) is a ChatforgeError naming it;
    the weights' shapes are checked against config.json from the safetensors header before any
    tensor is read or the model is allocated."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    model_config = _model_config(path, config)
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise ChatforgeError(f"{path}: {WEIGHTS} is missing; the checkpoint is incomplete")
    try:  # safetensors raises its own SafetensorError (and OSError) for an empty or cut file
        with safe_open(wfile, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise _damaged(wfile, "not a readable safetensors file", e, WEIGHTS_FIX) from None
    expected = _expected_shapes(model_config)
    missing, unexpected = expected.keys() - stored.keys(), stored.keys() - expected.keys()
    bad = [f"{k}: file {stored[k]} vs config {expected[k]}"
           for k in expected.keys() & stored.keys() if stored[k] != expected[k]]
    if missing or unexpected or bad:
        detail = "; ".join(filter(None, [
            f"missing {sorted(missing)[:5]}" if missing else "",
            f"unexpected {sorted(unexpected)[:5]}" if unexpected else "",
            f"shape mismatch {sorted(bad)[:5]}" if bad else ""]))
        raise ChatforgeError(f"{path}: weights do not match config.json ({detail}); "
                             f"the files come from different models")
    try:
        state = load_file(wfile, device="cpu")
    except Exception as e:  # a header that lies about the data behind it
        raise _damaged(wfile, "not a readable safetensors file", e, WEIGHTS_FIX) from None
    train_state = None
    if (path / STATE).exists():
        try:
            train_state = _decode(json.loads((path / STATE).read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:  # JSONDecodeError is a ValueError
            raise _damaged(path / STATE, "not a valid trainer state", e,
                           "the file is damaged: use an earlier checkpoint, or pass --force to start training "
                           "over") from None
    try:
        with torch.device(device):
            model = GPT(model_config)
    except (RuntimeError, MemoryError) as e:  # e.g. a context length whose RoPE tables do not fit
        raise _damaged(path / CONFIG, "the model it describes cannot be built here", e,
                       "check max_seq_len and the sizes in it") from None
    model.load_state_dict(state, strict=not model_config.tie_embeddings)
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
    """The optimizer state dict saved with the checkpoint, or None if it has none; a damaged file is
    a ChatforgeError naming it."""
    read_config(path)
    f = Path(path) / OPTIMIZER
    if not f.exists():
        return None
    try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # a cut zip archive (RuntimeError), EOFError, UnpicklingError ...
        raise _damaged(f, "not a readable optimizer state", e,
                       "the file is damaged: use an earlier checkpoint, or pass --force to start training over"
                       ) from None
    if not isinstance(state, dict):
        raise ChatforgeError(f"{f}: holds a {type(state).__name__}, not an optimizer state dict; pass --force "
                             f"to start training over")
    return state
