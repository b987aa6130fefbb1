#!/usr/bin/env python
"""LoRA training step: chatforge's own LoRALinear vs `peft` injected into the same chatforge GPT.

One process, same threads, float32, no compile. Both sides wrap the same target modules of copies of one
random-weight model with the same rank, alpha and adapter values (peft's lora_A / lora_B are set to
ours), so the outputs are asserted identical (max abs diff printed) before timing. A timed step is one
forward + backward of the next-token loss on a (batch, seq_len) batch plus AdamW on the adapters;
best of --trials, sides alternating within a trial, after --warmup steps each. Run by hand, never in
the test suite, on a quiet machine:

    python bench/bench_lora.py                         # depth 4 (the tiny preset's size), rank 8
    python bench/bench_lora.py --depth 6 --rank 16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, inject_adapter_in_model

    from chatforge.lora import apply_lora, lora_modules, lora_parameters
    from chatforge.model import GPT, ModelConfig

    targets = ["c_q", "c_k", "c_v", "c_proj", "c_gate", "c_up"]  # every Linear in the blocks
    torch.manual_seed(0)
    base = GPT(ModelConfig.from_depth(args.depth, args.vocab, args.seq))
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)

    ours = copy.deepcopy(base)
    apply_lora(ours, rank=args.rank, alpha=2 * args.rank, targets=targets)
    for p in lora_parameters(ours):
        torch.nn.init.normal_(p, std=0.02)

    theirs = copy.deepcopy(base)
    for p in theirs.parameters():
        p.requires_grad_(False)
    theirs = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                                lora_dropout=0.0), theirs)
    with torch.no_grad():
        for path, m in lora_modules(ours).items():
            peft_layer = theirs.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(m.lora_A)
            peft_layer.lora_B["default"].weight.copy_(m.lora_B)
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in their_params) == sum(p.numel() for p in lora_parameters(ours))

    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-4, diff

    sides = {"chatforge LoRALinear": (ours, torch.optim.AdamW(lora_parameters(ours), lr=1e-4)),
             "peft inject_adapter_in_model": (theirs, torch.optim.AdamW(their_params, lr=1e-4))}

    def run(model, opt, n):
        t = time.perf_counter()
        for _ in range(n):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / n

    for model, opt in sides.values():
        run(model, opt, args.warmup)
    best = {k: float("inf") for k in sides}
    for _ in range(args.trials):
        for k, (model, opt) in sides.items():
            best[k] = min(best[k], run(model, opt, args.steps))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"depth {args.depth}, batch {args.batch} x {args.seq}, rank {args.rank}; outputs differ by {diff:.1e}")
    ref = best["peft inject_adapter_in_model"]
    for k, v in best.items():
        print(f"  {k:30s} {v * 1000:8.1f} ms/step   {args.batch * args.seq / v:10,.0f} tokens/s   {ref / v:.2f}x peft")


if __name__ == "__main__":
    main()
