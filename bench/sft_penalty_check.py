#!/usr/bin/env python
"""The SFT stage's chat checks under OpenAI's frequency penalty: well-formed replies, letter counting
and arithmetic with python, for each checkpoint and penalty. A diagnostic for bench/RESULTS.md ("The
laptop preset", second run), not a speed benchmark.

The checks are the stage's own (`chat_checks.well_formed_rate` on the tiny preset's 50 held-out prompts,
`chat_checks.tool_task_rates` on 50 held-out problems each): greedy, python tool on, replies cut at the
stage's lengths; only the penalty changes.

    CHATFORGE_DATA_DIR=../shared/data python bench/sft_penalty_check.py runs/tiny/sft/checkpoint runs/laptop/sft/checkpoint
"""

from __future__ import annotations

import argparse
import functools

import torch

from chatforge.config import STAGE_CONFIGS, resolve_config
from chatforge.engine import Engine
from chatforge.evaluate import _eval_tools
from chatforge.finetune import held_out_prompts
from chatforge.tasks import chat_checks as K


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--penalties", default="0,0.5,1", help="frequency_penalty values, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve_config(STAGE_CONFIGS["sft"], stage="sft", preset="tiny")
    prompts = held_out_prompts(cfg, cfg.check_n)
    print("| checkpoint | frequency_penalty | well-formed | letter count right | arithmetic right |")
    print("|---|---:|---:|---:|---:|")
    for ck in args.checkpoints:
        engine = Engine.from_checkpoint(ck, "cpu", tools=_eval_tools(10.0))
        plain = engine.generate
        for fp in (float(x) for x in args.penalties.split(",")):
            engine.generate = functools.partial(plain, frequency_penalty=fp)  # the checks call generate
            wf = K.well_formed_rate(engine, prompts)["well_formed_rate"]
            letters = K.tool_task_rates(engine, "letter_count", cfg.check_n)["correct_rate"]
            arith = K.tool_task_rates(engine, "arithmetic", cfg.check_n)["correct_rate"]
            print(f"| {ck} | {fp:g} | {wf:.0%} | {letters:.0%} | {arith:.0%} |", flush=True)


if __name__ == "__main__":
    main()
