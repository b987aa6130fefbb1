"""`chatforge rlhf ACTION`: learning from human preferences, after RL.

    chatforge rlhf rm  --preset tiny        # reward model on HH, OASST and the controlled sets, from runs/tiny/sft
    chatforge rlhf dpo --preset tiny        # DPO of the policy (runs/tiny/rl, else sft) on preference pairs
    chatforge rlhf --preset tiny            # both (the pipeline's step)
    chatforge rlhf judge --preset tiny      # a second reward model on the disjoint judge split
    chatforge rlhf grpo --preset tiny       # GRPO against the reward model, KL leash, the judge watching
    chatforge rlhf score --run tiny --prompt "What is 2 + 2?" --replies "It is 4.||Figure it out yourself."

Wiring only: the pairs (tasks/preferences.py, pairs.py), the reward model (reward_model.py), DPO (dpo.py),
GRPO on the reward model and the reward-hacking monitor (rlhf_grpo.py over grpo.py), LoRA (lora.py), the
one training loop (train_loop.py).

Outputs in runs/<run>/rlhf/:

    rm/checkpoint/     the reward model: backbone checkpoint + reward_head.safetensors ("reward_model": true)
    rm/summary.json    held-out pairwise accuracy per source with its 95% Wilson interval, pair counts and
                       skip reasons (also in rm/DONE); rm/metrics.jsonl per step (loss, accuracy, margin)
    dpo/checkpoint/    the DPO policy: the run's "rlhf" checkpoint (`chatforge chat runs/<run>/rlhf/dpo/checkpoint`)
    dpo/summary.json   before / after per source: implicit reward margin, preferred-reply rate (95% interval),
                       preferred-logprob rate; dpo/metrics.jsonl per step
    judge/             the judge reward model (same layout as rm/, trained on the judge split)
    grpo/checkpoint/   the GRPO policy; grpo/best/ the policy where the judge scored best; grpo/hacking.png
                       the training reward, KL, held-out reward model and judge curves; grpo/monitor.json
    DONE               when rm and dpo are complete
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from chatforge.common import ChatforgeError, is_complete, log0, read_done, source_checkpoint, stage_dir, \
    stage_run, write_json
from chatforge.config import ConfigError, RlhfConfig
from chatforge.distributed import training_process
from chatforge.stats import pooled


def run(cfg: RlhfConfig) -> dict:
    check_config(cfg)
    if cfg.action == "score":
        return score(cfg)
    out = {}
    with training_process(cfg.threads, cfg.device) as (d, device):
        for action in (("rm", "dpo") if cfg.action == "all" else (cfg.action,)):
            train = {"rm": _train_rm, "judge": _train_rm, "dpo": _train_dpo, "grpo": _train_grpo}[action]
            out[action] = train(cfg, d, device, action) if action in ("rm", "judge") else train(cfg, d, device)
    root = stage_dir(cfg, "rlhf")
    if d.master and all(is_complete(root / a) for a in ("rm", "dpo")):
        parts = {a: read_done(root / a) for a in ("rm", "dpo")}
        write_json(root / "DONE", {"stage": "rlhf", "seconds": sum(p.get("seconds", 0) for p in parts.values()), **parts})
    return out


def check_config(cfg: RlhfConfig) -> None:
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be {what}")
    need(cfg.action in cfg.ACTIONS, "action", " | ".join(cfg.ACTIONS))
    for n in ("batch_size", "grad_accum"):
        need(getattr(cfg, n) >= 1, n, "at least 1")
    for n in ("rm_steps", "dpo_steps", "train_pairs", "eval_pairs", "controlled_pairs", "max_seq_len", "nll_coef",
              "lora_rank", "eval_every", "checkpoint_every", "kl_budget"):
        need(getattr(cfg, n) >= 0, n, "at least 0")
    need(cfg.beta > 0, "beta", "positive")
    need(cfg.rm_lr > 0 and cfg.lr_frac > 0 and cfg.lora_lr > 0, "rm_lr", "positive (and --lr_frac, --lora_lr too)")
    need(0 < cfg.val_fraction and 0 <= cfg.judge_fraction and cfg.val_fraction + cfg.judge_fraction < 1,
         "val_fraction", "in (0, 1), with --judge_fraction, together below 1")
    need(0 <= cfg.warmdown_ratio <= 1, "warmdown_ratio", "in [0, 1]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16")


def policy_source(cfg) -> Path:
    if cfg.source == "auto":
        return source_checkpoint(cfg, "rl" if is_complete(stage_dir(cfg, "rl")) else "sft")
    return source_checkpoint(cfg, cfg.source)


def _prepare(cfg, d, action: str, src):
    """(out dir, tokenizer, tokenizer dir, resume?) or (out, None, ...) when the action is complete."""
    from chatforge.checkpoint import read_config
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, f"rlhf/{action}")
    if is_complete(out) and not cfg.force:
        log0(f"rlhf {action}: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return out, None, None, False
    if cfg.force and d.master:
        for folder in ("checkpoint", "best"):
            shutil.rmtree(out / folder, ignore_errors=True)
        for f in ("metrics.jsonl", "summary.json", "before.json", "monitor.json", "hacking.png"):
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


def _data(cfg, tok, names, max_len, log, train_split="train"):
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


def _loop(cfg, steps, best, name):
    from chatforge.train_loop import LoopConfig

    return LoopConfig(num_steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
                      checkpoint_every=cfg.checkpoint_every, best_metric=best, best_higher=True, name=name,
                      diverge_hint="lower the learning rate")


def _schedule(cfg, steps):
    from chatforge.optim import lr_multiplier

    warmdown = round(cfg.warmdown_ratio * steps)
    return lambda step: lr_multiplier(step, steps, 0, warmdown, 0.0)


def _train_rm(cfg, d, device, kind: str = "rm") -> dict:
    """The reward model (kind "rm", on the train split) or the judge (kind "judge", on the disjoint judge split)."""
    from chatforge.lora import lora_parameters
    from chatforge.pairs import PairSource
    from chatforge.reward_model import RewardCheckpointer, build_reward_model, describe, pair_accuracy, rm_loss
    from chatforge.rng import seed_everything
    from chatforge.train_loop import Trainer, prepare_model

    src = source_checkpoint(cfg, cfg.rm_source)
    out, tok, tok_dir, resume = _prepare(cfg, d, kind, src)
    if tok is None:
        return read_done(out)
    seed_everything(cfg.seed)
    rm, info = build_reward_model(src, out / "checkpoint", resume=resume, lora_rank=cfg.lora_rank,
                                  lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len)
    max_len = cfg.max_seq_len or rm.config.max_seq_len
    with (stage_run(cfg, f"rlhf/{kind}") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        log0(f"rlhf {kind}: reward model from {src}, pairs of {', '.join(cfg.rm_data)} (<= {max_len} tokens):")
        pairs, val, counts = _data(cfg, tok, cfg.rm_data, max_len, log, "train" if kind == "rm" else "judge")
        rm = rm.to(device)
        # LoRA: the adapters at --lora_lr and the head at --rm_lr; else everything but the unused LM head at
        # --rm_lr. initial_lr: the schedule's base, saved and resumed with the optimizer.
        adapters = lora_parameters(rm.backbone) if cfg.lora_rank else []
        groups = [(adapters, cfg.lora_lr), (list(rm.head.parameters()), cfg.rm_lr)] if adapters else \
            [([p for p in rm.parameters() if p.requires_grad], cfg.rm_lr)]
        opt = torch.optim.AdamW([{"params": ps, "lr": lr, "initial_lr": lr} for ps, lr in groups], betas=(0.9, 0.95),
                                weight_decay=0.0)

        def evaluate(t) -> dict:
            r = {n: pair_accuracy(rm, v, tok.bos_id, cfg.batch_size, device) for n, v in val.items()}
            t.write(f"step {t.state.step:,}: held-out accuracy " + ", ".join(f"{n} {x['accuracy']:.1%}" for n, x in r.items()))
            return dict(_flat(r), accuracy=pooled(r, "accuracy"))

        ck = RewardCheckpointer(out / "checkpoint", tokenizer_dir=tok_dir,
                                meta={"stage": "rlhf", "action": kind, "run": cfg.run, "source": str(src)})
        trainer = Trainer(prepare_model(rm, d, device), opt, rm_loss,
                          PairSource(pairs, cfg.batch_size, tok.bos_id, cfg.seed + d.rank, device),
                          _loop(cfg, cfg.rm_steps, "accuracy", f"rlhf {kind}"), dist=d, device=device, amp_dtype=_amp(cfg, device),
                          evaluate=evaluate if d.master else None, checkpointer=ck, log=log,
                          lr_schedule=_schedule(cfg, cfg.rm_steps))
        if resume:
            trainer.resume(info)
        state = trainer.run()
        if not d.master:
            return {}
        after = {n: pair_accuracy(rm, v, tok.bos_id, cfg.batch_size, device) for n, v in val.items()}
        summary = {"source": str(src), "steps": state.step, "train_seconds": round(state.train_time, 1),
                   "accuracy": after, "pairs": counts, "checkpoint": str(out / "checkpoint")}
        log(event="after", **_flat(after))
        write_json(out / "summary.json", summary)
        srun.finish(summary)
        log0(f"rlhf {kind} done: {state.step} steps in {state.train_time:.0f} s; held-out pairwise accuracy:\n"
             + describe(after))
        return summary


def _amp(cfg, device):
    return torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else None


def _train_dpo(cfg, d, device) -> dict:
    from chatforge.dpo import describe, dpo_train_loss, evaluate_dpo, load_policy
    from chatforge.finetune import AdapterCheckpointer, sft_optimizer
    from chatforge.pairs import PairSource
    from chatforge.reward_model import check_tokenizers
    from chatforge.rng import seed_everything
    from chatforge.tokenizer import Tokenizer
    from chatforge.train_loop import Checkpointer, Trainer, prepare_model

    src = policy_source(cfg)
    out, tok, tok_dir, resume = _prepare(cfg, d, "dpo", src)
    if tok is None:
        return read_done(out)
    rm_tok = stage_dir(cfg, "rlhf/rm") / "checkpoint" / "tokenizer"
    if rm_tok.is_dir():  # the reward model judges this policy's replies later: same ids or nothing
        check_tokenizers(Tokenizer.load(rm_tok), tok, rm_tok.parent, src)
    seed_everything(cfg.seed)
    lora = cfg.lora_rank > 0
    ck_path = out / "checkpoint"
    model, reference, info = load_policy(src, ck_path, resume=resume, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                         lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len, device=device)
    max_len = cfg.max_seq_len or model.config.max_seq_len
    with (stage_run(cfg, "rlhf/dpo") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        log0(f"rlhf dpo: policy {src} ({'LoRA rank ' + str(cfg.lora_rank) if lora else 'full'}, beta {cfg.beta}), "
             f"pairs of {', '.join(cfg.dpo_data)}:")
        pairs, val, counts = _data(cfg, tok, cfg.dpo_data, max_len, log)

        def measure():
            return {n: evaluate_dpo(model, reference, v, tok.bos_id, cfg.beta, cfg.batch_size, device) for n, v in val.items()}

        summary = {"source": str(src), "beta": cfg.beta, "nll_coef": cfg.nll_coef, "lora_rank": cfg.lora_rank,
                   "pairs": counts}
        if d.master:
            if resume and (out / "before.json").exists():
                summary["before"] = json.loads((out / "before.json").read_text())
            else:
                summary["before"] = measure()
                write_json(out / "before.json", summary["before"])
                log(event="before", **_flat(summary["before"]))
        opt = sft_optimizer(model, lora=lora, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                            unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=cfg.lora_lr)

        def evaluate(t) -> dict:
            r = measure()
            t.write(f"step {t.state.step:,}: held-out " + ", ".join(
                f"{n} margin {x['margin']:.3f} preferred {x['implicit_accuracy']:.1%}" for n, x in r.items()))
            return dict(_flat(r), implicit_accuracy=pooled(r, "implicit_accuracy"))

        kind = AdapterCheckpointer if lora else Checkpointer
        ck = kind(ck_path, tokenizer_dir=tok_dir, meta={"stage": "rlhf", "action": "dpo", "run": cfg.run,
                                                        "source": str(src)},
                  extra_state={"lora_rank": cfg.lora_rank, "source": str(src)})
        trainer = Trainer(prepare_model(model, d, device), opt, dpo_train_loss(cfg.beta, cfg.nll_coef, reference),
                          PairSource(pairs, cfg.batch_size, tok.bos_id, cfg.seed + d.rank, device),
                          _loop(cfg, cfg.dpo_steps, "implicit_accuracy", "rlhf dpo"), dist=d, device=device,
                          amp_dtype=_amp(cfg, device), evaluate=evaluate if d.master else None, checkpointer=ck,
                          log=log, lr_schedule=_schedule(cfg, cfg.dpo_steps))
        if resume:
            trainer.resume(info)
        state = trainer.run()
        if not d.master:
            return {}
        summary.update(after=measure(), steps=state.step, train_seconds=round(state.train_time, 1), checkpoint=str(ck_path))
        log(event="after", **_flat(summary["after"]))
        write_json(out / "summary.json", summary)
        srun.finish(summary)
        log0(f"rlhf dpo done: {state.step} steps in {state.train_time:.0f} s; checkpoint {ck_path}; held-out:\n"
             + describe(summary["before"], summary["after"]))
        return summary


def _train_grpo(cfg, d, device) -> dict:
    """GRPO (grpo.py) with the reward model's score as the reward, a KL leash, and the judge watching."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.dpo import load_policy
    from chatforge.engine import Engine
    from chatforge.finetune import AdapterCheckpointer, sft_optimizer
    from chatforge.grpo import GrpoSettings, RolloutSource, grpo_loss
    from chatforge.lora import AdaptersOff, merged_state_dict
    from chatforge.rlhf_grpo import HackingMonitor, RewardModelTask, held_out_scores, load_judged_reward_models, \
        load_prompts, plot_hacking
    from chatforge.rng import seed_everything
    from chatforge.train_loop import Checkpointer, Trainer, _FullWeights, prepare_model

    src = policy_source(cfg)
    out, tok, tok_dir, resume = _prepare(cfg, d, "grpo", src)
    if tok is None:
        return read_done(out)
    rms = load_judged_reward_models(Path(cfg.runs_dir) / cfg.run, tok, src, device)  # frozen, tokenizers checked
    seed_everything(cfg.seed)
    lora = cfg.lora_rank > 0
    model, ref, info = load_policy(src, out / "checkpoint", resume=resume, lora_rank=cfg.lora_rank,
                                   lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len,
                                   device=device)
    ref = AdaptersOff(model) if lora else ref  # LoRA: the KL reference is the base weights, adapters off
    room = min(model.config.max_seq_len, cfg.max_seq_len or model.config.max_seq_len) - cfg.max_tokens
    items = load_prompts(cfg.grpo_data, tok, room, cfg.eval_prompts, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                         judge_fraction=cfg.judge_fraction, seed=cfg.seed, controlled_n=cfg.controlled_pairs)
    task = RewardModelTask(rms["rm"], tok, items, cfg.max_seq_len)
    engine = Engine(model, tok, tools={}, device=device)
    settings = GrpoSettings(prompts=cfg.prompts_per_step, group_size=cfg.group_size, micro_batches=1,
                            kl_coef=cfg.kl_coef, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                            use_tools=False, seed=cfg.seed + 7919 * d.rank)
    source = RolloutSource(engine, tok, task, items["train"], settings, ref_model=ref if cfg.kl_coef else None,
                           device=device, say=log0)
    monitor = HackingMonitor(patience=cfg.patience or 10 ** 9)
    if resume and (out / "monitor.json").exists():
        monitor.load_state_dict(json.loads((out / "monitor.json").read_text()))
    with (stage_run(cfg, "rlhf/grpo") if d.master else contextlib.nullcontext()) as srun:
        log_record = srun.log if srun is not None else (lambda **r: None)
        kls: list[float] = []  # per-step KL since the last evaluation, for --kl_budget

        def log(**r):
            if "kl" in r and "event" not in r:
                kls.append(r["kl"])
            log_record(**r)
        log0(f"rlhf grpo: policy {src}, {len(items['train']):,} prompts of {', '.join(cfg.grpo_data)}, "
             f"{cfg.prompts_per_step} x {cfg.group_size} replies per step, KL coefficient {cfg.kl_coef}")

        def evaluate(t) -> dict:
            r = held_out_scores(engine, tok, items["val"], rms, cfg.max_tokens, cfg.max_seq_len)
            verdict = monitor.update(t.state.step, r["rm_score"], r["judge_score"])
            write_json(out / "monitor.json", monitor.state_dict())
            if kls:
                r["kl_since_eval"] = sum(kls) / len(kls)
                kls.clear()
                if cfg.kl_budget and r["kl_since_eval"] > cfg.kl_budget:
                    t.write(f"step {t.state.step}: KL {r['kl_since_eval']:.4f} is over the budget {cfg.kl_budget}: stopping")
                    verdict["stop"] = True
            if verdict["improved"]:  # keep the best policy by the judge
                save_checkpoint(out / "best", _FullWeights(model.config, merged_state_dict(model)), tokenizer_dir=tok_dir,
                                meta={"stage": "rlhf", "action": "grpo", "step": t.state.step, **r})
            if verdict["stop"] and monitor.falling >= monitor.patience:
                t.write(f"step {t.state.step}: the judge fell {monitor.falling} evaluations in a row while the reward "
                        f"model rose: stopping (best judge at step {monitor.best_step})")
            if verdict["stop"]:
                t.config.num_steps = min(t.config.num_steps, t.state.step + 1)  # finish this step, checkpoint, end
            t.write(f"step {t.state.step:,}: held-out reward model {r['rm_score']:.3f}, judge {r['judge_score']:.3f}")
            return dict(r, stopped_early=float(verdict["stop"]))

        opt = sft_optimizer(model, lora=lora, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                            unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=cfg.lora_lr)
        ck = (AdapterCheckpointer if lora else Checkpointer)(
            out / "checkpoint", tokenizer_dir=tok_dir, meta={"stage": "rlhf", "action": "grpo", "run": cfg.run,
                                                             "source": str(src)})
        trainer = Trainer(prepare_model(model, d, device), opt, grpo_loss(settings), source,
                          _loop(cfg, cfg.grpo_steps, "judge_score", "rlhf grpo"), dist=d, device=device,
                          amp_dtype=_amp(cfg, device), evaluate=evaluate if d.master else None, checkpointer=ck,
                          log=log, lr_schedule=_schedule(cfg, cfg.grpo_steps))
        if resume:
            trainer.resume(info)
        elif d.master:
            log(event="eval", step=0, **evaluate(trainer))  # step 0: the starting policy is the first "best"
        state = trainer.run()
        if not d.master:
            return {}
        summary = {"source": str(src), "steps": state.step, "kl_coef": cfg.kl_coef, "kl_budget": cfg.kl_budget,
                   "monitor": monitor.state_dict(),
                   "stopped_early": state.step < cfg.grpo_steps, "best": str(out / "best"),
                   "reward_reasons": dict(source.reward_stats.counts), "checkpoint": str(out / "checkpoint")}
        write_json(out / "summary.json", summary)
        srun.close()
        summary["plot"] = plot_hacking(out / "metrics.jsonl", out / "hacking.png")
        srun.finish(summary)
        h = monitor.history
        if h:
            log0(f"rlhf grpo done: {state.step} steps; held-out reward model {h[0]['rm_score']:.3f} -> "
                 f"{h[-1]['rm_score']:.3f}, judge {h[0]['judge_score']:.3f} -> {h[-1]['judge_score']:.3f} (best at "
                 f"step {monitor.best_step}: {out / 'best'})")
        return summary


def _flat(r: dict) -> dict:
    return {f"{n}/{k}": v for n, x in r.items() for k, v in x.items() if isinstance(v, (int, float))}


def score(cfg) -> dict:
    """Score replies to a prompt (or the records of --score_file) with a trained reward model; prints them."""
    from chatforge.reward_model import read_score_records, score_records

    path = Path(cfg.rm) if cfg.rm else stage_dir(cfg, "rlhf/rm") / "checkpoint"
    if not (path / "config.json").is_file():
        raise ChatforgeError(f"no reward model at {path}; train one with `chatforge rlhf rm --run {cfg.run}` or "
                             f"pass --rm CHECKPOINT")
    if cfg.score_file:
        records = read_score_records(cfg.score_file)
    elif cfg.prompt and cfg.replies:
        records = [{"prompt": cfg.prompt, "replies": cfg.replies.split("||")}]
    else:
        raise ChatforgeError("give --prompt TEXT and --replies 'A||B' (or --score_file FILE.jsonl) to score")
    results = score_records(path, records, cfg.max_seq_len)
    for r in results:
        print(f"prompt: {r['prompt']}")
        for reply, s in sorted(zip(r["replies"], r["scores"]), key=lambda x: -x[1]):
            print(f"  {s:+8.3f}  {reply[:100]}")
    return {"rm": str(path), "results": results}
