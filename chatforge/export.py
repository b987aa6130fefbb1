"""Export a chatforge checkpoint as a Hugging Face `transformers` Qwen3 folder.

chatforge's GPT is Qwen3 layer for layer (see chatforge/model.py), so export is a rename of
tensors plus a config.json; nothing is converted numerically. The result loads with
`AutoModelForCausalLM.from_pretrained(out_dir)` and serves with vLLM or llama.cpp's converter.

    out_dir/                  (files 0644, folder 0755 whatever the umask: servers often run as another user)
      config.json             Qwen3Config fields (written directly; transformers is not needed), plus
                              "chatforge_export": the source's stage and step, marking the folder as an export
      generation_config.json  bos/eos ids, when the checkpoint carries a tokenizer
      model.safetensors       weights under Hugging Face names
      tokenizer.json, tokenizer_config.json   via the tokenizer's own HF export, when present
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from chatforge.checkpoint import load_checkpoint, model_state_dict
from chatforge.common import ChatforgeError, write_json

log = logging.getLogger(__name__)

# chatforge name <-> Hugging Face Qwen3 name; "{i}" is the layer index. The one table for both ways.
NAME_TABLE = [
    ("wte.weight", "model.embed_tokens.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.mlp.c_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.mlp.c_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rename(name: str, to_hf: bool) -> str:
    """Map one parameter name through NAME_TABLE.

    >>> _rename("blocks.3.mlp.c_up.weight", to_hf=True)
    'model.layers.3.mlp.up_proj.weight'
    >>> _rename("model.layers.3.mlp.up_proj.weight", to_hf=False)
    'blocks.3.mlp.c_up.weight'
    """
    for ours, hf in NAME_TABLE:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        m = re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)"), name)
        if m:
            return dst.replace("{i}", m.group(1)) if m.groups() else dst
    raise KeyError(f"no Hugging Face name mapping for parameter {name!r}")


def to_hf_name(name: str) -> str:
    return _rename(name, to_hf=True)


def from_hf_name(name: str) -> str:
    return _rename(name, to_hf=False)


def hf_config(model_config, bos_id: int | None = None, eos_id: int | list[int] | None = None,
              dtype: str = "float32") -> dict:
    """config.json for Qwen3ForCausalLM. RoPE theta is written both the transformers 5 way
    (rope_parameters) and the 4.x / llama.cpp way (rope_theta); likewise dtype / torch_dtype."""
    c = model_config
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")
MARKER = "chatforge_export"  # config.json key (source stage and step; no paths): marks a folder we may replace


def _check_target(out_dir: Path) -> None:
    """Refuse to write over anything but an earlier export: a file, the checkpoint itself, a user's
    Hugging Face model folder, or any folder with other content."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ChatforgeError(f"export target {out_dir} is a file; give the path of a new folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    names = {p.name for p in out_dir.iterdir()}
    try:
        ours = MARKER in json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours or not names <= set(EXPORT_FILES):
        raise ChatforgeError(f"export target {out_dir} exists and is not an earlier chatforge export; refusing to "
                             f"replace it. Give a new folder, or remove that one first")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Make every file world-readable (0644, folder 0755) whatever the umask, so a server running
    under another user can read the export; then swap tmp in for out_dir (the previous export is
    kept until the new one is in place, as save_checkpoint does)."""
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)  # mkdtemp made it 0700
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    # a fresh hidden name for the previous export (never a name a user's folder may have, like "<out>.old")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old)  # a folder may replace an empty folder (POSIX rename)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a transformers folder for a chatforge checkpoint; returns out_dir.
    dtype: "float32" (exact) or "bfloat16" / "float16" (half the size, for serving).

    The folder is written next to out_dir and renamed into place when complete, so a crash leaves no
    half export; an existing out_dir is replaced only if it is an earlier chatforge export."""
    from safetensors.torch import save_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ChatforgeError(f"export dtype {dtype!r}: choose float32, bfloat16 or float16")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _check_target(out_dir)
    model, info = load_checkpoint(checkpoint_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise ChatforgeError(f"export target {out_dir}: cannot create it ({e.strerror or e})") from None
    try:
        # A tied head is stored once, as the embedding: transformers re-ties it from tie_word_embeddings.
        weights = {to_hf_name(k): v.to(getattr(torch, dtype)).contiguous()
                   for k, v in model_state_dict(model).items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})

        bos_id = eos_id = None
        if info["tokenizer_dir"] is not None:
            try:
                from chatforge.tokenizer import Tokenizer
            except ImportError:
                log.warning("chatforge.tokenizer is not available; the tokenizer was not exported")
            else:
                tok = Tokenizer.load(info["tokenizer_dir"])
                tok.export_hf(tmp)
                bos_id = tok.bos_id
                # Generation stops at the end of an assistant turn (a chat model) or where the next
                # document would begin (a base model, which separates documents with BOS).
                ends = [tok.special_tokens.get("<|assistant_end|>"), bos_id]
                eos_id = [i for i in dict.fromkeys(ends) if i is not None]
                write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
        config = hf_config(info["model_config"], bos_id, eos_id, dtype)
        config[MARKER] = {k: info["config"].get(k) for k in ("stage", "step")}
        write_json(tmp / "config.json", config)
        _publish(tmp, out_dir)
    except OSError as e:
        raise ChatforgeError(f"export to {out_dir} failed: {e.strerror or e}"
                             f"{' (' + e.filename + ')' if getattr(e, 'filename', None) else ''}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir
