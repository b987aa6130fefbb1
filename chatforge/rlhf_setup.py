"""What every `chatforge rlhf` action does around its trainer (stages/rlhf.py wires these together):
validate the config, find the policy to start from, prepare the action's output folder (complete? resume?
start over?), load the preference pairs, and build the loop's settings, schedule and compute dtype."""

from __future__ import annotations

import shutil
from pathlib import Path

from chatforge.common import ChatforgeError, amp_dtype as resolve_amp, is_complete, log0, source_checkpoint, \
    stage_dir
from chatforge.config import ConfigError

# The files an action writes beside its checkpoint; --force removes them with it.
ACTION_FILES = ("metrics.jsonl", "summary.json", "before.json", "monitor.json", "hacking.png")


def check_config(cfg) -> None:
    """A clear ConfigError naming the first flag of an RlhfConfig that is out of range."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be {what}")
    need(cfg.action in cfg.ACTIONS, "action", " | ".join(cfg.ACTIONS))
    for n in ("batch_size", "grad_accum", "ppo_epochs"):
        need(getattr(cfg, n) >= 1, n, "at least 1")
    for n in ("rm_steps", "dpo_steps", "grpo_steps", "ppo_steps", "train_pairs", "eval_pairs", "controlled_pairs",
              "max_seq_len", "nll_coef", "lora_rank", "eval_every", "checkpoint_every", "kl_budget", "kl_coef",
              "vf_coef"):
        need(getattr(cfg, n) >= 0, n, "at least 0")
    need(cfg.beta > 0, "beta", "positive")
    need(cfg.rm_lr > 0 and cfg.lr_frac > 0 and cfg.lora_lr > 0, "rm_lr", "positive (and --lr_frac, --lora_lr too)")
    need(cfg.value_lr > 0 and cfg.clip > 0, "value_lr", "positive (and --clip too)")
    need(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "lam", "in [0, 1] (and --gamma too)")
    need(0 < cfg.val_fraction and 0 <= cfg.judge_fraction and cfg.val_fraction + cfg.judge_fraction < 1,
         "val_fraction", "in (0, 1), with --judge_fraction, together below 1")
    need(0 <= cfg.warmdown_ratio <= 1, "warmdown_ratio", "in [0, 1]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16")


def policy_source(cfg) -> Path:
    """The checkpoint DPO, GRPO and PPO start from: --source, or with "auto" the run's rl stage when
    complete, else its sft stage."""
    if cfg.source == "auto":
        return source_checkpoint(cfg, "rl" if is_complete(stage_dir(cfg, "rl")) else "sft")
    return source_checkpoint(cfg, cfg.source)


def prepare_action(cfg, d, action: str, src):
    """(out dir, tokenizer, tokenizer dir, resume?) for rlhf/<action>, or (out, None, None, False) when the
    action is complete (and --force not given). --force clears the old checkpoint and files first; a
    checkpoint to resume must come from the same source."""
    from chatforge.checkpoint import read_config
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, f"rlhf/{action}")
    if is_complete(out) and not cfg.force:
        log0(f"rlhf {action}: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return out, None, None, False
    if cfg.force and d.master:
        for folder in ("checkpoint", "best"):
            shutil.rmtree(out / folder, ignore_errors=True)
        for f in ACTION_FILES:
            (out / f).unlink(missing_ok=True)
    tok_dir = Path(src) / "tokenizer"
    if not tok_dir.is_dir():
        raise ChatforgeError(f"{src} has no tokenizer/ folder; RLHF needs the checkpoint's own tokenizer")
    tok = Tokenizer.load(tok_dir)
    if "<|assistant_start|>" not in (tok.special_tokens or {}):
        raise ChatforgeError(f"{src}: the tokenizer has no chat tokens; RLHF starts from a chat (SFT) checkpoint")
    resume = cfg.resume and not cfg.force and (out / "checkpoint" / "state.json").exists()
    if resume:
        saved = read_config(out / "checkpoint").get("source")
        if saved is not None and saved != str(src):
            raise ChatforgeError(f"{out / 'checkpoint'} was trained from {saved}, this run starts from {src}; keep "
                                 f"the source to resume or pass --force to start over")
    return out, tok, tok_dir, resume


def load_pair_data(cfg, tok, names, max_len, log, train_split="train"):
    """(training pairs of every source in `names`, {source: held-out EncodedPairs}, counts) from the
    preference sources, split by cfg's fractions; each source's counts are printed and logged."""
    from chatforge.pairs import load_encoded

    kw = dict(data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, judge_fraction=cfg.judge_fraction, seed=cfg.seed,
              controlled_n=cfg.controlled_pairs)
    train, counts = load_encoded(tok, names, train_split, max_len, limit=cfg.train_pairs, **kw)
    val, val_counts = load_encoded(tok, names, "val", max_len, limit=cfg.eval_pairs, **kw)
    for n in names:
        log0(f"  {n}: {len(train[n]):,} training pairs, {len(val[n]):,} held out; skipped {counts[n]['skipped']}")
        if not val[n]:
            raise ChatforgeError(f"preference source {n}: no held-out pairs fit {max_len} tokens; raise --max_seq_len "
                                 f"or --val_fraction")
    pairs = [p for n in names for p in train[n]]
    if not pairs:
        raise ChatforgeError(f"no training pairs in {', '.join(names)} fit {max_len} tokens")
    log(event="data", train=counts, val=val_counts)
    return pairs, val, {"train": counts, "val": val_counts}


def loop_config(cfg, steps: int, best: str, name: str, every: int = 1):
    """The loop's settings for `steps` optimizer steps; eval_every and checkpoint_every count units of
    `every` optimizer steps (PPO: rollouts of ppo_epochs steps each)."""
    from chatforge.train_loop import LoopConfig

    return LoopConfig(num_steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                      eval_every=cfg.eval_every * every, checkpoint_every=cfg.checkpoint_every * every,
                      best_metric=best, best_higher=True, name=name, diverge_hint="lower the learning rate")


def schedule(cfg, steps: int):
    """Constant rate, then a linear decay to 0 over the last warmdown_ratio of the steps."""
    from chatforge.optim import lr_multiplier

    warmdown = round(cfg.warmdown_ratio * steps)
    return lambda step: lr_multiplier(step, steps, 0, warmdown, 0.0)


def amp_dtype(cfg, device):
    """bf16 autocast with --dtype bfloat16, or auto on CUDA; else None (float32)."""
    return resolve_amp(cfg.dtype, device)


def flat(r: dict) -> dict:
    """{source: {metric: value}} -> {"source/metric": value} for metrics.jsonl (numbers only)."""
    return {f"{n}/{k}": v for n, x in r.items() for k, v in x.items() if isinstance(v, (int, float))}
