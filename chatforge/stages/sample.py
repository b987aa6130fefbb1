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

from chatforge.common import ChatforgeError, setup_threads


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


def run(cfg, out=None) -> list[str]:
    from chatforge.engine import Engine, StreamDecoder

    out = out or sys.stdout
    if not cfg.checkpoint:
        raise ChatforgeError("give a CHECKPOINT folder, e.g. runs/tiny/pretrain/checkpoint")
    cfg.validate()  # ranges (config.SampleConfig); also checked when the config is built
    setup_threads(cfg.threads)
    engine = Engine.from_checkpoint(cfg.checkpoint, cfg.device, tools={})
    tok, ctx = engine.tok, engine.config.max_seq_len
    ids = [tok.bos_id] + tok.encode(load_prompt(cfg))
    if len(ids) >= ctx:
        raise ChatforgeError(f"the prompt is {len(ids)} tokens but the model's context is {ctx}; "
                             f"shorten the prompt")
    if ctx - len(ids) < cfg.max_tokens:
        print(f"(context is {ctx} tokens: generating at most {ctx - len(ids)})", file=sys.stderr)
    prompt_text = tok.decode(ids[1:])
    outputs = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out)
        print(prompt_text, end="", file=out, flush=True)
        dec = StreamDecoder(tok)

        def show(_: int, token: int, __: bool) -> None:
            if token != tok.bos_id:  # <|bos|>: the model began a new document, where it stops
                print(dec.push(token), end="", file=out, flush=True)

        [c] = engine.generate([ids], max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + i,
                              frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty,
                              stop_tokens=[tok.bos_id], use_tools=False, on_token=show)
        print(dec.flush(), file=out, flush=True)
        outputs.append(c.text)
    return outputs
