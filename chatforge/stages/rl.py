"""`chatforge rl`: reinforcement learning on verifiable rewards (GRPO) from the SFT checkpoint.

    chatforge rl --preset tiny                           # generated arithmetic, python tool on, from runs/tiny/sft
    chatforge rl --run gpu --task gsm8k --max_tokens 384
    chatforge rl --task_file problems.jsonl --task gsm8k # your {question, answer} records, GSM8K's verifier

Wiring only: the tasks and verifiers (tasks/rl.py), the rollouts and the GRPO loss (grpo.py, over
losses.py and rollout.py), the one training loop (train_loop.py).

Outputs in runs/<run>/rl/:

    checkpoint/     the policy (`chatforge chat runs/<run>/rl/checkpoint`), optimizer, state (step, the
                    rollout position, RNG): a rerun resumes exactly
    metrics.jsonl   per step: reward, correct, response_length, entropy, clip_fraction, kl, ...; eval events
                    (held-out pass@1 with its 95% interval, pass@k)
    reward.png      training reward and held-out pass@1
    summary.json    before / after on the held-out items and on GSM8K, reward reasons (also in DONE)
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil

from chatforge.common import ChatforgeError, amp_dtype as resolve_amp, is_complete, log0, read_done, \
    source_checkpoint, stage_dir, stage_run, write_json
from chatforge.config import ConfigError, RlConfig
from chatforge.distributed import training_process


def run(cfg: RlConfig) -> dict:
    check_config(cfg)
    with training_process(cfg.threads, cfg.device) as (d, device):
        return _run(cfg, d, device)


def check_config(cfg: RlConfig) -> None:
    """Range checks before anything is loaded: one ConfigError naming the flag."""
    from chatforge.losses import LOSS_TYPES

    def need(ok, name, what):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be {what}")
    for n in ("prompts_per_step", "group_size", "max_tokens", "device_batch_size", "epochs", "eval_items"):
        need(getattr(cfg, n) >= 1, n, "at least 1")
    for n in ("num_steps", "train_items", "eval_k", "gsm8k_items", "max_tool_calls", "kl_coef", "format_weight",
              "eval_every", "checkpoint_every", "top_k"):
        need(getattr(cfg, n) >= 0, n, "at least 0")
    need(cfg.group_size >= 2, "group_size", "at least 2 (advantages compare replies within a group)")
    need(cfg.loss_type in LOSS_TYPES, "loss_type", " | ".join(LOSS_TYPES))
    need(cfg.epochs == 1 or cfg.loss_type == "grpo_clip", "epochs", "1 unless --loss_type grpo_clip (reusing a "
                                                                    "rollout needs the clipped ratio)")
    need(0 < cfg.cliprange < 1, "cliprange", "in (0, 1)")
    need(cfg.temperature > 0, "temperature", "positive (rollouts are sampled)")
    need(0 < cfg.lr_frac <= 10, "lr_frac", "in (0, 10]")
    need(0 <= cfg.warmdown_ratio <= 1, "warmdown_ratio", "in [0, 1]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16")


def load_items(cfg: RlConfig, task, seed: int):
    """(train items, held-out items) of the task, or of --task_file with a seeded 20% held out."""
    from chatforge.tasks.rl import load_task_file

    if cfg.task_file:
        items, _ = load_task_file(cfg.task_file)
        items = sorted(items, key=lambda it: random.Random(f"{seed}|{it.id}").random())
        n_val = max(1, len(items) // 5)
        train, val = items[n_val:], items[:n_val]
    else:
        train = task.items("train", cfg.data_dir, cfg.train_items or 2000, seed)
        val = task.items("val", cfg.data_dir, cfg.eval_items, seed + 1)
    if cfg.train_items:
        train = train[:cfg.train_items]
    val = val[:cfg.eval_items]
    if not train or not val:
        raise ChatforgeError(f"task {cfg.task_file or cfg.task}: {len(train)} training and {len(val)} held-out "
                             f"items; RL needs both")
    return train, val


def _run(cfg: RlConfig, d, device) -> dict:
    from chatforge.checkpoint import load_checkpoint
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, "rl")
    if is_complete(out) and not cfg.force:
        log0(f"rl: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return read_done(out)
    src = source_checkpoint(cfg, cfg.source)
    ckpt = out / "checkpoint"
    if cfg.force and d.master:
        shutil.rmtree(ckpt, ignore_errors=True)
        for f in ("metrics.jsonl", "summary.json", "before.json"):
            (out / f).unlink(missing_ok=True)
    resume = cfg.resume and not cfg.force and (ckpt / "state.json").exists()
    model, info = load_checkpoint(ckpt if resume else src, "cpu")
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"{src} has no tokenizer/ folder; RL needs the checkpoint's own tokenizer")
    tok = Tokenizer.load(info["tokenizer_dir"])
    if "<|assistant_start|>" not in (tok.special_tokens or {}):
        raise ChatforgeError(f"{src}: the tokenizer has no chat tokens; RL starts from a chat (SFT) checkpoint")
    with (stage_run(cfg, "rl") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        return _stage(cfg, d, device, out, src, model, info, tok, resume, log, srun)


def _stage(cfg, d, device, out, src, model, info, tok, resume, log, srun) -> dict:
    from chatforge.checkpoint import load_checkpoint
    from chatforge.engine import Engine
    from chatforge.evaluate import _eval_tools
    from chatforge.finetune import sft_optimizer
    from chatforge.grpo import GrpoSettings, RolloutSource, evaluate_task, grpo_loss
    from chatforge.optim import lr_multiplier
    from chatforge.rng import seed_everything
    from chatforge.tasks.rl import get_task
    from chatforge.train_loop import Checkpointer, LoopConfig, Trainer, prepare_model

    seed_everything(cfg.seed)
    task = get_task(cfg.task, cfg.format_weight)
    train_items, val_items = load_items(cfg, task, cfg.seed)
    gsm = get_task("gsm8k") if cfg.gsm8k_items else None
    gsm_items = gsm.items("val", cfg.data_dir)[:cfg.gsm8k_items] if gsm else []
    amp_dtype = resolve_amp(cfg.dtype, device)
    model = model.to(device)
    tools = _eval_tools(cfg.tool_timeout) if cfg.use_tools else {}
    engine = Engine(model, tok, tools=tools, device=device)  # samples with the trained weights themselves
    ev = dict(max_tokens=cfg.max_tokens, temperature=cfg.temperature, use_tools=cfg.use_tools,
              max_tool_calls=cfg.max_tool_calls, seed=cfg.seed)
    log0(f"rl: task {cfg.task_file or cfg.task}, {len(train_items):,} training items, {len(val_items):,} held out; "
         f"{cfg.prompts_per_step} prompts x {cfg.group_size} replies per step, {cfg.num_steps} rollouts, "
         f"from {src}")

    # 1. Before: the source model on the held-out items (and GSM8K).
    summary = {"source": str(src), "task": cfg.task_file or cfg.task, "train_items": len(train_items),
               "eval_items": len(val_items)}
    if d.master and not resume:
        summary["before"] = evaluate_task(engine, tok, task, val_items, k=cfg.eval_k, **ev)
        if gsm_items:
            summary["before_gsm8k"] = evaluate_task(engine, tok, gsm, gsm_items, **dict(ev, max_tokens=cfg.gsm8k_max_tokens))
        log(event="before", **_flat(summary))
        # the source's score as the held-out curve's step 0 (reward.png starts from where RL started)
        log(event="eval", step=0, **{k: v for k, v in summary["before"].items() if isinstance(v, (int, float))})
        write_json(out / "before.json", {k: summary[k] for k in ("before", "before_gsm8k") if k in summary})
        log0(f"rl: before: {_describe(summary['before'])}")

    # 2. Train: rollouts through the engine, GRPO steps through the training loop.
    micro = max(1, -(-cfg.prompts_per_step * cfg.group_size // cfg.device_batch_size))
    settings = GrpoSettings(prompts=cfg.prompts_per_step, group_size=cfg.group_size, micro_batches=micro,
                            epochs=cfg.epochs, loss_type=cfg.loss_type, normalize_by_std=cfg.normalize_by_std,
                            cliprange=cfg.cliprange, kl_coef=cfg.kl_coef, max_tokens=cfg.max_tokens,
                            temperature=cfg.temperature, top_k=cfg.top_k, use_tools=cfg.use_tools,
                            max_tool_calls=cfg.max_tool_calls, seed=cfg.seed + 7919 * d.rank)
    ref = None
    if cfg.kl_coef:  # the frozen source (a resumed run's model has moved: load the source again)
        ref = (load_checkpoint(src, "cpu")[0].to(device) if resume else copy.deepcopy(model)).eval().requires_grad_(False)
    source = RolloutSource(engine, tok, task, train_items, settings, ref_model=ref, device=device, say=log0)
    prepared = prepare_model(model, d, device)
    opt = sft_optimizer(model, lora=False, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                        unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=0.0)
    steps = cfg.num_steps * cfg.epochs
    warmdown = round(cfg.warmdown_ratio * steps)

    def evaluate(t) -> dict:
        r = evaluate_task(engine, tok, task, val_items, k=cfg.eval_k, **ev)
        t.write(f"step {t.state.step:,}: held-out {_describe(r)}; last rollout: reward "
                f"{source.last.get('reward', float('nan')):.3f}, e.g. {source.last.get('example', '')[:80]!r}")
        return {k: v for k, v in r.items() if isinstance(v, (int, float))}

    ck = Checkpointer(out / "checkpoint", tokenizer_dir=info["tokenizer_dir"],
                      meta={"stage": "rl", "run": cfg.run, "source": str(src), "task": cfg.task_file or cfg.task},
                      extra_state={"task": cfg.task_file or cfg.task, "group_size": cfg.group_size,
                                   "prompts_per_step": cfg.prompts_per_step, "source": str(src)})
    trainer = Trainer(prepared, opt, grpo_loss(settings), source,
                      LoopConfig(num_steps=steps, grad_accum=micro, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
                                 checkpoint_every=cfg.checkpoint_every, best_metric="pass@1", best_higher=True,
                                 name="rl", diverge_hint="lower --lr_frac or raise --group_size"),
                      dist=d, device=device, amp_dtype=amp_dtype, evaluate=evaluate if d.master else None,
                      checkpointer=ck, log=log, lr_schedule=lambda step: lr_multiplier(step, steps, 0, warmdown, 0.0))
    if resume:
        _, rinfo = load_checkpoint(out / "checkpoint", "cpu")
        ts = rinfo["train_state"] or {}
        for key, mine in (("task", cfg.task_file or cfg.task), ("group_size", cfg.group_size),
                          ("prompts_per_step", cfg.prompts_per_step)):
            if key in ts and ts[key] != mine:
                raise ChatforgeError(f"{out / 'checkpoint'} was trained with {key} {ts[key]!r}, this run has "
                                     f"{mine!r}; keep the settings to resume or pass --force to start over")
        trainer.resume(rinfo)
        if (out / "before.json").exists():  # measured by the interrupted run
            summary.update(json.loads((out / "before.json").read_text()))
    state = trainer.run()

    # 3. After.
    if d.master:
        summary["after"] = evaluate_task(engine, tok, task, val_items, k=cfg.eval_k, **ev)
        if gsm_items:
            summary["after_gsm8k"] = evaluate_task(engine, tok, gsm, gsm_items, **dict(ev, max_tokens=cfg.gsm8k_max_tokens))
        summary.update(steps=state.step, rollouts=source.rollouts, train_seconds=round(state.train_time, 1),
                       reward_reasons=dict(source.reward_stats.counts), checkpoint=str(out / "checkpoint"))
        log(event="after", **_flat({k: summary[k] for k in ("after", "after_gsm8k") if k in summary}))
        write_json(out / "summary.json", summary)
        srun.close()
        try:
            from chatforge.plots import plot_metrics

            summary["plot"] = str(plot_metrics(out / "metrics.jsonl", out / "reward.png", ["reward", "eval/pass@1"],
                                               title=f"RL ({cfg.task_file or cfg.task})"))
        except ImportError:
            log0("matplotlib is not installed: no reward.png (pip install matplotlib)")
        srun.finish(summary)
        log0(report_lines(summary))
    return summary


def _flat(d: dict) -> dict:
    """The numbers of nested results, for one metrics.jsonl record."""
    return {f"{k}/{kk}": vv for k, v in d.items() if isinstance(v, dict)
            for kk, vv in v.items() if isinstance(vv, (int, float))}


def _describe(r: dict) -> str:
    s = f"pass@1 {r['pass@1']:.1%} [{r['pass@1_low']:.1%}, {r['pass@1_high']:.1%}] of {r['n']}"
    if "pass@k" in r:
        s += f", pass@{r['k']} {r['pass@k']:.1%}"
    return s


def report_lines(s: dict) -> str:
    lines = [f"rl done: {s['steps']} steps ({s['rollouts']} rollouts) on {s['task']} in {s['train_seconds']:.0f} s; "
             f"checkpoint {s['checkpoint']}"]
    if "before" in s:
        lines.append(f"  held-out before: {_describe(s['before'])}")
    lines.append(f"  held-out after:  {_describe(s['after'])}")
    if "after_gsm8k" in s:
        b = s.get("before_gsm8k", {}).get("pass@1", float("nan"))
        lines.append(f"  GSM8K pass@1 {b:.1%} -> {s['after_gsm8k']['pass@1']:.1%} (of {s['after_gsm8k']['n']})")
    return "\n".join(lines)
