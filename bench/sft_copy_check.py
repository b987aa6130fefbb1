#!/usr/bin/env python
"""Where an SFT model's letter counting goes wrong: does its python call copy the asked word?

Greedy replies, python tool on, to n held-out and n training letter-count problems
(`tasks.synthetic.make_problems`); reads the word out of the model's `word = '...'` line and compares it
with the asked word, by the word's length in tokens (after a space, as the prompt shows it). A diagnostic
for bench/RESULTS.md ("SFT", copying the asked word), not a speed benchmark.

    CHATFORGE_DATA_DIR=../shared/data python bench/sft_copy_check.py runs/tiny/sft/checkpoint
"""

from __future__ import annotations

import argparse
import collections
import re

import torch

from chatforge.engine import Engine
from chatforge.evaluate import _eval_tools
from chatforge.tasks.chat_checks import _generate
from chatforge.tasks.synthetic import check_answer, make_problems

WORD = re.compile(r"word = ['\"] ?(\w+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=100, help="problems per split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=5, help="miscopies to print per split")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_checkpoint(args.checkpoint, "cpu", tools=_eval_tools(10.0))
    for split in ("val", "train"):
        problems = make_problems("letter_count", args.n, split, 0)
        comps = _generate(engine, [[{"role": "user", "content": p.prompt}] for p in problems], 96, True, 16)
        right = copied = shown = 0
        by_len = collections.defaultdict(lambda: [0, 0])  # tokens of the word -> [copied, asked]
        for p, c in zip(problems, comps):
            want = WORD.match(p.code).group(1)
            m = WORD.match(c.tool_calls[0].arguments) if c.tool_calls else None
            got = m.group(1) if m else None
            n_tok = min(4, len(engine.tok.encode(" " + want)))
            by_len[n_tok][0] += got == want
            by_len[n_tok][1] += 1
            right += check_answer("letter_count", c.text, p.answer)
            copied += got == want
            if got != want and shown < args.show:
                shown += 1
                print(f"  {split}: {p.prompt!r} -> copied {got!r}")
        lens = ", ".join(f"{k}{'+' if k == 4 else ''} tok {a}/{b}" for k, (a, b) in sorted(by_len.items()))
        print(f"{split}: right {right} of {len(problems)}, word copied {copied} ({lens})")


if __name__ == "__main__":
    main()
