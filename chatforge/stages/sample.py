"""`chatforge sample CHECKPOINT --prompt ...`: stream a completion from a checkpoint.

A base model (the output of `pretrain`) is a document completer: it continues whatever text it is
given as if it were the start of a web page, a book or a worked example, and it does not follow
instructions. Prompt it with the beginning of a document, or with a few question/answer pairs in a
file (`--prompt_file`) ending where the model should continue. Generation stops at max_tokens or when
the model starts a new document (<|bos|>).

    chatforge sample runs/tiny/pretrain/checkpoint --prompt "The capital of France is"
    chatforge sample runs/tiny/pretrain/checkpoint --prompt_file fewshot.txt --temperature 0
"""

from __future__ import annotations

import sys
from pathlib import Path

from chatforge.common import ChatforgeError, get_device, setup_threads


def load_prompt(cfg) -> str:
    text = ""
    if cfg.prompt_file:
        p = Path(cfg.prompt_file).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ChatforgeError(f"--prompt_file {p}: file not found") from None
        except UnicodeDecodeError:
            raise ChatforgeError(f"--prompt_file {p}: not UTF-8 text") from None
    return text + cfg.prompt


def stream_decode(tok, ids: list[int], printed: str) -> str:
    """The text of `ids` minus what was already printed; holds back a trailing partial UTF-8
    character (decoded as U+FFFD) until the token completing it arrives."""
    text = tok.decode(ids)
    if text.endswith("\ufffd"):
        return ""
    return text[len(printed):]


def run(cfg, out=None) -> list[str]:
    import torch

    from chatforge.checkpoint import load_checkpoint
    from chatforge.tokenizer import Tokenizer

    out = out or sys.stdout
    if not cfg.checkpoint:
        raise ChatforgeError("give a CHECKPOINT folder, e.g. runs/tiny/pretrain/checkpoint")
    for name, lo, hi in (("temperature", 0, 100), ("top_p", 0, 1)):
        v = getattr(cfg, name)
        if not lo <= v <= hi or (name == "top_p" and v == 0):
            raise ChatforgeError(f"--{name} {v}: must be in {'(0, 1]' if name == 'top_p' else '[0, 100]'}")
    if cfg.max_tokens < 1 or cfg.num_samples < 1 or cfg.top_k < 0:
        raise ChatforgeError("--max_tokens and --num_samples must be at least 1, --top_k at least 0")
    setup_threads(cfg.threads)
    device = get_device(cfg.device)
    model, info = load_checkpoint(cfg.checkpoint, device)
    model.eval()
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"checkpoint {cfg.checkpoint} has no tokenizer/ folder; cannot encode a prompt")
    tok = Tokenizer.load(info["tokenizer_dir"])
    mc = info["model_config"]
    if tok.vocab_size != mc.vocab_size:
        raise ChatforgeError(f"checkpoint {cfg.checkpoint}: its tokenizer has {tok.vocab_size} tokens but the "
                             f"model's vocabulary is {mc.vocab_size}; the folder mixes two models")
    ids = [tok.bos_id] + tok.encode(load_prompt(cfg))
    if len(ids) >= mc.max_seq_len:
        raise ChatforgeError(f"the prompt is {len(ids)} tokens but the model's context is {mc.max_seq_len}; "
                             f"shorten the prompt")
    max_new = min(cfg.max_tokens, mc.max_seq_len - len(ids))
    if max_new < cfg.max_tokens:
        print(f"(context is {mc.max_seq_len} tokens: generating at most {max_new})", file=sys.stderr)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    prompt_text = tok.decode(ids[1:])
    outputs = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out)
        print(prompt_text, end="", file=out, flush=True)
        new: list[int] = []
        printed = ""
        gen = model.generate(ids, max_new, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p, seed=cfg.seed + i)
        if amp is not None:
            amp.__enter__()
        try:
            for t in gen:
                t = int(t[0])
                if t == tok.bos_id:  # the model began a new document
                    break
                new.append(t)
                piece = stream_decode(tok, new, printed)
                if piece:
                    printed += piece
                    print(piece, end="", file=out, flush=True)
        finally:
            if amp is not None:
                amp.__exit__(None, None, None)
        tail = tok.decode(new)[len(printed):]
        print(tail, file=out, flush=True)
        outputs.append(tok.decode(new))
    return outputs
