"""`chatforge sft`: supervised fine-tuning of a base checkpoint into a chat model.

    chatforge sft --preset tiny                          # full fine-tuning of runs/tiny/pretrain/checkpoint
    chatforge sft --preset tiny --lora_rank 8 --replay 0.25 --run tiny_lora
    chatforge sft --preset tiny --forgetting_grid true   # + {full, LoRA} x {replay on, off}

Wiring only: the conversation sources and the mixture (chatforge/tasks/*), knowledge probing against
hallucination (tasks/probing.py: the source model is sampled on the facts stage's questions; answers
where it is right, refusals where it is not), LoRA (lora.py), the assistant-only loss and LoRA
checkpoints (finetune.py, losses.py), the one training loop (train_loop.py), the checks after training
(tasks/chat_checks.py, tasks/probing.py, evaluate.run_bpb).

Outputs in runs/<run>/sft/:

    checkpoint/       the chat model (merged weights for LoRA, plus lora_adapters.safetensors), optimizer,
                      state (step, data position, RNG): `chatforge chat runs/<run>/sft/checkpoint`
    adapter/          LoRA runs: the adapters in PEFT format (loads onto the HF export)
    probe/            probe_results.jsonl, probe_counts.json (the probing that made the refusal data)
    metrics.jsonl     per-step loss, eval (val_loss), samples, and events: mixture (per-source counts:
                      read, skipped by reason, too long, tokens), probe, checks
    loss.png          training loss and validation loss
    summary.json      every measurement (also in DONE)
    forgetting.json/.md   the 2x2 table, with --forgetting_grid
"""

from __future__ import annotations

import contextlib
import copy
import shutil

from chatforge.common import ChatforgeError, amp_dtype as resolve_amp, is_complete, log0, read_done, \
    source_checkpoint, stage_dir, stage_run, write_json
from chatforge.config import ConfigError, SftConfig
from chatforge.distributed import training_process

SAMPLE_PROMPTS = ["Who are you?", "How many r's are in the word strawberry?"]


def run(cfg: SftConfig) -> dict:
    check_config(cfg)
    with training_process(cfg.threads, cfg.device) as (d, device):
        return _run(cfg, d, device)


def check_config(cfg: SftConfig) -> None:
    """Range checks before anything is loaded: one ConfigError naming the flag."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be {what}")
    need(cfg.overflow in ("drop", "truncate"), "overflow", "drop or truncate")
    need(cfg.max_seq_len >= 0, "max_seq_len", "0 (the checkpoint's) or a context length")
    for w in ("oasst", "self_instruct", "glaive", "bfcl", "gsm8k_tools"):
        need(getattr(cfg, w) >= 0, w, "a weight >= 0")
    for n in ("synthetic", "identity", "search", "val_conversations", "num_steps", "lora_rank", "check_n",
              "grid_steps"):
        need(getattr(cfg, n) >= 0, n, "at least 0")
    need(0 <= cfg.replay < 1, "replay", "a share of rows in [0, 1)")
    need(cfg.device_batch_size >= 1, "device_batch_size", "at least 1")
    need(cfg.grad_accum >= 1, "grad_accum", "at least 1")
    need(cfg.num_epochs > 0, "num_epochs", "positive")
    need(0 < cfg.lr_frac <= 10, "lr_frac", "in (0, 10]")
    need(0 <= cfg.warmdown_ratio <= 1, "warmdown_ratio", "in [0, 1]")
    need(cfg.probe_k >= 1, "probe_k", "at least 1")
    need(cfg.probe_temperature >= 0, "probe_temperature", "at least 0 (0 = greedy)")
    need(cfg.probe_weight >= 0, "probe_weight", "at least 0")
    need(0 < cfg.probe_threshold <= 1, "probe_threshold", "in (0, 1]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16")
    if cfg.replay > 0 and round(cfg.replay * cfg.device_batch_size) in (0, cfg.device_batch_size):
        raise ConfigError(f"--replay {cfg.replay} with --device_batch_size {cfg.device_batch_size} leaves no "
                          f"{'replay' if cfg.replay < 0.5 else 'SFT'} row; raise the batch size or change the share")


def _run(cfg: SftConfig, d, device) -> dict:
    from chatforge.checkpoint import load_checkpoint
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, "sft")
    if is_complete(out) and not cfg.force:
        log0(f"sft: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return read_done(out)
    src = source_checkpoint(cfg, cfg.source)
    base, info = load_checkpoint(src, "cpu")
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"{src} has no tokenizer/ folder; SFT needs the checkpoint's own tokenizer")
    tok = Tokenizer.load(info["tokenizer_dir"])
    seq_len = cfg.max_seq_len or base.config.max_seq_len
    ckpt = out / "checkpoint"
    if cfg.force and d.master:
        shutil.rmtree(ckpt, ignore_errors=True)
        for f in ("metrics.jsonl", "summary.json", "forgetting.json", "forgetting.md"):
            (out / f).unlink(missing_ok=True)
    resume = cfg.resume and not cfg.force and (ckpt / "state.json").exists()
    with (stage_run(cfg, "sft") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        return _stage(cfg, d, device, out, src, base, info, tok, seq_len, resume, log, srun)


def _stage(cfg, d, device, out, src, base, info, tok, seq_len, resume, log, srun) -> dict:
    from chatforge.finetune import build_data, cell_name, describe_mixture, grid_cells, measure_base, measure_chat, \
        pretraining_bpb, probe_source, train_cell, write_forgetting
    from chatforge.tasks.mixture import mixture_metrics

    # 1. Data: the mixture (probing the source model first), held-out conversations.
    amp_dtype = resolve_amp(cfg.dtype, device)
    base_dev = copy.deepcopy(base).to(device).eval()
    probe_out = probe_source(cfg, base_dev, tok, device, out) if cfg.probe else None
    rows, val_rows, counts = build_data(cfg, tok, seq_len, probe_out)
    log(event="mixture", rows=len(rows), val_rows=len(val_rows), seq_len=seq_len, sources=mixture_metrics(counts))
    log0(describe_mixture(counts, len(rows), len(val_rows), seq_len))
    if probe_out:
        log(event="probe", **probe_out["counts"])

    # 2. Before: what the source model knows (controlled probe, as a base model) and its bpb.
    before = {}
    if cfg.checks and d.master:
        before = measure_base(cfg, base_dev, tok, device, seq_len, amp_dtype)
        log(event="before", **before)
    del base_dev

    # 3. Train the main cell.
    lora, replay = cfg.lora_rank > 0, cfg.replay
    model, state, cell = train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows,
                                    lora=lora, replay=replay, num_steps=cfg.num_steps, resume=resume, log=log,
                                    checkpoint=True, amp_dtype=amp_dtype, sample_prompts=SAMPLE_PROMPTS)
    summary = {"source": str(src), "seq_len": seq_len, "mixture": mixture_metrics(counts), "rows": len(rows),
               "val_rows": len(val_rows), **cell, "checkpoint": str(out / "checkpoint")}
    if probe_out:
        summary["probe"] = probe_out["counts"]

    # 4. After: the checks, the forgetting grid.
    if cfg.checks and d.master:
        after = measure_chat(cfg, model, tok, device, seq_len, amp_dtype)
        log(event="checks", **after)
        summary["before"], summary["after"] = before, after
        if "bpb" in before and "bpb" in after:
            cell["bpb_before"], cell["bpb_after"] = before["bpb"], after["bpb"]
    if cfg.forgetting_grid:
        grid = [cell]
        for g_lora, g_replay in grid_cells(lora, replay):
            log0(f"\nsft: forgetting grid cell {cell_name(g_lora, g_replay)}")
            g_model, _, g_cell = train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows,
                                            lora=g_lora, replay=g_replay, num_steps=cfg.grid_steps or cell["steps"],
                                            resume=False, log=None, checkpoint=False, amp_dtype=amp_dtype)
            if d.master:
                g_cell["bpb_before"] = before.get("bpb")
                g_cell["bpb_after"] = pretraining_bpb(cfg, g_model, tok, seq_len, amp_dtype).get("bpb")
            grid.append(g_cell)
            del g_model
        if d.master:
            summary["forgetting"] = write_forgetting(out, grid)
    if d.master:
        write_json(out / "summary.json", summary)
        srun.close()
        try:
            from chatforge.plots import plot_metrics

            summary["plot"] = str(plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "eval/val_loss"],
                                               title=f"SFT ({cell['name']})"))
        except ImportError:
            log0("matplotlib is not installed: no loss.png (pip install matplotlib)")
        srun.finish(summary)
        log0(report_lines(summary))
    return summary


def report_lines(s: dict) -> str:
    """The summary for the terminal."""
    lines = [f"sft done: {s['steps']} steps, val loss {s.get('val_loss') or float('nan'):.4f}, trainable "
             f"{s['trainable_params']:,} of {s['total_params']:,} params ({s['trainable_fraction']:.2%}); "
             f"checkpoint {s['checkpoint']}"]
    a, b = s.get("after"), s.get("before")
    if a:
        greedy = a.get("well_formed_greedy", {}).get("well_formed_rate", float("nan"))
        lines.append(f"  well-formed {a['well_formed']['well_formed_rate']:.0%} (greedy {greedy:.0%}); "
                     f"identity name+maker {a['identity']['name_and_maker_rate']:.0%}; letter count call/correct "
                     f"{a['letter_count']['python_call_rate']:.0%}/{a['letter_count']['correct_rate']:.0%}; arithmetic "
                     f"{a['arithmetic']['python_call_rate']:.0%}/{a['arithmetic']['correct_rate']:.0%}")
        if "probe" in a:
            p0 = (b or {}).get("probe", {})
            lines.append(f"  probe known correct {p0.get('known_correct_rate', float('nan')):.0%} -> "
                         f"{a['probe']['known_correct_rate']:.0%} (people not in the probing data "
                         f"{a['probe'].get('known_heldout_correct_rate', float('nan')):.0%}); unknown refused "
                         f"{p0.get('unknown_refusal_rate', float('nan')):.0%} -> {a['probe']['unknown_refusal_rate']:.0%}")
        if "bpb" in a and b and "bpb" in b:
            lines.append(f"  pretraining val bpb {b['bpb']:.4f} -> {a['bpb']:.4f}")
    return "\n".join(lines)

